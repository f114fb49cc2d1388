"""Bad input is a 4xx with a message, never a 500 or a database error (issue 9, item 4).

Run on SQLite and on PostgreSQL: the 500s and the secret in the log happened on PostgreSQL,
which refuses NUL in text and jsonb and integers past 2**31 - 1.
"""

from __future__ import annotations

import json
import logging

import pytest
from django.db import DataError

from clusters.models import Host
from experiments import services
from experiments.actors import Actor
from experiments.choices import ActorKind
from experiments.models import AgentCursor, Plan, Run, RunEvent, Sweep
from labsite.api import exception_handler
from tests.factories import HostFactory

SECRET = "sk-live-4f9a"


def _actor(person) -> Actor:
    return Actor(kind=ActorKind.USER, user=person.user)


def _raw(person, path, text, method="post"):
    """A body sent as written: json.dumps escapes NUL and lone surrogates as \\u0000, \\ud800."""
    return getattr(person.client, method)(path, text, content_type="application/json")


def _no_rows() -> None:
    assert not Run.objects.exists() and not RunEvent.objects.exists()
    assert not Sweep.objects.exists() and not Plan.objects.exists()


def _detail_400(response) -> str:
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json")
    return str(response.json()["detail"])


# --- text the database cannot store ----------------------------------------------------------

RUN = {"command": "python train.py"}
GRID = {"name": "g", "base_command": "x", "parameters": {"a": [1]}}
BAD_TEXT = [
    ("/api/runs", {**RUN, "env": {"API_KEY": f"{SECRET}\u0000"}}, "env.API_KEY"),
    ("/api/runs", {**RUN, "env": {"API_KEY": f"{SECRET}\ud800"}}, "env.API_KEY"),
    ("/api/runs", {**RUN, "env": {"A\u0000B": "1"}}, "env"),
    ("/api/runs", {**RUN, "params": {"note": "a\u0000b"}}, "params.note"),
    ("/api/runs", {**RUN, "params": {"note": "\ud800"}}, "params.note"),
    ("/api/runs", {**RUN, "name": "n\u0000"}, "name"),
    ("/api/runs", {"command": "echo \ud800"}, "command"),
    ("/api/runs", {**RUN, "chat_session_id": "s\u0000"}, "chat_session_id"),
    ("/api/runs", {**RUN, "workdir": "/tmp/\udfff"}, "workdir"),
    ("/api/sweeps", {**GRID, "parameters": {"a": ["x\u0000"]}}, "parameters.a[0]"),
    ("/api/sweeps", {**GRID, "parameters": {"a\ud800": [1]}}, "parameters"),
    ("/api/sweeps", {**GRID, "goal": "g\u0000"}, "goal"),
    ("/api/sweeps/wild", {"name": "w", "goal": "\ud800"}, "goal"),
    ("/api/plans", {"title": "t", "raw_markdown": "## Objective\n\u0000"}, "raw_markdown"),
    ("/api/plans", {"title": "t\ud800"}, "title"),
    ("/api/plans", {"title": "t", "session_id": "\u0000"}, "session_id"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD_TEXT)
def test_nul_and_lone_surrogates_are_a_400_naming_the_field(member, path, body, field):
    detail = _detail_400(_raw(member, path, json.dumps(body)))
    assert detail.startswith(field) and ("NUL" in detail or "surrogate" in detail), detail
    _no_rows()


def test_a_secret_env_value_never_reaches_the_log(member, caplog):
    """GIVEN an env value with NUL WHEN the run is posted THEN a 400 and nothing logged carries
    the value (PostgreSQL put it in the log through its error context)."""
    caplog.set_level(logging.DEBUG)
    body = json.dumps({**RUN, "env": {"API_KEY": f"{SECRET}\u0000"}})
    response = _raw(member, "/api/runs", body)
    assert response.status_code == 400
    assert SECRET not in response.content.decode()
    assert SECRET not in caplog.text
    assert not Run.objects.exists()


def test_database_errors_are_a_400_that_logs_no_values(caplog):
    """The last line of defence: a DataError or IntegrityError that got past the checks is a
    400, and its text (PostgreSQL's DETAIL: Failing row contains (...)) is never logged."""
    caplog.set_level(logging.DEBUG)
    exc = DataError(f'null value violates "x"\nDETAIL:  Failing row contains ({SECRET}, 7).')
    response = exception_handler(exc, {"view": None})
    assert response is not None and response.status_code == 400
    assert SECRET not in json.dumps(response.data) and response.data["detail"]
    assert SECRET not in caplog.text


# --- integers that must fit their columns ----------------------------------------------------

TOO_BIG = [
    ("/api/runs", {**RUN, "min_free_mem_mb": 2**31}, "min_free_mem_mb"),
    ("/api/runs", {**RUN, "gpus": 65}, "gpus"),
    ("/api/runs", {**RUN, "priority": 2**31}, "priority"),
    ("/api/runs", {**RUN, "gpuwrap_config": {"enabled": True, "retries": 2**40}}, "gpuwrap_config"),
    (
        "/api/runs",
        {**RUN, "gpuwrap_config": {"enabled": True, "retry_delay_seconds": 1e300}},
        "gpuwrap_config",
    ),
    ("/api/sweeps", {**GRID, "max_runs": 10**12}, "max_runs"),
    ("/api/sweeps", {**GRID, "min_free_mem_mb": 2**31}, "min_free_mem_mb"),
]


@pytest.mark.parametrize(("path", "body", "field"), TOO_BIG)
def test_integers_out_of_their_column_range_are_a_400(member, path, body, field):
    assert _detail_400(_raw(member, path, json.dumps(body))).startswith(field)
    _no_rows()


def test_the_largest_value_a_column_holds_is_stored(member):
    response = _raw(member, "/api/runs", json.dumps({**RUN, "min_free_mem_mb": 2**31 - 1}))
    assert response.status_code == 201, response.content
    assert Run.objects.get().min_free_mem_mb == 2**31 - 1
    grid = _raw(member, "/api/sweeps", json.dumps({**GRID, "max_runs": 2**31 - 1}))
    assert grid.status_code == 201, grid.content


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"port": 70000}, "port"),
        ({"port": 0}, "port"),
        ({"gpu_free_max_mem_mb": 2**31}, "gpu_free_max_mem_mb"),
        ({"gpu_free_max_util_pct": 101}, "gpu_free_max_util_pct"),
    ],
)
def test_host_integers_are_bounded(admin, body, field):
    Host.objects.create(name="box", kind="ssh", hostname="10.0.0.1")
    response = admin.client.patch("/api/hosts/box", body, format="json")
    assert _detail_400(response).startswith(field)
    host = Host.objects.get(name="box")
    assert (host.port, host.gpu_free_max_mem_mb, host.gpu_free_max_util_pct) == (22, None, None)


# --- numbers that are not finite, and JSON too deep ------------------------------------------


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/api/runs", '{"command": "x", "params": {"lr": 1e309}}'),
        ("/api/runs", '{"command": "x", "params": {"lr": -1e309}}'),
        ("/api/runs", '{"command": "x", "params": {"lr": NaN}}'),
        ("/api/runs", '{"command": "x", "env": {"A": Infinity}}'),
        ("/api/sweeps", '{"name": "g", "base_command": "x", "parameters": {"lr": [1e999]}}'),
    ],
)
def test_non_finite_numbers_are_a_400(member, path, text):
    assert "finite" in _detail_400(_raw(member, path, text))
    _no_rows()


def test_a_non_finite_budget_is_a_400(member, pi):
    plan = services.plan_submit(
        plan=services.plan_create(actor=_actor(member), title="p"), actor=_actor(member)
    )
    response = _raw(pi, f"/api/plans/{plan.id}/approve", '{"gpu_hours_budget": 1e309}')
    assert "finite" in _detail_400(response)
    plan.refresh_from_db()
    assert plan.status == "pending_review"


def test_json_nested_50000_deep_is_a_400(member):
    text = '{"command": "x", "params": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001
    assert "LABSITE_MAX_JSON_DEPTH" in _detail_400(_raw(member, "/api/runs", text))
    lists = '{"command": "x", "params": {"a": ' + "[" * 50_000 + "]" * 50_000 + "}}"
    assert "LABSITE_MAX_JSON_DEPTH" in _detail_400(_raw(member, "/api/runs", lists))
    _no_rows()


# --- ids in URLs ---------------------------------------------------------------------------


@pytest.fixture
def objects(member):
    a = _actor(member)
    run = services.run_create(actor=a, command="x")
    Host.objects.create(name="box", kind="ssh", hostname="10.0.0.1")
    services.alert_raise(message="m", run=run)
    return run


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/ab%00cd",
        "/api/runs/ab%00cd/logs",
        "/api/runs/ab%00cd/metrics",
        "/api/runs/a%20b",
        "/api/sweeps/ab%00cd",
        "/api/plans/ab%00cd",
        "/api/alerts/1%00",
        "/api/alerts/" + "9" * 40,
        "/api/hosts/ab%00cd",
        "/api/hosts/" + "9" * 5000,
        "/api/prompt-skills/plan_mode%00",
    ],
)
def test_ids_no_object_can_have_are_a_json_404(member, objects, path):
    response = member.client.get(path)
    assert response.status_code == 404, (path, response.content[:200])
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    ["/api/runs/ab%00cd/start", "/api/runs/ab%00cd/stop", "/api/plans/ab%00cd/submit"],
)
def test_actions_on_such_ids_are_a_404_too(member, path):
    assert member.client.post(path, {}, format="json").status_code == 404


@pytest.mark.parametrize("path", ["/runs/ab%00cd", "/sweeps/ab%00cd", "/plans/ab%00cd"])
def test_pages_with_such_ids_are_a_404(client, member, path):
    client.force_login(member.user)
    assert client.get(path).status_code == 404


@pytest.mark.parametrize(
    ("session_id", "needle"), [("s" * 300, "300 characters"), ("ab%00cd", "NUL")]
)
def test_a_session_id_no_cursor_can_hold_is_a_400(member, session_id, needle):
    response = member.client.get(f"/api/wild/v2/events/{session_id}")
    detail = _detail_400(response)
    assert detail.startswith("session_id") and needle in detail
    assert not AgentCursor.objects.exists()
    assert member.client.get(f"/api/wild/v2/events/{'s' * 200}").status_code == 200


# --- query parameters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("/api/runs?offset=null", "offset"),
        ("/api/runs?limit=null", "limit"),
        ("/api/runs?limit=0", "limit"),
        ("/api/runs?offset=-1", "offset"),
        ("/api/runs?limit=1e3", "limit"),
        ("/api/plans?offset=abc", "offset"),
        ("/api/sweeps?limit=" + "9" * 40, "limit"),
        ("/api/runs/{run}/logs?offset=null", "offset"),
        ("/api/runs/{run}/logs?limit=abc", "limit"),
        ("/api/runs/{run}/logs?limit=0", "limit"),
        ("/api/runs?status=null", "status"),
        ("/api/runs?sweep_id=ab%00cd", "sweep_id"),
        ("/api/runs?chat_session_id=" + "s" * 300, "chat_session_id"),
        ("/api/plans?status=bogus", "status"),
        ("/api/alerts?status=bogus", "status"),
        ("/api/alerts?offset=null", "offset"),
        ("/api/hosts?offset=null", "offset"),
        ("/api/hosts?limit=-1", "limit"),
        ("/api/sweeps?kind=bogus", "kind"),
    ],
)
def test_malformed_query_values_are_a_400_naming_the_parameter(member, objects, query, name):
    response = member.client.get(query.format(run=objects.id))
    assert _detail_400(response).startswith(f"{name}:")


def test_good_query_values_still_work(member, objects):
    assert member.client.get("/api/runs?limit=1&offset=0").json()["count"] == 1
    assert len(member.client.get("/api/runs?limit=100000").json()["results"]) == 1
    assert member.client.get("/api/runs?status=&sweep_id=").status_code == 200
    logs = member.client.get(f"/api/runs/{objects.id}/logs?offset=-4000&limit=4000")
    assert logs.status_code == 200 and logs.json()["offset"] == 0
    assert member.client.get("/api/plans?status=draft,approved").status_code == 200


# --- unknown fields ------------------------------------------------------------------------


def test_unknown_fields_are_a_400_listing_them_and_the_allowed_ones(member):
    response = member.client.post(
        "/api/runs",
        {"command": "x", "status": "finished", "created_by": "carol", "auto_start": True},
        format="json",
    )
    detail = _detail_400(response)
    assert detail.startswith("unknown field(s): created_by, status; allowed: ")
    for allowed in ("command", "sweep_id", "gpuwrap_config", "plan_id", "priority"):
        assert allowed in detail
    assert set(response.json()["errors"]) >= {"created_by", "status"}
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("path", "body", "unknown"),
    [
        ("/api/sweeps", {**GRID, "max_run": 4}, "max_run"),
        ("/api/sweeps/wild", {"name": "w", "kind": "grid"}, "kind"),
        ("/api/plans", {"title": "t", "status": "approved"}, "status"),
    ],
)
def test_unknown_fields_on_other_writes(member, path, body, unknown):
    assert _detail_400(_raw(member, path, json.dumps(body))).startswith(
        f"unknown field(s): {unknown}"
    )
    _no_rows()


def test_unknown_fields_on_decisions_and_hosts(member, pi, admin):
    plan = services.plan_submit(
        plan=services.plan_create(actor=_actor(member), title="p"), actor=_actor(member)
    )
    response = pi.client.post(f"/api/plans/{plan.id}/approve", {"budget": 3}, format="json")
    assert _detail_400(response).startswith("unknown field(s): budget")
    Host.objects.create(name="box", kind="ssh", hostname="10.0.0.1")
    response = admin.client.patch("/api/hosts/box", {"state": "online"}, format="json")
    assert _detail_400(response).startswith("unknown field(s): state")


def test_actions_that_take_no_body_refuse_one_and_change_nothing(member, admin):
    """A rerun with a new `command` would otherwise rerun the old one, silently."""
    Host.objects.create(name="box", kind="ssh", hostname="10.0.0.1")
    run = services.run_create(actor=_actor(member), command="echo old", kick=False)
    for path, body in [
        (f"/api/runs/{run.id}/rerun", {"command": "echo new"}),
        (f"/api/runs/{run.id}/start", {"bogus": 1}),
        (f"/api/runs/{run.id}/stop", {"force": True}),
        ("/api/cluster/detect", {"type": "slurm"}),
    ]:
        response = member.client.post(path, body, format="json")
        assert _detail_400(response).startswith("this action takes no body; unknown field(s)")
    assert _detail_400(admin.client.post("/api/hosts/box/probe", {"x": 1}, format="json"))
    assert Run.objects.count() == 1 and Run.objects.get().status == "ready"
    # What curl sends with no -d, and with -d '{}', is fine.
    assert member.client.post(f"/api/runs/{run.id}/start").status_code == 200
    assert member.client.post(f"/api/runs/{run.id}/stop", {}, format="json").status_code == 200


def test_every_field_the_agent_prompts_send_is_accepted(member):
    """AGENT_API.md: the fields agents send, all at once, are all still taken."""
    HostFactory(name="gpu-a")
    plan = services.plan_create(actor=_actor(member), title="p")
    wild = member.client.post(
        "/api/sweeps/wild",
        {"name": "w", "goal": "g", "chat_session_id": "s1", "plan_id": plan.id},
        format="json",
    )
    assert wild.status_code == 201, wild.content
    run = member.client.post(
        "/api/runs",
        {
            "name": "r",
            "command": "python train.py",
            "sweep_id": wild.json()["id"],
            "chat_session_id": "s1",
            "auto_start": True,
            "gpuwrap_config": {"enabled": True, "retries": -1, "retry_delay_seconds": 30},
            "workdir": "~/p",
            "env": {"WANDB_MODE": "offline"},
            "gpus": 1,
            "min_free_mem_mb": 8000,
            "host": "gpu-a",
            "plan_id": plan.id,
            "priority": 5,
        },
        format="json",
    )
    assert run.status_code == 201, run.content
    grid = member.client.post(
        "/api/sweeps",
        {
            "name": "g",
            "base_command": "python train.py",
            "parameters": {"lr": [0.1, 0.01]},
            "max_runs": 2,
            "goal": "lr",
            "auto_start": True,
        },
        format="json",
    )
    assert grid.status_code == 201, grid.content
    created = member.client.post(
        "/api/plans",
        {"title": "t", "goal": "g", "session_id": None, "raw_markdown": "## Objective\nO\n"},
        format="json",
    )
    assert created.status_code == 201, created.content
    submitted = member.client.post(
        f"/api/plans/{created.json()['id']}/submit", {"comment": "ready"}, format="json"
    )
    assert submitted.status_code == 200, submitted.content


@pytest.mark.parametrize(
    "body", [{"goal": "Beat it", "session_id": "s"}, {"variables": {"goal": "Beat it"}}]
)
def test_render_takes_variables_at_the_top_level_or_under_variables(member, body):
    response = member.client.post("/api/prompt-skills/plan_mode/render", body, format="json")
    assert response.status_code == 200, response.content
    assert "Beat it" in response.json()["rendered"]


# --- Labsite's own environment variables -----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "name"),
    [
        ({"env": {"LABSITE_RUN_ID": "someone-else"}}, "LABSITE_RUN_ID"),
        ({"env": {"LABSITE_ANYTHING": "1"}}, "LABSITE_ANYTHING"),
        ({"gpus": 1, "env": {"CUDA_VISIBLE_DEVICES": "7"}}, "CUDA_VISIBLE_DEVICES"),
        (
            {"gpuwrap_config": {"enabled": True}, "env": {"CUDA_DEVICE_ORDER": "x"}},
            "CUDA_DEVICE_ORDER",
        ),
    ],
)
def test_env_may_not_set_labsite_or_gpu_pinning_variables(member, body, name):
    detail = _detail_400(_raw(member, "/api/runs", json.dumps({**RUN, **body})))
    assert detail.startswith("env") and name in detail
    assert not Run.objects.exists()


def test_a_cpu_run_may_set_cuda_visible_devices(member):
    response = _raw(member, "/api/runs", json.dumps({**RUN, "env": {"CUDA_VISIBLE_DEVICES": ""}}))
    assert response.status_code == 201, response.content


def test_grid_env_is_checked_too(member):
    body = {**GRID, "gpus": 1, "env": {"CUDA_VISIBLE_DEVICES": "0"}}
    assert "CUDA_VISIBLE_DEVICES" in _detail_400(_raw(member, "/api/sweeps", json.dumps(body)))
    _no_rows()


# --- the schema documents the errors -------------------------------------------------------


def _operations(anon):
    schema = anon.get("/api/openapi.json").json()
    return schema, {
        (method, path): op
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
        if method in {"get", "post", "patch", "put", "delete"}
    }


def test_the_schema_documents_the_error_answers(anon):
    schema, ops = _operations(anon)
    error = schema["components"]["schemas"]["Error"]
    assert set(error["properties"]) == {"detail", "errors"} and error["required"] == ["detail"]
    for key, op in ops.items():
        if key == ("get", "/api/health"):
            continue  # authenticates nobody: 200 or 503 (tests/unit/test_health.py)
        assert "401" in op["responses"], key
        assert op["responses"]["401"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
    codes = {key: set(op["responses"]) for key, op in ops.items()}
    assert {"400", "401", "403", "413", "429"} <= codes[("post", "/api/runs")]
    assert {"400", "401", "429"} <= codes[("get", "/api/runs")]
    assert {"401", "404"} <= codes[("get", "/api/runs/{id}")]
    assert "400" not in codes[("get", "/api/runs/{id}")]
    assert {"403", "404", "409"} <= codes[("post", "/api/runs/{id}/start")]
    assert {"400", "403", "404", "409"} <= codes[("post", "/api/plans/{id}/approve")]
    assert "409" in codes[("post", "/api/alerts/{id}/respond")]
    assert "409" in codes[("delete", "/api/hosts/{id}")]
    assert "400" in codes[("get", "/api/wild/v2/events/{session_id}")]
    assert "404" not in codes[("get", "/api/wild/v2/events/{session_id}")]
    assert "403" not in codes[("get", "/api/prompt-skills")]


def test_the_answers_given_are_the_documented_ones(member, other, objects, anon):
    """A small schemathesis: what these requests answer is in their operation's responses."""
    _, ops = _operations(anon)
    run = objects.id
    calls = [
        ("post", "/api/runs", "/api/runs", '{"command": "x", "bogus": 1}'),
        ("post", "/api/runs", "/api/runs", '{"command": "x", "params": {"a": 1e309}}'),
        ("get", "/api/runs", "/api/runs?offset=null", None),
        ("get", "/api/runs/{id}", "/api/runs/ab%00cd", None),
        ("post", "/api/runs/{id}/start", f"/api/runs/{run}/start", None),
        ("post", "/api/runs/{id}/start", f"/api/runs/{run}/start", None),
        ("post", "/api/runs/{id}/stop", f"/api/runs/{run}/stop", None),
        ("get", "/api/runs/{id}/logs", f"/api/runs/{run}/logs?limit=x", None),
        ("get", "/api/wild/v2/events/{session_id}", "/api/wild/v2/events/" + "s" * 300, None),
        ("get", "/api/alerts/{id}", "/api/alerts/" + "9" * 30, None),
    ]
    seen = set()
    for method, template, url, body in calls:
        client = member.client
        if body is None:
            response = getattr(client, method)(url)
        else:
            response = getattr(client, method)(url, body, content_type="application/json")
        assert str(response.status_code) in ops[(method, template)]["responses"], (url, response)
        seen.add(response.status_code)
    forbidden = other.client.post(f"/api/runs/{run}/rerun")
    assert forbidden.status_code == 403
    assert "403" in ops[("post", "/api/runs/{id}/rerun")]["responses"]
    assert {400, 404, 409} <= seen


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("/?sweep_id=ab%00cd", "Null characters"),
        ("/?host=" + "h" * 300, "at most 200 characters"),
        ("/?status=bogus", "unknown status bogus"),
        ("/plans?status=bogus", "unknown status bogus"),
    ],
)
def test_pages_show_filter_values_that_cannot_match(client, member, path, needle):
    client.force_login(member.user)
    response = client.get(path)
    assert response.status_code == 200
    assert needle in response.content.decode()


@pytest.mark.parametrize("field", ["plan", "sweep", "host"])
def test_the_run_form_refuses_keys_no_object_can_have(client, member, field):
    client.force_login(member.user)
    response = client.post("/runs/new", {"command": "x", "gpus": "0", field: "ab\x00cd"})
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    assert not Run.objects.exists()


def test_a_number_where_text_belongs_is_refused(member):
    """schemathesis (ST201): DRF's CharField took `"workdir": 0` and stored "0"."""
    from experiments.models import Run

    for field in ("workdir", "name", "command"):
        body = {"command": "true", field: 0}
        response = member.client.post("/api/runs", body, format="json")
        assert response.status_code == 400, (field, response.content)
        assert "must be a string" in response.json()["detail"]
    assert not Run.objects.exists()
    plan = member.client.post("/api/plans", {"title": "t", "raw_markdown": 7}, format="json")
    assert plan.status_code == 400
