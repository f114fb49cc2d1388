"""What agents read besides runs: their session's events and the prompt skills."""

from __future__ import annotations

from typing import Any, cast

from django.db import transaction
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import permissions, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from experiments import selectors, skills
from experiments.api import serializers as s
from experiments.models import AgentCursor, PromptSkill
from labsite import roles
from labsite.auth import raw_token_from
from labsite.schema import openapi_schema
from labsite.validation import text_problem


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
        parameters=[
            OpenApiParameter(
                "q", {"type": "string", "minLength": 1}, required=True, description="search words"
            )
        ],
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
