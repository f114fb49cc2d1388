"""`manage.py check --deploy` with the README's lab settings warns of nothing (issue 9, item 6)."""

from __future__ import annotations

import os
import subprocess
import sys

from django.conf import settings


def check_deploy(tmp_path, **env: str) -> subprocess.CompletedProcess[str]:
    # The browser tier sets DJANGO_ALLOW_ASYNC_UNSAFE in this process; a server never has it.
    skip = ("SECURE_", "SESSION_", "DJANGO_ALLOW_ASYNC_UNSAFE")
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    run_env.update(LABSITE_DATA_DIR=str(tmp_path), DEBUG="false", **env)
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=settings.BASE_DIR,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_lab_settings_pass_the_deploy_check(tmp_path):
    done = check_deploy(tmp_path, LABSITE_HTTPS="true", ALLOWED_HOSTS="labsite.example.org")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_plain_http_is_what_the_deploy_check_warns_about(tmp_path):
    """The check can fail: without HTTPS the cookie and HSTS warnings are there."""
    done = check_deploy(tmp_path)
    assert done.returncode != 0
    assert "SESSION_COOKIE_SECURE" in done.stdout + done.stderr
