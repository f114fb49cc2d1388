"""Single-node Slurm (private munged + slurmctld + slurmd): fixtures; every test here is `slurm`-marked."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.slurm import SlurmCluster, SlurmError, missing_prerequisites

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One cluster for the session (node localhost with 8 CPUs, partitions gpu and short, 4
    fake GPUs).

    While it lives, SLURM_CONF in this process points at it, so the app's own `sinfo`
    (clusters.services.slurm_detect) talks to it; the previous value is restored after.
    """
    problems = missing_prerequisites()
    if problems:
        pytest.fail("Slurm test cluster unavailable: " + "; ".join(problems), pytrace=False)
    try:
        cluster = SlurmCluster(cpus=8).start()
    except SlurmError as e:
        pytest.fail(f"Slurm test cluster did not start: {e}", pytrace=False)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf_path)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.close()
