"""Who runs work on the `local` host: never the server itself, if it can be helped.

A run on the server's own machine must not get the server's powers (its environment, its data
directory with the SSH keys and the secret key, its processes). So, where the server runs as
root and the configured Unix user exists (`make up` creates `labsite-run`), every script for
the local host runs as that user, with an environment built from nothing. Where no such user
can be had, the local host takes admins' runs only, unless the lab trusts its members there
(LABSITE_LOCAL_TRUST_MEMBERS): their runs would be the server.
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from dataclasses import dataclass
from functools import cache

from django.conf import settings

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


def members_may_run_locally() -> bool:
    """Whether a run of someone who is not an admin may go to the local host."""
    return run_user() is not None or bool(settings.LABSITE["LOCAL_TRUST_MEMBERS"])


def admins_only_reason() -> str:
    """Why the local host takes admins' runs only (shown on runs that wait for it)."""
    return (
        f"the local host takes admins' runs only: {why_no_run_user()}; an admin can set "
        "LABSITE_LOCAL_TRUST_MEMBERS=true to let members run there as the server's user"
    )


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
