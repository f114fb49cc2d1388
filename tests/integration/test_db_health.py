"""The PostgreSQL backend's health check (labsite/db/postgresql/base.py): no round trip while
the server has said nothing, and a connection the server ended is found and replaced before a
request's first query fails on it."""

from __future__ import annotations

import select
import time

import psycopg
import pytest
from django.db import connection

from experiments.models import Run

pytestmark = pytest.mark.django_db(transaction=True)


def check() -> None:
    connection.health_check_done = False
    connection.close_if_health_check_failed()


def test_an_idle_connection_the_server_holds_is_checked_without_a_query(monkeypatch):
    assert connection.vendor == "postgresql" and connection.health_check_enabled
    connection.ensure_connection()
    asked = []
    monkeypatch.setattr(connection, "is_usable", lambda: asked.append(1) or True)
    check()
    assert connection.connection is not None and not asked


def test_a_connection_the_server_ended_is_replaced_before_it_is_used():
    Run.objects.count()
    pid = connection.connection.info.backend_pid
    db = connection.settings_dict
    with psycopg.connect(
        host=db["HOST"],
        port=db["PORT"],
        user=db["USER"],
        password=db["PASSWORD"],
        dbname=db["NAME"],
        autocommit=True,
    ) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
    deadline = time.monotonic() + 5
    while not select.select([connection.connection.fileno()], [], [], 0.05)[0]:
        assert time.monotonic() < deadline, "the server never told the connection it ended"
    check()
    assert connection.connection is None, "the ended connection was kept"
    assert Run.objects.count() == 0  # a new connection answers
    assert connection.connection.info.backend_pid != pid
