"""create_token, the three token headers, and settings read from the environment."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from rest_framework.test import APIClient

from experiments.models import Run
from labsite import env
from labsite.models import ApiToken, hash_token

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def eve_token(db) -> str:
    buf = io.StringIO()
    call_command("create_token", "eve", "--role", "pi", stdout=buf)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1, buf.getvalue()
    return lines[0]


def test_create_token_prints_only_the_token(eve_token):
    assert eve_token.startswith("lab_") and len(eve_token) > 30 and " " not in eve_token
    token = ApiToken.objects.get(key_hash=hash_token(eve_token))
    assert token.user.username == "eve"


def test_create_token_makes_a_pi_who_is_also_a_member(eve_token):
    eve = get_user_model().objects.get(username="eve")
    assert set(eve.groups.values_list("name", flat=True)) == {"member", "pi"}
    assert not eve.has_usable_password()
    assert eve.has_perm("experiments.change_promptskill")


def test_create_token_again_adds_a_second_token_for_the_same_user(eve_token):
    buf = io.StringIO()
    call_command("create_token", "eve", stdout=buf)
    second = buf.getvalue().strip()
    assert second != eve_token
    assert get_user_model().objects.filter(username="eve").count() == 1
    assert ApiToken.objects.filter(user__username="eve").count() == 2


@pytest.mark.parametrize(
    "header",
    [
        {"HTTP_X_AUTH_TOKEN": "{t}"},
        {"HTTP_AUTHORIZATION": "Token {t}"},
        {"HTTP_AUTHORIZATION": "Bearer {t}"},
    ],
    ids=["x-auth-token", "authorization-token", "authorization-bearer"],
)
def test_token_works_in_every_header(eve_token, header):
    client = APIClient()
    client.credentials(**{k: v.format(t=eve_token) for k, v in header.items()})
    response = client.post("/api/runs", {"command": "echo hi"}, format="json")
    assert response.status_code == 201, response.content
    run = Run.objects.get(pk=response.json()["id"])
    assert run.created_by.username == "eve"
    assert run.events.get().actor_token.key_hash == hash_token(eve_token)
    token = ApiToken.objects.get(key_hash=hash_token(eve_token))
    assert token.last_used_at is not None


@pytest.mark.parametrize(
    "header",
    [
        {"HTTP_X_AUTH_TOKEN": "lab_wrong"},
        {"HTTP_AUTHORIZATION": "Token lab_wrong"},
        {"HTTP_AUTHORIZATION": "Bearer lab_wrong"},
    ],
    ids=["x-auth-token", "authorization-token", "authorization-bearer"],
)
def test_wrong_token_is_401_even_on_open_endpoints(db, header):
    """GIVEN a token that does not exist WHEN calling an endpoint anyone may read THEN 401:
    a bad token is an error, never a quiet fall back to anonymous."""
    client = APIClient()
    client.credentials(**header)
    for path in ("/api/prompt-skills", "/api/wild/v2/system-health", "/api/runs"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.json()["detail"]
    assert client.post("/api/runs", {"command": "x"}, format="json").status_code == 401
    assert not Run.objects.exists()


def test_revoked_token_is_401(eve_token):
    ApiToken.objects.filter(key_hash=hash_token(eve_token)).update(revoked=True)
    client = APIClient()
    client.credentials(HTTP_X_AUTH_TOKEN=eve_token)
    assert client.get("/api/runs").status_code == 401


def test_raw_token_is_not_stored(eve_token):
    token = ApiToken.objects.get(user__username="eve")
    values = [str(getattr(token, f.attname)) for f in ApiToken._meta.concrete_fields]
    assert all(eve_token not in value for value in values), values
    assert token.key_hash == hash_token(eve_token)
    assert token.prefix == eve_token[:12]  # a short prefix to recognise it, not the secret


# --- settings from the environment --------------------------------------------------------


def test_env_bool(monkeypatch):
    monkeypatch.setenv("LABSITE_TEST_FLAG", "maybe")
    with pytest.raises(ImproperlyConfigured, match="LABSITE_TEST_FLAG"):
        env.env_bool("LABSITE_TEST_FLAG", False)
    for raw, value in [("yes", True), ("TRUE", True), ("1", True), ("off", False), ("0", False)]:
        monkeypatch.setenv("LABSITE_TEST_FLAG", raw)
        assert env.env_bool("LABSITE_TEST_FLAG", not value) is value
    monkeypatch.delenv("LABSITE_TEST_FLAG")
    assert env.env_bool("LABSITE_TEST_FLAG", True) is True


def test_env_int(monkeypatch):
    monkeypatch.setenv("LABSITE_TEST_N", "ten")
    with pytest.raises(ImproperlyConfigured, match="LABSITE_TEST_N='ten' is not an integer"):
        env.env_int("LABSITE_TEST_N", 1)
    monkeypatch.setenv("LABSITE_TEST_N", "2")
    with pytest.raises(ImproperlyConfigured, match="at least 5"):
        env.env_int("LABSITE_TEST_N", 10, minimum=5)
    assert env.env_int("LABSITE_TEST_N", 10, minimum=2) == 2
    monkeypatch.setenv("LABSITE_TEST_N", "")
    assert env.env_int("LABSITE_TEST_N", 7) == 7


def test_env_float(monkeypatch):
    monkeypatch.setenv("LABSITE_TEST_F", "fast")
    with pytest.raises(ImproperlyConfigured, match="LABSITE_TEST_F"):
        env.env_float("LABSITE_TEST_F", 1.0)
    monkeypatch.setenv("LABSITE_TEST_F", "-0.5")
    with pytest.raises(ImproperlyConfigured, match="at least 0"):
        env.env_float("LABSITE_TEST_F", 1.0, minimum=0)


def test_env_str_file(monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("LABSITE_TEST_S_FILE", str(secret))
    monkeypatch.setenv("LABSITE_TEST_S", "from-env")
    assert env.env_str("LABSITE_TEST_S", "d") == "s3cret"
    monkeypatch.setenv("LABSITE_TEST_S_FILE", str(tmp_path / "missing"))
    with pytest.raises(ImproperlyConfigured, match="LABSITE_TEST_S_FILE"):
        env.env_str("LABSITE_TEST_S", "d")


def _manage_check(tmp_path, **overrides):
    environ = {**os.environ, "LABSITE_DATA_DIR": str(tmp_path), **overrides}
    environ.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_debug_value_stops_start_up(tmp_path):
    result = _manage_check(tmp_path, DEBUG="maybe")
    assert result.returncode != 0
    assert "DEBUG='maybe'" in result.stderr and "ImproperlyConfigured" in result.stderr


def test_good_settings_pass_the_check(tmp_path):
    """The control for the test above: the same command with DEBUG=false succeeds."""
    result = _manage_check(tmp_path, DEBUG="false")
    assert result.returncode == 0, result.stderr
