"""Failed sign-ins and bad tokens are throttled per address (issue 9, item 6); real Redis."""

from __future__ import annotations

import pytest
from django.test import Client

from labsite import throttle


@pytest.fixture
def low_limit(settings):
    settings.LABSITE = {**settings.LABSITE, "AUTH_FAILURES_PER_MINUTE": 3}
    assert throttle._client(settings.REDIS_URL).ping()


def test_bad_tokens_past_the_limit_get_429_and_a_good_token_still_works(low_limit, anon, member):
    codes = [anon.get("/api/runs", HTTP_X_AUTH_TOKEN=f"wrong-{i}").status_code for i in range(5)]
    assert codes == [401, 401, 401, 429, 429]
    body = anon.get("/api/runs", HTTP_X_AUTH_TOKEN="wrong").json()
    assert "too many failed" in body["detail"]
    assert member.client.get("/api/runs").status_code == 200


def test_sign_in_past_the_limit_is_refused_before_the_password_is_checked(low_limit, db):
    from tests.factories import UserFactory

    user = UserFactory(username="erin")
    user.set_password("right-password-1")
    user.save()
    browser = Client()
    for _ in range(3):
        page = browser.post("/login", {"username": "erin", "password": "nope"})
        assert page.status_code == 200 and b"correct username and password" in page.content
    page = browser.post("/login", {"username": "erin", "password": "right-password-1"})
    assert page.status_code == 200, "a throttled address must not be signed in"
    assert b"Too many failed sign-ins" in page.content
    assert "_auth_user_id" not in browser.session
    admin = browser.post("/admin/login/", {"username": "erin", "password": "right-password-1"})
    assert b"Too many failed sign-ins" in admin.content


def test_a_right_password_under_the_limit_signs_in(low_limit, db):
    from tests.factories import UserFactory

    user = UserFactory(username="frank")
    user.set_password("right-password-2")
    user.save()
    browser = Client()
    browser.post("/login", {"username": "frank", "password": "nope"})
    page = browser.post("/login", {"username": "frank", "password": "right-password-2"})
    assert page.status_code == 302 and browser.session["_auth_user_id"] == str(user.pk)


def test_behind_the_proxy_each_client_is_counted_for_itself(low_limit, anon, settings):
    """GIVEN the lab behind its proxy (LABSITE_HTTPS: every request from 127.0.0.1) WHEN one
    client keeps failing THEN it alone is throttled, by the address the proxy appended; a
    client's own X-Forwarded-For entries count for nothing, and without the proxy setting the
    header is not believed at all."""
    settings.HTTPS = True
    proxied = {"HTTP_X_FORWARDED_PROTO": "https", "secure": True}

    def bad(xff: str) -> int:
        return anon.get(
            "/api/runs", HTTP_X_AUTH_TOKEN="wrong", HTTP_X_FORWARDED_FOR=xff, **proxied
        ).status_code

    assert [bad("203.0.113.9") for _ in range(4)] == [401, 401, 401, 429]
    assert bad("198.51.100.7") == 401, "another client is not locked out"
    assert bad("198.51.100.7, 203.0.113.9") == 429, "the proxy's entry counts, not the client's"
    settings.HTTPS = False
    spoofed = [
        anon.get(
            "/api/runs", HTTP_X_AUTH_TOKEN="wrong", HTTP_X_FORWARDED_FOR=f"192.0.2.{i}"
        ).status_code
        for i in range(4)
    ]
    assert spoofed == [401, 401, 401, 429], "without the proxy, the header changes nothing"
