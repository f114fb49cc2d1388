"""Lab-wide limits on what one request may ask, and grids expanded in bulk (issue 9, item 3)."""

from __future__ import annotations

import json
import math
import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from experiments.models import Run, RunEvent, Sweep
from labsite.api import exception_handler


def _lab(settings, **limits) -> None:
    settings.LABSITE = {**settings.LABSITE, **limits}


def _post(person, path, body):
    return person.client.post(path, body, format="json")


def _grid(person, parameters, **body):
    return _post(
        person,
        "/api/sweeps",
        {"name": "g", "base_command": "python train.py", "parameters": parameters, **body},
    )


def _refused(response, *needles: str) -> str:
    assert response.status_code == 400, response.content
    detail = response.json()["detail"]
    for needle in needles:
        assert needle in detail, detail
    return str(detail)


def _nothing_created() -> None:
    assert not Sweep.objects.exists()
    assert not Run.objects.exists() and not RunEvent.objects.exists()


# --- grid size -----------------------------------------------------------------------------


def test_a_grid_over_the_lab_limit_is_refused_before_it_is_expanded(member):
    """GIVEN no max_runs from the caller WHEN a 200 x 200 grid is posted THEN 400 at once,
    naming the size and the setting (it used to create every run: 10,000 took 18.3 s)."""
    started = time.monotonic()
    response = _grid(member, {"a": list(range(200)), "b": list(range(200))})
    elapsed = time.monotonic() - started
    detail = _refused(response)
    assert detail == (
        "parameters: the grid has 40000 points; this lab allows at most 1000 per sweep "
        "(LABSITE_MAX_GRID_POINTS)"
    )
    assert elapsed < 1.0
    _nothing_created()


def test_the_grid_limit_follows_the_setting(member, settings):
    _lab(settings, MAX_GRID_POINTS=10)
    _refused(
        _grid(member, {"a": [1, 2, 3, 4], "b": [1, 2, 3]}),
        "12 points",
        "at most 10",
        "LABSITE_MAX_GRID_POINTS",
    )
    _nothing_created()
    assert _grid(member, {"a": [1, 2], "b": [1, 2, 3, 4, 5]}).status_code == 201


def test_runs_per_request_is_a_limit_of_its_own(member, settings):
    _lab(settings, MAX_RUNS_PER_REQUEST=5)
    _refused(
        _grid(member, {"a": [1, 2, 3], "b": [1, 2]}), "6 points", "LABSITE_MAX_RUNS_PER_REQUEST"
    )
    _nothing_created()


# --- text and env sizes ----------------------------------------------------------------------


def test_a_command_over_the_limit_is_refused(member, settings):
    _lab(settings, MAX_COMMAND_LENGTH=1000)
    _refused(
        _post(member, "/api/runs", {"command": "x" * 1001}),
        "command",
        "1001 characters",
        "LABSITE_MAX_COMMAND_LENGTH",
    )
    _refused(
        _grid(member, {"a": [1]}, base_command="y" * 1001),
        "base_command",
        "LABSITE_MAX_COMMAND_LENGTH",
    )
    _nothing_created()
    assert _post(member, "/api/runs", {"command": "x" * 1000}).status_code == 201


def test_the_default_command_limit_stops_megabyte_commands(member):
    """A 2.4 MB command was accepted; the default limit is 32768 characters."""
    _refused(
        _post(member, "/api/runs", {"command": "echo " + "a" * 40_000}),
        "LABSITE_MAX_COMMAND_LENGTH",
    )
    assert not Run.objects.exists()


def test_grid_commands_that_grow_past_the_limit_are_refused(member, settings):
    _lab(settings, MAX_COMMAND_LENGTH=40)
    _refused(
        _grid(member, {"tag": ["short", "x" * 40]}, base_command="python t.py"),
        "base_command: grid point 1",
        "LABSITE_MAX_COMMAND_LENGTH",
    )
    _nothing_created()


def test_a_name_over_the_limit_is_refused_not_cut(member, settings):
    _refused(
        _post(member, "/api/runs", {"command": "x", "name": "n" * 201}), "LABSITE_MAX_NAME_LENGTH"
    )
    _lab(settings, MAX_NAME_LENGTH=10)
    _refused(_post(member, "/api/runs", {"command": "x", "name": "n" * 11}), "name", "at most 10")
    _refused(_post(member, "/api/sweeps/wild", {"name": "n" * 11}), "LABSITE_MAX_NAME_LENGTH")
    _refused(_grid(member, {"a": [1]}, name="n" * 11), "LABSITE_MAX_NAME_LENGTH")
    _nothing_created()
    assert _post(member, "/api/runs", {"command": "x", "name": "n" * 10}).status_code == 201


def test_env_size_is_bounded_in_count_and_bytes(member, settings):
    many = {f"V{i}": "1" for i in range(201)}
    _refused(
        _post(member, "/api/runs", {"command": "x", "env": many}),
        "env",
        "env: has 201 variables",
        "LABSITE_MAX_ENV_VARS",
    )
    _refused(
        _post(member, "/api/runs", {"command": "x", "env": {"BIG": "v" * 70_000}}),
        "env",
        "LABSITE_MAX_ENV_BYTES",
    )
    _lab(settings, MAX_ENV_BYTES=20)
    _refused(
        _grid(member, {"a": [1]}, env={"A": "1234567890", "B": "1234567890"}),
        "env: is 24 bytes",
        "LABSITE_MAX_ENV_BYTES",
    )
    _nothing_created()


# --- JSON depth and body size --------------------------------------------------------------


def _nested(depth: int) -> dict:
    """A run body whose containers nest `depth` levels deep in all (the body is level 1)."""
    inner: dict = {}
    for _ in range(depth - 2):
        inner = {"k": inner}
    return {"command": "x", "params": inner}


def test_json_deeper_than_the_limit_is_refused(member):
    ok = member.client.post("/api/runs", json.dumps(_nested(32)), content_type="application/json")
    assert ok.status_code == 201, ok.content
    deep = member.client.post("/api/runs", json.dumps(_nested(33)), content_type="application/json")
    _refused(deep, "nested deeper than 32", "LABSITE_MAX_JSON_DEPTH")
    assert Run.objects.count() == 1


def test_a_body_over_the_limit_is_a_json_413(member):
    body = json.dumps({"command": "echo " + "a" * (2 * 2**20)})
    response = member.client.post("/api/runs", body, content_type="application/json")
    assert response.status_code == 413, response.content[:300]
    assert response["Content-Type"].startswith("application/json")
    assert "LABSITE_MAX_BODY_BYTES" in response.json()["detail"]
    assert not Run.objects.exists()


def test_django_s_own_body_check_is_a_json_413_too():
    """Django raises RequestDataTooBig where request.body is read past
    DATA_UPLOAD_MAX_MEMORY_SIZE; the API answers it as JSON, not as its HTML 400 page."""
    from django.core.exceptions import RequestDataTooBig

    response = exception_handler(RequestDataTooBig("too big"), {})
    assert response is not None and response.status_code == 413
    assert "LABSITE_MAX_BODY_BYTES" in response.data["detail"]


# --- list rows carry a bounded summary of the command ----------------------------------------


def test_lists_show_the_head_of_long_commands_and_detail_shows_all(member, settings):
    _lab(settings, LIST_COMMAND_CHARS=100)
    long_command = "python train.py " + "--flag=" + "z" * 5000
    long_id = _post(member, "/api/runs", {"command": long_command}).json()["id"]
    short_id = _post(member, "/api/runs", {"command": "echo hi"}).json()["id"]

    rows = {r["id"]: r for r in member.client.get("/api/runs").json()["results"]}
    assert rows[long_id]["command"] == long_command[:100]
    assert rows[long_id]["command_truncated"] is True
    assert rows[short_id]["command"] == "echo hi" and rows[short_id]["command_truncated"] is False

    detail = member.client.get(f"/api/runs/{long_id}").json()
    assert detail["command"] == long_command and "command_truncated" not in detail


def test_params_and_grids_are_bounded_by_the_lab(member):
    """Lists show params whole, so they are bounded: 1.9 MB of params in five runs made a
    runs page of 9.6 MB. The default limit is 16 KiB of JSON."""
    big = {"blob": "x" * 20000}
    _refused(
        _post(member, "/api/runs", {"command": "true", "params": big}),
        "params",
        "LABSITE_MAX_PARAMS_BYTES",
    )
    _refused(_grid(member, {"blob": ["x" * 20000]}), "parameters", "LABSITE_MAX_PARAMS_BYTES")
    _nothing_created()
    fine = _post(member, "/api/runs", {"command": "true", "params": {"lr": 0.1, "tag": "y" * 9000}})
    assert fine.status_code == 201, fine.content


def test_plan_lists_show_the_head_of_long_markdown(member, settings):
    _lab(settings, LIST_COMMAND_CHARS=80)
    body = "## Objective\n" + "g" * 3000 + "\n\n## Approach\n" + "m" * 3000
    plan_id = _post(member, "/api/plans", {"title": "t", "raw_markdown": body}).json()["id"]
    (row,) = member.client.get("/api/plans").json()["results"]
    assert row["raw_markdown"] == body[:80] and row["raw_markdown_truncated"] is True
    assert row["sections"] and all(len(text) <= 80 for text in row["sections"].values())
    detail = member.client.get(f"/api/plans/{plan_id}").json()
    assert detail["raw_markdown"] == body
    assert max(len(text) for text in detail["sections"].values()) >= 3000


def test_sweep_run_rows_are_summaries_too(member, settings):
    _lab(settings, LIST_COMMAND_CHARS=50)
    response = _grid(member, {"tag": ["a", "b"]}, base_command="python train.py " + "q" * 200)
    assert response.status_code == 201, response.content
    for body in (response.json(), member.client.get(f"/api/sweeps/{response.json()['id']}").json()):
        assert len(body["runs"]) == 2
        for row in body["runs"]:
            assert len(row["command"]) == 50 and row["command_truncated"] is True
    full = Run.objects.filter(sweep_id=response.json()["id"]).first()
    assert member.client.get(f"/api/runs/{full.id}").json()["command"] == full.command


def test_the_default_runs_page_stays_small(member):
    """Ten runs with commands at the lab's limit used to make a page of megabytes."""
    for _ in range(10):
        assert _post(member, "/api/runs", {"command": "x" * 32_768}).status_code == 201
    page = member.client.get("/api/runs")
    assert page.status_code == 200 and page.json()["count"] == 10
    assert len(page.content) < 20_000


# --- grids are bulk inserts ----------------------------------------------------------------


def test_a_1000_run_grid_is_quick_and_audited(member):
    started = time.monotonic()
    response = _grid(
        member, {"a": list(range(10)), "b": list(range(10)), "c": list(range(10))}, auto_start=True
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 201, response.content[:300]
    body = response.json()
    assert len(body["runs"]) == 1000 and body["status"] == "queued"
    assert elapsed < 3.0, f"a 1,000-run grid took {elapsed:.2f} s"
    runs = Run.objects.filter(sweep_id=body["id"])
    assert runs.count() == 1000 and {r.status for r in runs} == {"queued"}
    events = RunEvent.objects.filter(run__sweep_id=body["id"])
    assert events.count() == 1000
    assert set(events.values_list("reason", "to_status", "actor_user")) == {
        ("created", "queued", member.user.id)
    }
    # Grid order survives one INSERT: the rows come back as the points were given.
    points = [(r["params"]["a"], r["params"]["b"], r["params"]["c"]) for r in body["runs"]]
    assert points == sorted(points)


def _insert_statements(model: type, rows: int) -> int:
    """How many INSERTs the backend splits `rows` into (SQLite caps a statement at 999
    variables; PostgreSQL takes all rows in one)."""
    fields = [f for f in model._meta.concrete_fields if not (f.primary_key and f.auto_created)]
    batch = connection.ops.bulk_batch_size(fields, [None] * rows) or rows
    return math.ceil(rows / batch)


def _grid_queries(person, size: int) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = _grid(person, {"a": list(range(size))}, auto_start=True)
    assert response.status_code == 201 and len(response.json()["runs"]) == size
    return len(queries.captured_queries)


def test_grid_queries_do_not_grow_with_its_runs(member):
    """GIVEN grids of 10 and 100 points WHEN each is created THEN the queries are the same,
    but for the backend splitting one bulk INSERT into several (SQLite, not PostgreSQL)."""
    member.client.get("/api/runs")  # the token's last_used_at write, once
    ten, hundred = _grid_queries(member, 10), _grid_queries(member, 100)
    split = sum(_insert_statements(m, 100) - _insert_statements(m, 10) for m in (Run, RunEvent))
    assert hundred - ten == split
    if connection.vendor == "postgresql":
        assert hundred == ten
    assert ten <= 20


def test_the_form_shows_a_command_over_the_limit(client, member, settings):
    _lab(settings, MAX_COMMAND_LENGTH=100)
    client.force_login(member.user)
    response = client.post(reverse("run_new"), {"command": "x" * 101, "gpus": "0"})
    assert response.status_code == 200
    assert "LABSITE_MAX_COMMAND_LENGTH" in response.content.decode()
    assert not Run.objects.exists()


@pytest.mark.parametrize("limit", ["MAX_GRID_POINTS", "MAX_RUNS_PER_REQUEST"])
def test_grid_limits_at_their_edge_are_fine(member, settings, limit):
    _lab(settings, **{limit: 6})
    assert _grid(member, {"a": [1, 2, 3], "b": [1, 2]}).status_code == 201
