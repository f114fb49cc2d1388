"""factory-boy factories for the lab's objects."""

from __future__ import annotations

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from clusters.models import Gpu, Host
from experiments.models import Plan, Run, Sweep


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("pw-for-tests-only")


class HostFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Host

    name = factory.Sequence(lambda n: f"gpu-node-{n}")
    kind = "ssh"
    hostname = factory.Sequence(lambda n: f"10.200.0.{10 + n}")
    username = "lab"


class GpuFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Gpu

    host = factory.SubFactory(HostFactory)
    uuid = factory.Sequence(lambda n: f"GPU-{n:08x}-0000-4000-8000-000000000000")
    index = factory.Sequence(lambda n: n % 8)
    name = "NVIDIA A100-SXM4-80GB"
    memory_total_mb = 81920
    memory_used_mb = 4
    utilization_pct = 0
    updated_at = factory.LazyFunction(timezone.now)


class PlanFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Plan

    title = factory.Sequence(lambda n: f"Plan {n}")
    author = factory.SubFactory(UserFactory)


class SweepFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Sweep

    name = factory.Sequence(lambda n: f"sweep-{n}")
    created_by = factory.SubFactory(UserFactory)


class RunFactory(factory.django.DjangoModelFactory):
    """A run row as it would be after creation; use services to move it."""

    class Meta:
        model = Run

    name = factory.Sequence(lambda n: f"run-{n}")
    command = "python train.py"
    created_by = factory.SubFactory(UserFactory)
