"""Django's PostgreSQL backend, with a health check that costs no round trip while the server
has said nothing.

With CONN_HEALTH_CHECKS, Django sends `SELECT 1` before each request's first query, to find a
persistent connection that the server closed (a restart, an idle timeout) before a request
fails on it. That was one of the three round trips of `GET /wild/v2/system-health`. A server
that ends a connection tells it first (it sends the error and closes the socket), so an idle
connection's socket becomes readable: only then is the `SELECT 1` sent. A socket with nothing
to read is a connection the server still holds.
"""

from __future__ import annotations

import select

from django.db.backends.postgresql import base


class DatabaseWrapper(base.DatabaseWrapper):
    def close_if_health_check_failed(self) -> None:
        if self.connection is None or not self.health_check_enabled or self.health_check_done:
            return
        if self.pool is None and not self.connection.closed and not _has_input(self.connection):
            self.health_check_done = True
            return
        super().close_if_health_check_failed()


def _has_input(connection: object) -> bool:
    """Whether the server has sent anything on this idle connection (or closed it)."""
    try:
        readable, _, _ = select.select([connection.fileno()], [], [], 0)  # type: ignore[attr-defined]
    except (OSError, ValueError):
        return True
    return bool(readable)
