"""`manage.py add_user`: a member gets a password to sign in with (issue 10, item 11)."""

from __future__ import annotations

import io
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client

from labsite import roles
from labsite.models import ApiToken, hash_token


def add_user(*args: str) -> str:
    out = io.StringIO()
    call_command("add_user", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_a_new_member_signs_in_with_the_printed_password_and_can_change_it():
    out = add_user("grace", "--role", "member", "--email", "grace@lab.example")
    password = re.search(r"Password: (\S+)", out).group(1)
    user = get_user_model().objects.get(username="grace")
    assert user.has_usable_password() and user.email == "grace@lab.example"
    assert roles.has_role(user, "member") and not roles.is_pi(user)
    browser = Client()
    assert browser.post("/login", {"username": "grace", "password": password}).status_code == 302
    assert browser.get("/").status_code == 200
    changed = browser.post(
        "/password",
        {
            "old_password": password,
            "new_password1": "a-new-pass-9x",
            "new_password2": "a-new-pass-9x",
        },
    )
    assert changed.status_code == 302
    user.refresh_from_db()
    assert user.check_password("a-new-pass-9x")


@pytest.mark.django_db
def test_token_roles_and_bad_input():
    out = add_user("heidi", "--role", "pi", "--token")
    raw = re.search(r"API token: (\S+)", out).group(1)
    token = ApiToken.objects.get(key_hash=hash_token(raw))
    assert token.user.username == "heidi" and roles.is_pi(token.user)
    with pytest.raises(CommandError, match="exists already"):
        add_user("heidi")
    with pytest.raises(CommandError, match="username"):
        add_user("bad name!")
    with pytest.raises(CommandError, match="not an email"):
        add_user("ivan", "--email", "nope")
    assert not get_user_model().objects.filter(username="ivan").exists()
