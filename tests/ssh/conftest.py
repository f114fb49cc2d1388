"""SSH test hosts (network namespaces + private sshd): fixtures; every test here is `ssh`-marked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.sshhosts import SshLab, missing_prerequisites

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.ssh)


def _require() -> None:
    problems = missing_prerequisites()
    if problems:
        pytest.fail("SSH test hosts unavailable: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def ssh_lab() -> Iterator[SshLab]:
    """Two hosts (lshost1, lshost2) shared by the whole session: do not break them."""
    _require()
    with SshLab(n_hosts=2) as lab:
        yield lab


@pytest.fixture
def fresh_lab() -> Iterator[Callable[..., SshLab]]:
    """Factory: ``lab = fresh_lab(n_hosts=1)``; a private lab torn down after the test."""
    _require()
    labs: list[SshLab] = []

    def make(n_hosts: int = 1, **kwargs: object) -> SshLab:
        lab = SshLab(n_hosts=n_hosts, **kwargs)  # type: ignore[arg-type]
        labs.append(lab)
        return lab.start()

    yield make
    errors = []
    for lab in reversed(labs):
        try:
            lab.close()
        except Exception as e:  # noqa: BLE001 - close every lab, then report
            errors.append(str(e))
    if errors:
        pytest.fail("; ".join(errors), pytrace=False)
