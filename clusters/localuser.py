"""Who runs work on the `local` host: never the server itself, if it can be helped.

A run on the server's own machine must not get the server's powers (its environment, its data
directory with the SSH keys and the secret key, its processes). So, where the server runs as
root and the configured Unix user exists (`make up` creates `labsite-run`), every script for
the local host runs as that user, with an environment built from nothing. Where no such user
can be had, or where that user can reach the server's Redis or PostgreSQL without a password
(what the local host's probe checks, as that user), the local host takes admins' runs only,
unless the lab trusts its members there (LABSITE_LOCAL_TRUST_MEMBERS).
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings

from clusters.choices import HostKind

# The variables a run on the local host starts from (README: "A run's environment").
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class RunUser:
    """A Unix account the local host's scripts run as."""

    name: str
    uid: int
    gid: int
    home: str


def _lookup(name: str) -> tuple[RunUser | None, str]:
    if not name:
        return None, "LABSITE_LOCAL_RUN_USER is empty"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None, f"there is no Unix user {name!r} (make up creates it when run as root)"
    if entry.pw_uid == 0:
        return None, f"{name!r} is root"
    if os.geteuid() != 0:
        return None, f"the server does not run as root, so it cannot run work as {name!r}"
    if entry.pw_uid == os.geteuid():
        return None, f"{name!r} is the server's own user"
    return RunUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir or "/"), ""


@cache
def _resolved(name: str) -> tuple[RunUser | None, str]:
    return _lookup(name)


def run_user() -> RunUser | None:
    """The account local runs execute as, or None when there is none to be had."""
    return _resolved(settings.LABSITE["LOCAL_RUN_USER"])[0]


def why_no_run_user() -> str:
    return _resolved(settings.LABSITE["LOCAL_RUN_USER"])[1]


# Where the local host's probe records what the run user could reach (Host.facts).
REACHES = "run_user_reaches"


def local_refusal(facts: dict[str, Any] | None = None) -> str | None:
    """Why members' runs may not go to the local host, or None when they may.

    They may where the lab trusts its members there (LABSITE_LOCAL_TRUST_MEMBERS), or where
    they run as the run user and the local host's probe found that user can reach none of the
    server's services without a password (a Redis with no password takes Celery tasks from
    anyone on the machine; a PostgreSQL that trusts local connections makes anyone its role).
    Until that probe has looked, they may not. `facts`: the local host's, where the caller
    has them; else one query reads them.
    """
    if settings.LABSITE["LOCAL_TRUST_MEMBERS"]:
        return None
    user = run_user()
    if user is None:
        return why_no_run_user()
    if facts is None:
        from clusters.models import Host  # the model imports nothing of this module's callers

        facts = (
            Host.objects.filter(name="local", kind=HostKind.LOCAL)
            .values_list("facts", flat=True)
            .first()
        )
    reaches = (facts or {}).get(REACHES)
    if not isinstance(reaches, list):
        return f"what its run user {user.name!r} can reach is not checked yet (the next probe does)"
    if reaches:
        return (
            f"its run user {user.name!r} can reach {', '.join(map(str, reaches))} without a "
            "password (give it one, or make it trust no local connection)"
        )
    return None


def members_may_run_locally() -> bool:
    """Whether a run of someone who is not an admin may go to the local host."""
    return local_refusal() is None


def admins_only_reason(refusal: str | None = None) -> str:
    """Why the local host takes admins' runs only (shown on runs that wait for it)."""
    return (
        f"the local host takes admins' runs only: {refusal or local_refusal()}; an admin can "
        "set LABSITE_LOCAL_TRUST_MEMBERS=true to let members run there anyway"
    )


def reach_targets(
    redis_urls: list[str] | None = None, database: dict[str, Any] | None = None
) -> list[dict[str, object]]:
    """The server's own services, as scripts/reach.py checks them: its broker (Redis) and its
    database where that is a PostgreSQL server (SQLite is a file in the 0700 data directory).
    For PostgreSQL, the server's role, at its address and at the default Unix socket too (a
    `local all all trust` line opens the socket whatever the TCP address asks)."""
    targets: list[dict[str, object]] = []
    if redis_urls is None:
        redis_urls = [settings.REDIS_URL, settings.CELERY_BROKER_URL]
    for url in dict.fromkeys(redis_urls):
        parts = urlsplit(url)
        if parts.scheme in ("redis", "rediss"):
            host = parts.hostname or "127.0.0.1"
            port = parts.port or 6379
            targets.append(
                {"name": f"Redis at {host}:{port}", "kind": "redis", "host": host, "port": port}
            )
        elif parts.scheme == "unix":
            targets.append({"name": f"Redis at {parts.path}", "kind": "redis", "path": parts.path})
    db = settings.DATABASES["default"] if database is None else database
    if "postgresql" in db["ENGINE"]:
        role, name = str(db.get("USER") or ""), str(db.get("NAME") or "")
        port = int(db.get("PORT") or 5432)
        host = str(db.get("HOST") or "")
        sockets = [host] if host.startswith("/") else []
        sockets.append("/var/run/postgresql")
        if host and not host.startswith("/"):
            targets.append(
                {
                    "name": f"PostgreSQL at {host}:{port} as {role!r}",
                    "kind": "postgres",
                    "host": host,
                    "port": port,
                    "user": role,
                    "database": name,
                }
            )
        for directory in dict.fromkeys(sockets):
            path = f"{directory}/.s.PGSQL.{port}"
            if os.path.exists(path):
                targets.append(
                    {
                        "name": f"PostgreSQL at {path} as {role!r}",
                        "kind": "postgres",
                        "path": path,
                        "user": role,
                        "database": name,
                    }
                )
    return targets


def clean_environment(user: RunUser | None) -> dict[str, str]:
    """The environment local scripts (and so runs) start from: nothing of the server's."""
    if user is None:
        entry = pwd.getpwuid(os.geteuid())
        name, home = entry.pw_name, entry.pw_dir or "/"
    else:
        name, home = user.name, user.home
    return {
        "PATH": STANDARD_PATH,
        "HOME": home,
        "USER": name,
        "LOGNAME": name,
        "SHELL": "/bin/bash",
        "LANG": "C.UTF-8",
    }


def python_for(user: RunUser | None) -> str:
    """A python3 the scripts' user can execute: the server's own may sit in a private home."""
    if user is None:
        return sys.executable
    return shutil.which("python3", path=STANDARD_PATH) or "/usr/bin/python3"
