"""The REST API: parse input, call one service, render the result. Never SSH here."""

from __future__ import annotations

from typing import Any, cast

from django.db import transaction
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clusters import services as cluster_services
from clusters.api.views import find_host
from clusters.models import Host
from experiments import selectors, services, skills
from experiments.actors import Actor
from experiments.api import serializers as s
from experiments.api.filters import AlertFilter, PlanFilter, RunFilter, SweepFilter
from experiments.models import AgentCursor, Alert, Plan, PromptSkill, Run, Sweep
from labsite import roles
from labsite.api import KEY_PATTERN, ErrorSerializer, key_or_404, query_int, shown_key
from labsite.auth import raw_token_from
from labsite.schema import openapi_schema
from labsite.validation import INT64_MAX, text_problem

# Documented beside the success answer of each operation whose service can raise Conflict.
CONFLICT = {409: OpenApiResponse(ErrorSerializer, description="the object's state forbids it")}
REFUSED = {400: OpenApiResponse(ErrorSerializer, description="the request was refused")}


class BadReference(APIException):
    """A request body names an object that does not exist."""

    status_code = status.HTTP_400_BAD_REQUEST


def _lookup(model: type[Any], pk: Any, label: str) -> Any:
    """An object referenced in a request body; unknown ids are a 400 naming the id."""
    if pk in (None, ""):
        return None
    obj = model.objects.filter(pk=str(pk)).first() if KEY_PATTERN.fullmatch(str(pk)) else None
    if obj is None:
        raise BadReference(f"{label} not found: {pk}")
    return obj


def _host(name: Any) -> Host | None:
    if name in (None, ""):
        return None
    host = find_host(str(name))
    if host is None:
        raise BadReference(f"Host not found: {name}")
    return host


def _run_options(data: dict[str, Any]) -> dict[str, Any]:
    """Options shared by a single run and a grid sweep's runs."""
    options: dict[str, Any] = {}
    for key in ("gpuwrap_config", "gpus", "min_free_mem_mb", "workdir", "env", "priority"):
        if key in data:
            options[key] = data[key]
    options["host"] = _host(data.get("host"))
    return options


class RunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Runs: create, list (newest first, filterable), detail, start, stop, rerun."""

    filterset_class = RunFilter

    def get_queryset(self) -> QuerySet[Run]:
        if self.action == "list":
            return selectors.run_summaries(selectors.runs_list())
        return selectors.runs_list()

    def get_serializer_class(self) -> type[s.RunSerializer]:
        return s.RunListSerializer if self.action == "list" else s.RunSerializer

    def get_object(self) -> Run:
        key_or_404(self.kwargs["pk"], "Run")
        run = self.get_queryset().filter(pk=self.kwargs["pk"]).first()
        if run is None:
            raise NotFound(f"Run not found: {self.kwargs['pk']}")
        return run

    @extend_schema(request=s.RunCreateSerializer, responses={201: s.RunSerializer})
    def create(self, request: Request) -> Response:
        """Create a run; with auto_start it is queued (held while its plan is not approved)."""
        data = s.RunCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        run = services.run_create(
            actor=Actor.from_request(request),
            name=v.get("name", ""),
            command=v["command"],
            sweep=_lookup(Sweep, v.get("sweep_id"), "Sweep"),
            plan=_lookup(Plan, v.get("plan_id"), "Plan"),
            params=v.get("params") or {},
            chat_session_id=v.get("chat_session_id") or "",
            auto_start=v["auto_start"],
            **_run_options(v),
        )
        return Response(self._out(run), status=status.HTTP_201_CREATED)

    def _out(self, run: Run) -> dict[str, Any]:
        return s.RunSerializer(self.get_queryset().get(pk=run.pk)).data

    @extend_schema(request=None, responses={200: s.RunSerializer, **CONFLICT})
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str) -> Response:
        """Queue a ready run (held instead while its plan is not approved)."""
        run = services.run_start(run=self.get_object(), actor=Actor.from_request(request))
        return Response(self._out(run))

    @extend_schema(request=None, responses={200: s.RunSerializer, **CONFLICT})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str) -> Response:
        """Stop a run in any non-terminal state (queued and held included)."""
        run = services.run_stop(run=self.get_object(), actor=Actor.from_request(request))
        return Response(self._out(run))

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "offset", int, description="byte offset; negative counts from the end"
            ),
            OpenApiParameter(
                "limit", int, description="bytes to return (default 65536, max 4 MiB)"
            ),
        ],
        responses=OpenApiTypes.OBJECT,
    )
    @action(detail=True, methods=["get"])
    def logs(self, request: Request, pk: str) -> Response:
        """The run's output (stdout and stderr), as copied from its host by the poller."""
        offset = query_int(request, "offset", default=0, minimum=-INT64_MAX)
        limit = query_int(request, "limit", default=65536, minimum=1, maximum=4 * 2**20)
        return Response(selectors.run_log(self.get_object(), offset=offset, limit=limit))

    @extend_schema(responses=OpenApiTypes.OBJECT)
    @action(detail=True, methods=["get"])
    def metrics(self, request: Request, pk: str) -> Response:
        """Metric series {key: [{step, value}]} from metrics.jsonl, and the latest values."""
        return Response(selectors.run_metrics(self.get_object()))

    @extend_schema(request=None, responses={201: s.RunSerializer, **REFUSED})
    @action(detail=True, methods=["post"])
    def rerun(self, request: Request, pk: str) -> Response:
        """A new run with the same command and settings, linked to this one."""
        run = services.run_rerun(run=self.get_object(), actor=Actor.from_request(request))
        return Response(self._out(run), status=status.HTTP_201_CREATED)


class SweepViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Sweeps: a parameter grid expanded into runs, or a wild sweep an agent fills."""

    filterset_class = SweepFilter

    def get_queryset(self) -> QuerySet[Sweep]:
        return selectors.sweeps_list()

    def get_serializer_class(self) -> type[s.SweepSerializer]:
        return s.SweepDetailSerializer if self.action != "list" else s.SweepSerializer

    def get_object(self) -> Sweep:
        key_or_404(self.kwargs["pk"], "Sweep")
        sweep = self.get_queryset().filter(pk=self.kwargs["pk"]).first()
        if sweep is None:
            raise NotFound(f"Sweep not found: {self.kwargs['pk']}")
        return sweep

    def _out(self, sweep: Sweep) -> dict[str, Any]:
        return s.SweepDetailSerializer(self.get_queryset().get(pk=sweep.pk)).data

    def retrieve(self, request: Request, pk: str) -> Response:
        """A sweep with its runs in grid order."""
        return Response(self._out(self.get_object()))

    @extend_schema(request=s.SweepCreateSerializer, responses={201: s.SweepDetailSerializer})
    def create(self, request: Request) -> Response:
        """Expand a grid (dict of lists) into one run per point; refuses grids over max_runs."""
        data = s.SweepCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        sweep = services.sweep_create_grid(
            actor=Actor.from_request(request),
            name=v["name"],
            base_command=v["base_command"],
            parameters=v["parameters"],
            max_runs=v.get("max_runs"),
            goal=v.get("goal", ""),
            auto_start=v["auto_start"],
            chat_session_id=v.get("chat_session_id") or "",
            plan=_lookup(Plan, v.get("plan_id"), "Plan"),
            run_options=_run_options(v),
        )
        return Response(self._out(sweep), status=status.HTTP_201_CREATED)

    @extend_schema(request=s.WildSweepCreateSerializer, responses={201: s.SweepDetailSerializer})
    @action(detail=False, methods=["post"])
    def wild(self, request: Request) -> Response:
        """Create an empty sweep for an agent session; add runs with POST /runs and sweep_id."""
        data = s.WildSweepCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        sweep = services.sweep_create_wild(
            actor=Actor.from_request(request),
            name=v["name"],
            goal=v.get("goal", ""),
            chat_session_id=v.get("chat_session_id") or "",
            plan=_lookup(Plan, v.get("plan_id"), "Plan"),
        )
        return Response(self._out(sweep), status=status.HTTP_201_CREATED)


class PlanViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Plans: agents write them, PIs approve, reject or ask for changes."""

    filterset_class = PlanFilter

    def get_queryset(self) -> QuerySet[Plan]:
        qs = Plan.objects.select_related("author", "reviewer")
        if self.action == "retrieve":
            qs = qs.prefetch_related("events__actor_user")
        return qs

    def get_serializer_class(self) -> type[s.PlanSerializer]:
        return s.PlanDetailSerializer if self.action != "list" else s.PlanSerializer

    def get_object(self) -> Plan:
        key_or_404(self.kwargs["pk"], "Plan")
        plan = self.get_queryset().filter(pk=self.kwargs["pk"]).first()
        if plan is None:
            raise NotFound(f"Plan not found: {self.kwargs['pk']}")
        return plan

    def _out(self, plan: Plan) -> dict[str, Any]:
        plan = (
            Plan.objects.select_related("author", "reviewer")
            .prefetch_related("events__actor_user")
            .get(pk=plan.pk)
        )
        return s.PlanDetailSerializer(plan).data

    @extend_schema(request=s.PlanCreateSerializer, responses={201: s.PlanDetailSerializer})
    def create(self, request: Request) -> Response:
        """Save a plan (a draft); its sections are parsed from the markdown headings."""
        data = s.PlanCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        plan = services.plan_create(
            actor=Actor.from_request(request),
            title=v["title"],
            goal=v.get("goal", ""),
            raw_markdown=v.get("raw_markdown", ""),
            session_id=v.get("session_id"),
        )
        return Response(self._out(plan), status=status.HTTP_201_CREATED)

    @extend_schema(
        request=s.PlanUpdateSerializer, responses={200: s.PlanDetailSerializer, **CONFLICT}
    )
    def partial_update(self, request: Request, pk: str) -> Response:
        """Edit a draft (or a plan with changes requested)."""
        data = s.PlanUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        plan = services.plan_update(
            plan=self.get_object(), actor=Actor.from_request(request), **data.validated_data
        )
        return Response(self._out(plan))

    def _decide(self, request: Request, serializer: type[Any], service: Any) -> Response:
        data = serializer(data=request.data)
        data.is_valid(raise_exception=True)
        plan = service(
            plan=self.get_object(), actor=Actor.from_request(request), **data.validated_data
        )
        return Response(self._out(plan))

    @extend_schema(
        request=s.PlanDecisionSerializer, responses={200: s.PlanDetailSerializer, **CONFLICT}
    )
    @action(detail=True, methods=["post"])
    def submit(self, request: Request, pk: str) -> Response:
        """Send a draft for review."""
        return self._decide(request, s.PlanDecisionSerializer, services.plan_submit)

    @extend_schema(
        request=s.PlanApproveSerializer, responses={200: s.PlanDetailSerializer, **CONFLICT}
    )
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str) -> Response:
        """PI only: approve, optionally with a GPU-hour budget; held runs are queued."""
        return self._decide(request, s.PlanApproveSerializer, services.plan_approve)

    @extend_schema(
        request=s.PlanDecisionSerializer, responses={200: s.PlanDetailSerializer, **CONFLICT}
    )
    @action(detail=True, methods=["post"])
    def reject(self, request: Request, pk: str) -> Response:
        """PI only: reject; its waiting runs are stopped with reason plan_rejected."""
        return self._decide(request, s.PlanDecisionSerializer, services.plan_reject)

    @extend_schema(
        request=s.PlanDecisionSerializer, responses={200: s.PlanDetailSerializer, **CONFLICT}
    )
    @action(detail=True, methods=["post"], url_path="request-changes")
    def request_changes(self, request: Request, pk: str) -> Response:
        """PI only: send the plan back to its author with a comment."""
        return self._decide(request, s.PlanDecisionSerializer, services.plan_request_changes)

    @extend_schema(
        request=s.PlanDecisionSerializer, responses={200: s.PlanDetailSerializer, **CONFLICT}
    )
    @action(detail=True, methods=["post"])
    def archive(self, request: Request, pk: str) -> Response:
        """Put a plan away (its author, a PI or an admin)."""
        return self._decide(request, s.PlanDecisionSerializer, services.plan_archive)


class AlertViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Alerts with the answers they accept; answering one acts on its run."""

    serializer_class = s.AlertSerializer
    filterset_class = AlertFilter

    def get_queryset(self) -> QuerySet[Alert]:
        return Alert.objects.select_related("responded_by", "run")

    def get_object(self) -> Alert:
        key = str(self.kwargs["pk"])
        alert = (
            self.get_queryset().filter(pk=int(key)).first()
            if key.isascii() and key.isdigit() and len(key) <= 18
            else None
        )
        if alert is None:
            raise NotFound(f"Alert not found: {shown_key(key)}")
        return alert

    @extend_schema(request=s.AlertRespondSerializer, responses={200: s.AlertSerializer, **CONFLICT})
    @action(detail=True, methods=["post"])
    def respond(self, request: Request, pk: str) -> Response:
        """Answer with one of the alert's choices (stop and rerun act on the run)."""
        data = s.AlertRespondSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        alert = services.alert_respond(
            alert=self.get_object(),
            actor=Actor.from_request(request),
            choice=data.validated_data["choice"],
        )
        return Response(s.AlertSerializer(alert).data)


class ClusterView(APIView):
    """The cluster from the latest inventory, with GPU totals and runs by status."""

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(selectors.cluster_state())


class ClusterDetectView(APIView):
    """Detect the cluster now: the local host's GPUs (NVML, else nvidia-smi) and Slurm (sinfo)."""

    @extend_schema(request=None, responses=OpenApiTypes.OBJECT)
    def post(self, request: Request) -> Response:
        # Local calls with timeouts (NVML, nvidia-smi, sinfo); remote hosts are the poller's job.
        cluster_services.inventory_refresh_local()
        cluster_services.slurm_detect()
        return Response(selectors.cluster_state())


class SystemHealthView(APIView):
    """Counts and capacity only; open to the agents' preflight without a token."""

    permission_classes = [permissions.AllowAny]

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(selectors.system_health())


class HealthView(APIView):
    """The server, its database and its broker."""

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(selectors.service_health())


class SessionEventsView(APIView):
    """What this agent session has not seen yet: its runs that finished or failed, its alerts."""

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, session_id: str) -> Response:
        most = AgentCursor._meta.get_field("session_id").max_length or 0
        problem = text_problem(session_id) or (
            f"is {len(session_id)} characters; at most {most}" if len(session_id) > most else None
        )
        if problem:
            raise ValidationError({"session_id": [problem]})
        user: Any = request.user
        see_all = roles.is_pi(user) or roles.is_admin(user)
        with transaction.atomic():
            cursor, _ = AgentCursor.objects.get_or_create(user=user, session_id=session_id)
            cursor = AgentCursor.objects.select_for_update().get(pk=cursor.pk)
            events = list(
                selectors.session_run_events(
                    user=user,
                    session_id=session_id,
                    after_id=cursor.last_run_event_id,
                    see_all=see_all,
                )[:500]
            )
            alerts = list(
                selectors.session_alerts(
                    user=user,
                    session_id=session_id,
                    after_id=cursor.last_alert_id,
                    see_all=see_all,
                )[:500]
            )
            if events:
                cursor.last_run_event_id = events[-1].id
            if alerts:
                cursor.last_alert_id = alerts[-1].id
            cursor.save()
        out = [
            {
                "type": f"run_{e.to_status}",
                "run_id": e.run_id,
                "name": e.run.name,
                "status": e.run.status,
                "reason": e.reason,
                "error": e.run.error,
                "exit_code": e.run.exit_code,
                "at": e.created_at,
            }
            for e in events
        ] + [
            {
                "type": "alert",
                "alert_id": a.id,
                "run_id": a.run_id,
                "severity": a.severity,
                "message": a.message,
                "choices": a.choices,
                "status": a.status,
                "at": a.created_at,
            }
            for a in alerts
        ]
        out.sort(key=lambda item: item["at"])
        return Response({"session_id": session_id, "count": len(out), "events": out})


class PromptSkillViewSet(viewsets.ViewSet):
    """Prompt skills: list and read are open (preflight); search, render and edit need a token."""

    lookup_value_regex = r"[A-Za-z0-9_\-]+"

    def get_permissions(self) -> list[Any]:
        if self.action in ("list", "retrieve"):
            return [permissions.AllowAny()]
        if self.action in ("update", "partial_update"):
            return [permissions.IsAuthenticated(), CanEditSkills()]
        return [permissions.IsAuthenticated()]

    def _get(self, pk: str) -> skills.Skill:
        skill = skills.all_skills().get(pk)
        if skill is None:
            raise NotFound(f"Prompt skill not found: {pk}")
        return skill

    @extend_schema(responses=s.PromptSkillSummarySerializer(many=True))
    def list(self, request: Request) -> Response:
        """Every prompt skill: id, name, description, category, variables."""
        return Response([skill.summary() for skill in skills.all_skills().values()])

    @extend_schema(responses=s.PromptSkillSerializer)
    def retrieve(self, request: Request, pk: str) -> Response:
        """One skill with its template text."""
        skill = self._get(pk)
        return Response({**skill.summary(), "template": skill.template})

    @extend_schema(request=s.PromptSkillUpdateSerializer, responses=s.PromptSkillSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        """Edit a skill (needs the change_promptskill permission); the edit replaces the file."""
        current = self._get(pk)
        data = s.PromptSkillUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        PromptSkill.objects.update_or_create(
            id=pk,
            defaults={
                "name": v.get("name", current.name),
                "description": v.get("description", current.description),
                "category": v.get("category", current.category),
                "variables": v.get("variables", current.variables),
                "template": v.get("template", current.template),
                "updated_by": cast(Any, request.user),
            },
        )
        return self.retrieve(request, pk)

    @extend_schema(
        parameters=[OpenApiParameter("q", str, required=True, description="search words")],
        responses=s.PromptSkillSummarySerializer(many=True),
    )
    @action(detail=False, methods=["get"])
    def search(self, request: Request) -> Response:
        """Skills ranked by how well they match `q`."""
        query = request.query_params.get("q", "").strip()
        if not query:
            raise ValidationError({"q": "give a search query, e.g. ?q=sweep"})
        return Response(
            [{**skill.summary(), "score": round(score, 2)} for score, skill in skills.search(query)]
        )

    @extend_schema(request=s.RenderSerializer, responses=OpenApiTypes.OBJECT)
    @action(detail=True, methods=["post"])
    def render(self, request: Request, pk: str) -> Response:
        """Fill the template; server_url, auth_header and api_catalog come from this server."""
        skill = self._get(pk)
        body = request.data.get("variables", request.data) if isinstance(request.data, dict) else {}
        data = s.RenderSerializer(data={"variables": body if isinstance(body, dict) else {}})
        data.is_valid(raise_exception=True)
        values = {k: str(v) for k, v in data.validated_data.get("variables", {}).items()}
        values.setdefault("server_url", request.build_absolute_uri("/api").rstrip("/"))
        token = raw_token_from(request)
        values.setdefault(
            "auth_header",
            f'-H "X-Auth-Token: {token}"' if token else '-H "X-Auth-Token: $LABSITE_TOKEN"',
        )
        if "api_catalog" in skill.variables or "{{api_catalog" in skill.template:
            values.setdefault("api_catalog", api_catalog(request))
        text, missing = skills.render(skill.template, values)
        return Response({"id": skill.id, "name": skill.name, "rendered": text, "missing": missing})


class CanEditSkills(permissions.BasePermission):
    message = "changing prompt skills needs the 'change prompt skill' permission"

    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.user.has_perm("experiments.change_promptskill"))


def api_catalog(request: Request) -> str:
    """`METHOD /path - summary` for every operation of the live OpenAPI schema."""
    schema = openapi_schema()
    lines = []
    for path, ops in sorted(schema.get("paths", {}).items()):
        for method, op in ops.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            summary = (op.get("summary") or op.get("description") or "").strip().splitlines()
            lines.append(
                f"{method.upper()} {path} - {summary[0] if summary else op.get('operationId', '')}"
            )
    return "\n".join(lines)
