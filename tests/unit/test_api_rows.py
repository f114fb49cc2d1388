"""The fast reads (experiments.api.rows) answer exactly what the serializers answer: same keys,
same order, same values, for runs that use every field."""

from __future__ import annotations

import json
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
    return json.loads(json.dumps(data))


def test_list_rows_are_the_list_serializers(runs):
    queryset = Run.objects.order_by("-created_at", "id")
    expected = RunListSerializer(
        selectors.run_summaries(selectors.runs_list()).order_by("-created_at", "id"), many=True
    ).data
    got = rows.run_rows(queryset, summary=True)
    assert len(got) == 3
    assert as_json(got) == as_json(expected)
    assert [list(r) for r in got] == [list(r) for r in expected], "the same keys, in order"
    long = next(r for r in got if r["name"] == "long")
    assert long["command_truncated"] is True and len(long["command"]) == 40
    assert long["env"]["WANDB_API_KEY"] == "********"
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
    # the token, the count, the page, its leases
    assert len(ctx.captured_queries) <= 4, [q["sql"][:80] for q in ctx.captured_queries]


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


def test_system_health_is_read_at_most_once_a_second_per_process(member, settings, monkeypatch):
    from experiments import selectors

    settings.LABSITE = {**settings.LABSITE, "HEALTH_CACHE_SECONDS": 1.0}
    monkeypatch.setattr(selectors, "_health_cache", None)
    clock = [1000.0]
    monkeypatch.setattr(selectors.time, "monotonic", lambda: clock[0])
    first = member.client.get("/api/wild/v2/system-health").json()
    services.run_create(actor=Actor(kind="user", user=member.user), command="x", kick=False)
    with CaptureQueriesContext(connection) as ctx:
        again = member.client.get("/api/wild/v2/system-health").json()
    assert again == first and not [q for q in ctx.captured_queries if "experiments_run" in q["sql"]]
    clock[0] += 1.01
    fresh = member.client.get("/api/wild/v2/system-health").json()
    assert fresh["total"] == first["total"] + 1


def test_the_unfiltered_page_is_the_filtered_paths(runs, member):
    """`GET /runs?limit=&offset=` without filters reads compiled queries: the same rows as
    the ORM path, page by page, with the same count and links."""
    ordered = Run.objects.order_by("-created_at")
    for limit, offset in [(100, 0), (2, 0), (2, 1), (1, 2), (5, 10)]:
        expected = rows.run_rows(ordered[offset : offset + limit], summary=True)
        assert rows.unfiltered_page(limit=limit, offset=offset) == expected
    assert rows.run_count() == Run.objects.count() == 3
    fast = member.client.get("/api/runs?limit=2&offset=1").json()
    filtered = member.client.get("/api/runs?limit=2&offset=1&status=").json()
    assert (fast["count"], fast["results"]) == (filtered["count"], filtered["results"])
    assert fast["previous"] == "http://testserver/api/runs?limit=2"
    assert fast["next"] is None and len(fast["results"]) == 2
