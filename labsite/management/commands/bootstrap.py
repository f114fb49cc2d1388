"""First start: the first admin (credentials printed once) and the local host."""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from clusters import localuser
from clusters import services as cluster_services
from clusters.models import Host
from experiments.choices import ACTIVE
from experiments.models import Run
from labsite.roles import ADMIN, PI, assign_role


class Command(BaseCommand):
    help = "Create the first admin if there is none and register this machine as host `local`."

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        if not User.objects.filter(is_superuser=True).exists():
            password = secrets.token_urlsafe(12)
            with transaction.atomic():
                user = User.objects.create_superuser(username="admin", password=password)
                assign_role(user, PI)
                assign_role(user, ADMIN)
            # To the terminal only, never through logging: logs are kept (files, journald) and
            # read by more people than the one who ran `make up`. tests/integration/test_up.py
            # checks that no file of the instance holds it.
            self.stdout.write(
                self.style.SUCCESS(
                    f"Created the first admin. Username: admin  Password: {password}\n"
                    "  (shown once: sign in at /login and change it under your name)"
                )
            )
        host = cluster_services.host_ensure_local()
        self._follow_the_run_user(host)
        if host.enabled:
            host = cluster_services.inventory_refresh_local()
            cluster_services.host_check_run_user_reach(host)
        run_user = localuser.run_user()
        refusal = localuser.local_refusal()
        who = f"runs execute as {run_user.name}" if run_user is not None else ""
        if refusal is not None:
            who = "; ".join(filter(None, [who, localuser.admins_only_reason(refusal)]))
        elif run_user is None:
            who = "members' runs execute as the server's user (LABSITE_LOCAL_TRUST_MEMBERS)"
        self.stdout.write(
            f"Host `local`: {'enabled' if host.enabled else 'disabled'}, "
            f"{host.gpus.filter(present=True).count()} GPU(s); {who}. {host.state_note}".rstrip()
        )

    def _follow_the_run_user(self, host: Host) -> None:
        """A local host registered before its run user existed keeps its runs in the data dir,
        which the run user cannot enter: move it to the run user's home while it is idle."""
        old_default = str(settings.DATA_DIR / "runs")
        new_root = cluster_services.local_run_root()
        if host.run_root != old_default or new_root == old_default:
            return
        if Run.objects.filter(host=host, status__in=list(ACTIVE)).exists():
            self.stderr.write(
                f"Host `local` has runs in {old_default}; it moves to {new_root} once they end "
                "(run bootstrap again then)."
            )
            return
        cluster_services.host_set_run_root(host=host, run_root=new_root)
