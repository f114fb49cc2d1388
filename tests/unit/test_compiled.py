"""Compiled querysets (labsite.compiled) give what the ORM gives: the same instances with the
same values (times aware, on SQLite as on PostgreSQL), and the token lookup every API request
makes still refuses what it refused."""

from __future__ import annotations

import pytest
from django.utils import timezone

from labsite.auth import TOKEN_LOOKUP
from labsite.compiled import Compiled
from labsite.models import ApiToken, hash_token
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def fields(obj) -> dict:
    return {f.attname: getattr(obj, f.attname) for f in obj._meta.concrete_fields}


def test_the_token_lookup_is_the_orms():
    user = UserFactory(username="erin", email="e@example.org")
    user.last_login = timezone.now()
    user.save()
    token, raw = ApiToken.issue(user, name="laptop")
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    (fast,) = TOKEN_LOOKUP.instances(hash_token(raw))
    orm = ApiToken.objects.select_related("user").get(pk=token.pk)
    assert fields(fast) == fields(orm)
    assert fields(fast.user) == fields(orm.user)
    assert fast.last_used_at.tzinfo is not None and fast.user.last_login.tzinfo is not None
    assert fast.user.username == "erin" and fast.user_id == user.pk


def test_unknown_and_revoked_tokens_are_not_found_and_answer_401(member, anon):
    token, raw = ApiToken.issue(member.user)
    assert TOKEN_LOOKUP.instances(hash_token("lab_nope")) == []
    assert anon.get("/api/runs", HTTP_X_AUTH_TOKEN=raw).status_code == 200
    ApiToken.objects.filter(pk=token.pk).update(revoked=True)
    assert TOKEN_LOOKUP.instances(hash_token(raw)) == []
    assert anon.get("/api/runs", HTTP_X_AUTH_TOKEN=raw).status_code == 401
    member.user.is_active = False
    member.user.save()
    assert member.client.get("/api/runs").status_code == 401


def test_a_compiled_values_query_converts_as_the_orm_does():
    users = [UserFactory(username=f"u{i}") for i in range(3)]
    query = Compiled(
        lambda name: ApiToken.objects.filter(user__username=name).values_list(
            "id", "created_at", "user__date_joined"
        ),
        arity=1,
    )
    for user in users:
        ApiToken.issue(user)
    for user in users:
        assert query.rows(user.username) == list(
            ApiToken.objects.filter(user__username=user.username).values_list(
                "id", "created_at", "user__date_joined"
            )
        )


def test_a_null_foreign_key_through_select_related_is_none_as_in_the_orm():
    from experiments.models import Run
    from tests.factories import HostFactory, RunFactory

    placed = RunFactory(host=HostFactory(name="node-z"))
    unplaced = RunFactory()
    query = Compiled(lambda pk: Run.objects.select_related("host").filter(pk=pk), arity=1)
    (fast,) = query.instances(unplaced.pk)
    assert fast.host_id is None and fast.host is None
    (fast,) = query.instances(placed.pk)
    orm = Run.objects.select_related("host").get(pk=placed.pk)
    assert fields(fast) == fields(orm) and fields(fast.host) == fields(orm.host)
    assert query.instances("nope") == []


def test_the_schedulers_compiled_reads_are_the_orms(member):
    """The queue heads and what a pass reads of the lab (experiments.scheduler, .capacity)."""
    from datetime import timedelta

    from experiments import capacity, scheduler
    from experiments.models import Run
    from tests.factories import GpuFactory, HostFactory, RunFactory

    a = HostFactory(name="node-a", state="online", cpu_slots=8, gpu_source="nvidia-smi")
    b = HostFactory(name="node-b", state="online", cpu_count=4, memory_mb=2000)
    HostFactory(name="node-off", state="online", enabled=False)
    HostFactory(name="node-key", state="key_mismatch")
    gpus = [
        GpuFactory(host=a, index=i, processes=[{"pid": 7, "run_id": ""}] * (i % 2))
        for i in range(3)
    ]
    now = timezone.now()
    for i in range(80):  # ties in priority and queued_at: the id decides
        RunFactory(
            status="queued",
            gpus=i % 2,
            priority=i % 3,
            queued_at=now - timedelta(seconds=i // 4),
            created_by=member.user,
            gpuwrap_config={"retries": i % 5, "retry_delay_seconds": 1.5} if i % 4 else {},
        )
    RunFactory(status="running", host=a, cpus=3, memory_mb=100, created_by=member.user)
    RunFactory(status="launching", host=b, cpus=2, created_by=member.user)
    RunFactory(status="succeeded", host=b, cpus=9, created_by=member.user)
    from experiments.models import GpuLease

    GpuLease.objects.create(gpu=gpus[2], run=Run.objects.filter(status="running").get())
    for (gpu, size), compiled in scheduler._HEADS.items():
        orm = list(scheduler._queue(gpu=gpu)[:size])
        assert compiled.rows() == orm and len(orm) == min(size, 40)
    # The walk past the first page (through the ORM) goes on where the compiled page ended.
    walked = [r.id for r in scheduler._head_first(gpu=False, first=scheduler.QUICK_FIRST)]
    assert walked == [row[0] for row in scheduler._queue(gpu=False)]
    for compiled, orm in [
        (
            capacity._HOSTS,
            capacity.enabled_hosts().values_list(
                "id", "name", "gpu_source", "cpu_slots", "cpu_count", "memory_mb"
            ),
        ),
        (
            capacity._GPU_SIZES,
            capacity.Gpu.objects.filter(
                host__in=capacity.enabled_hosts(), present=True
            ).values_list("host_id", "host__name", "memory_total_mb"),
        ),
    ]:
        assert sorted(compiled.rows()) == sorted(orm) and compiled.rows()
    lab = capacity.Capacity.load(per_user=False)
    assert lab.cpu_room == {a.pk: (5, None), b.pk: (2, 2000)}
    # GPU 1 runs a foreign process, GPU 2 is leased: only GPU 0 is free.
    assert [(g.id, g.index) for g in lab.free[a.pk]] == [(gpus[0].id, 0)]
