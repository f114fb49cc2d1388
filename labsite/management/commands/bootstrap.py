"""First start: the first admin (credentials printed once) and the local host."""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from clusters import services as cluster_services
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
            self.stdout.write(
                self.style.SUCCESS(
                    f"Created the first admin. Username: admin  Password: {password}\n"
                    "  (shown once: sign in and change it under /admin/password_change/)"
                )
            )
        host = cluster_services.host_ensure_local()
        if host.enabled:
            host = cluster_services.inventory_refresh_local()
        self.stdout.write(
            f"Host `local`: {'enabled' if host.enabled else 'disabled'}, "
            f"{host.gpus.filter(present=True).count()} GPU(s). {host.state_note}".rstrip()
        )
