"""The fast reads (experiments.api.rows) answer exactly what the serializers answer: same keys,
same order, same values, for runs that use every field."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from experiments import selectors, services
from experiments.actors import Actor
from experiments.api import rows
from experiments.api.serializers import RunListSerializer, RunSerializer
from experiments.models import GpuLease, Run
from tests.factories import GpuFactory, HostFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def runs(member, settings):
    settings.LABSITE = {**settings.LABSITE, "LIST_COMMAND_CHARS": 40}
    actor = Actor(kind="user", user=member.user)
    host = HostFactory(name="gpu-a")
    gpus = [GpuFactory(host=host, index=i) for i in range(3)]
    plan = services.plan_create(actor=actor, title="p")
    sweep = services.sweep_create_wild(actor=actor, name="w", goal="g", plan=plan)
    made = [
        services.run_create(
            actor=actor,
            command="python train.py " + "--flag " * 30,
            name="long",
            env={"WANDB_API_KEY": "secret", "MODE": "x"},
            params={"lr": 0.001, "tag": "ü"},
            gpus=2,
            host=host,
            plan=plan,
            sweep=sweep,
            cpus=4,
            memory_mb=2048,
            auto_start=True,
            kick=False,
        ),
        services.run_create(actor=actor, command="echo short", kick=False),
    ]
    long, short = made
    GpuLease.objects.create(gpu=gpus[2], run=long)
    GpuLease.objects.create(gpu=gpus[0], run=long)
    GpuLease.objects.create(gpu=gpus[1], run=long, released_at=timezone.now())
    now = timezone.now()
    Run.objects.filter(pk=long.pk).update(
        status="running",
        started_at=now,
        launched_at=now - timedelta(seconds=1),
        stop_requested_at=now,
        pid=4242,
        metrics_latest={"loss": 0.25, "step": 7},
        log_size=123,
    )
    services.run_rerun(run=Run.objects.get(pk=short.pk), actor=actor)
    return made


def as_json(data) -> list:
    """What the API sends: through its renderer (the rows hold stored JSON as orjson
    fragments and times as datetimes, which only the renderer writes)."""
    from labsite.renderers import FastJSONRenderer

    return json.loads(FastJSONRenderer().render(data))


def test_list_rows_are_the_list_serializers(runs):
    queryset = Run.objects.order_by("-created_at", "id")
    expected = RunListSerializer(
        selectors.run_summaries(selectors.runs_list()).order_by("-created_at", "id"), many=True
    ).data
    got = rows.run_rows(queryset, summary=True)
    assert len(got) == 3
    assert as_json(got) == as_json(expected)
    assert [list(r) for r in got] == [list(r) for r in expected], "the same keys, in order"
    long = next(r for r in as_json(got) if r["name"] == "long")
    assert long["command_truncated"] is True and len(long["command"]) == 40
    assert long["env"]["WANDB_API_KEY"] == "********"
    assert long["params"] == {"lr": 0.001, "tag": "ü"}
    assert long["leased_gpus"] == [
        {"index": 2, "uuid": long["leased_gpus"][0]["uuid"]},
        {"index": 0, "uuid": long["leased_gpus"][1]["uuid"]},
    ]


def test_a_whole_run_is_the_serializers(runs):
    for run in Run.objects.all():
        expected = RunSerializer(selectors.runs_list().get(pk=run.pk)).data
        (got,) = rows.run_rows(Run.objects.filter(pk=run.pk), summary=False)
        assert as_json(got) == as_json(expected)
        assert list(got) == list(expected)


def test_the_api_answers_with_them_in_a_fixed_number_of_queries(runs, member):
    listed = member.client.get("/api/runs?limit=2")
    assert listed.status_code == 200
    body = listed.json()
    assert body["count"] == 3 and len(body["results"]) == 2 and body["next"]
    one = member.client.get(f"/api/runs/{runs[0].id}").json()
    assert one["command"] == Run.objects.get(pk=runs[0].pk).command
    assert member.client.get("/api/runs/nope").status_code == 404
    with CaptureQueriesContext(connection) as ctx:
        member.client.get("/api/runs?limit=100")
    # the token, the page (with the run tally), its leases
    assert len(ctx.captured_queries) == 3, [q["sql"][:80] for q in ctx.captured_queries]
    with CaptureQueriesContext(connection) as ctx:
        member.client.get(f"/api/runs/{runs[0].id}")
    # the token, the run with its leases
    assert len(ctx.captured_queries) == 2, [q["sql"][:80] for q in ctx.captured_queries]


def test_the_fast_renderer_writes_what_drfs_writes():
    """The same bytes as DRF's JSONRenderer for what the API answers (times in UTC as Z,
    non-ASCII as UTF-8, compact), and DRF's own output for what orjson cannot take."""
    from decimal import Decimal

    from rest_framework.renderers import JSONRenderer

    from labsite.renderers import FastJSONRenderer

    now = timezone.now()
    data = {"at": now, "day": now.date(), "name": "ü–x", "n": [1, 2.5, None, True], "d": {}}
    assert FastJSONRenderer().render(data) == JSONRenderer().render(data)
    odd = {"price": Decimal("1.50"), "wait": timedelta(seconds=3)}
    assert FastJSONRenderer().render(odd) == JSONRenderer().render(odd)
    assert FastJSONRenderer().render(None) == b""


@pytest.mark.django_db(transaction=True)  # the refresh thread reads on a connection of its own
def test_system_health_is_read_at_most_once_a_second_per_process(member, settings, monkeypatch):
    """Within its age the answer costs no query; past it (and for as long again) it is still
    given while a thread reads it again; older, it is read before answering."""
    from experiments import selectors

    settings.LABSITE = {**settings.LABSITE, "HEALTH_CACHE_SECONDS": 1.0}
    monkeypatch.setattr(selectors, "_health_cache", None)
    clock = [1000.0]
    monkeypatch.setattr(selectors.time, "monotonic", lambda: clock[0])
    actor = Actor(kind="user", user=member.user)

    def health() -> dict:
        return member.client.get("/api/wild/v2/system-health").json()

    first = health()
    services.run_create(actor=actor, command="x", kick=False)
    with CaptureQueriesContext(connection) as ctx:
        again = health()
    assert again == first and not [q for q in ctx.captured_queries if "experiments_run" in q["sql"]]
    clock[0] += 1.01
    with CaptureQueriesContext(connection) as ctx:
        stale = health()
    assert stale == first, "answered at once, from what it had"
    assert not [q for q in ctx.captured_queries if "experiments_run" in q["sql"]]
    deadline = time.perf_counter() + 10  # time.monotonic is the test's clock
    while selectors._health_refresh.locked():
        assert time.perf_counter() < deadline, "the refresh never ended"
        time.sleep(0.01)
    assert health()["total"] == first["total"] + 1, "the thread's fresh read"
    services.run_create(actor=actor, command="y", kick=False)
    clock[0] += 5  # nobody asked for longer than twice its age: read before answering
    assert health()["total"] == first["total"] + 2


def test_the_unfiltered_page_is_the_filtered_paths(runs, member):
    """`GET /runs?limit=&offset=` without filters reads compiled queries: the same rows as
    the ORM path, page by page, with the same count and links."""
    ordered = Run.objects.order_by("-created_at")
    for limit, offset in [(100, 0), (2, 0), (2, 1), (1, 2), (5, 10)]:
        expected = rows.run_rows(ordered[offset : offset + limit], summary=True)
        count, page = rows.unfiltered_page(limit=limit, offset=offset)
        assert count == 3 and as_json(page) == as_json(expected)
        assert [list(r) for r in page] == [list(r) for r in expected]
    assert rows.run_count() == Run.objects.count() == 3
    fast = member.client.get("/api/runs?limit=2&offset=1").json()
    filtered = member.client.get("/api/runs?limit=2&offset=1&status=").json()
    assert (fast["count"], fast["results"]) == (filtered["count"], filtered["results"])
    assert fast["previous"] == "http://testserver/api/runs?limit=2"
    assert fast["next"] is None and len(fast["results"]) == 2


def test_the_run_tally_follows_every_insert_and_delete(member):
    """The list's `count` is the tally the triggers keep: runs made one by one and in bulk (a
    sweep), deleted one by one, in bulk and by cascade, and a flush that empties both."""
    from django.contrib.auth import get_user_model

    from experiments.models import RunTally

    actor = Actor(kind="user", user=member.user)

    def listed() -> int:
        return member.client.get("/api/runs?limit=1").json()["count"]

    assert listed() == Run.objects.count() == 0
    services.run_create(actor=actor, command="echo 1", kick=False)
    services.sweep_create_grid(
        actor=actor, name="grid", base_command="echo", parameters={"x": [1, 2, 3]}
    )
    assert listed() == Run.objects.count() == 4
    Run.objects.filter(pk=Run.objects.order_by("created_at").first().pk).delete()
    assert listed() == Run.objects.count() == 3
    other = get_user_model().objects.create(username="gone")
    Run.objects.bulk_create(Run(command=f"x{i}", created_by=other) for i in range(5))
    assert listed() == 8
    Run.objects.filter(created_by=other).delete()
    assert listed() == Run.objects.count() == 3
    RunTally.objects.all().delete()  # as a flush leaves it: no row, no runs
    Run.objects.all().delete()
    assert listed() == 0 == Run.objects.count()
    services.run_create(actor=actor, command="echo again", kick=False)
    assert listed() == 1 and RunTally.objects.get().runs == 1


def test_a_long_series_is_downsampled_in_the_database_keeping_its_extremes(member):
    """A 30,000-point series comes back as at most 2,000 points, its first and last exact, its
    spike and its dip kept; a short series beside it comes back whole."""
    from experiments.models import Metric

    run = services.run_create(
        actor=Actor(kind="user", user=member.user), command="train", kick=False
    )
    n = 30_000
    rows = []
    for i in range(n):
        value = 1.0 / (i + 1)
        if i == 12_345:
            value = 99.0  # a spike
        if i == 23_456:
            value = -5.0  # a dip
        rows.append(Metric(run=run, key="loss", step=i, value=value, seq=2 * i))
        if i % 1000 == 0:
            rows.append(Metric(run=run, key="acc", step=i, value=i / n, seq=2 * i + 1))
    Metric.objects.bulk_create(rows, batch_size=5000)
    with CaptureQueriesContext(connection) as ctx:
        body = member.client.get(f"/api/runs/{run.id}/metrics").json()
    loss = body["series"]["loss"]
    assert len(loss) <= 2000
    assert loss[0] == {"step": 0, "value": 1.0}
    assert loss[-1] == {"step": n - 1, "value": 1.0 / n}
    assert max(p["value"] for p in loss) == 99.0 and min(p["value"] for p in loss) == -5.0
    steps = [p["step"] for p in loss]
    assert steps == sorted(steps)
    assert [p["step"] for p in body["series"]["acc"]] == list(range(0, n, 1000))
    assert len(ctx.captured_queries) <= 8, [q["sql"][:80] for q in ctx.captured_queries]


def test_a_filter_no_run_can_match_is_an_empty_page(runs):
    assert rows.run_rows(Run.objects.filter(pk__in=[]), summary=True) == []
    assert rows.run_rows(Run.objects.none(), summary=False) == []
