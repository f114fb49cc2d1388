"""Add a lab member (or PI, or admin) who signs in to the browser with a printed password."""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.validators import validate_email
from django.db import transaction

from labsite.models import ApiToken
from labsite.roles import ROLES, assign_role


class Command(BaseCommand):
    help = "Create USERNAME with --role and print a password for the browser (shown once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--role", choices=ROLES, default="member")
        parser.add_argument("--email", default="")
        parser.add_argument("--token", action="store_true", help="also print a new API token")

    def handle(
        self, *args: Any, username: str, role: str, email: str, token: bool, **options: Any
    ) -> None:
        User = get_user_model()
        username = username.strip()
        try:
            User.username_validator(username)
        except ValidationError as exc:
            raise CommandError(f"username {username!r}: {' '.join(exc.messages)}") from exc
        if len(username) > 150:
            raise CommandError("username must be at most 150 characters")
        if email:
            try:
                validate_email(email)
            except ValidationError as exc:
                raise CommandError(f"--email {email!r} is not an email address") from exc
        if User.objects.filter(username=username).exists():
            raise CommandError(
                f"user {username!r} exists already; to reset a password use "
                f"`manage.py changepassword {username}`"
            )
        password = secrets.token_urlsafe(12)
        with transaction.atomic():
            user = User.objects.create_user(username=username, email=email, password=password)
            assign_role(user, role)
            raw = ApiToken.issue(user, name="add_user")[1] if token else ""
        self.stdout.write(f"Created {role} {username}. Password: {password}")
        self.stdout.write("  (shown once: sign in at /login, then change it at /password)")
        if token:
            self.stdout.write(f"API token: {raw}")
