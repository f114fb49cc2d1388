"""Create a user if needed, give it a role, and print a new API token alone on stdout."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from labsite.models import ApiToken
from labsite.roles import ROLES, assign_role


class Command(BaseCommand):
    help = "Create USERNAME if needed, give it --role, and print a new API token."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--role", choices=ROLES, default="member")
        parser.add_argument("--name", default="", help="a label for the token")

    def handle(self, *args: Any, username: str, role: str, name: str, **options: Any) -> None:
        username = username.strip()
        if not username or len(username) > 150:
            raise CommandError("username must be 1 to 150 characters")
        with transaction.atomic():
            user, created = get_user_model().objects.get_or_create(username=username)
            if created:
                user.set_unusable_password()
                user.save()
            assign_role(user, role)
            _, raw = ApiToken.issue(user, name=name)
        self.stdout.write(raw)
