"""Compiled querysets (labsite.compiled) give what the ORM gives: the same instances with the
same values (times aware, on SQLite as on PostgreSQL), and the token lookup every API request
makes still refuses what it refused."""

from __future__ import annotations

import pytest
from django.utils import timezone

from labsite.auth import TOKEN_LOOKUP
from labsite.compiled import Compiled
from labsite.models import ApiToken, hash_token
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def fields(obj) -> dict:
    return {f.attname: getattr(obj, f.attname) for f in obj._meta.concrete_fields}


def test_the_token_lookup_is_the_orms():
    user = UserFactory(username="erin", email="e@example.org")
    user.last_login = timezone.now()
    user.save()
    token, raw = ApiToken.issue(user, name="laptop")
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    (fast,) = TOKEN_LOOKUP.instances(hash_token(raw))
    orm = ApiToken.objects.select_related("user").get(pk=token.pk)
    assert fields(fast) == fields(orm)
    assert fields(fast.user) == fields(orm.user)
    assert fast.last_used_at.tzinfo is not None and fast.user.last_login.tzinfo is not None
    assert fast.user.username == "erin" and fast.user_id == user.pk


def test_unknown_and_revoked_tokens_are_not_found_and_answer_401(member, anon):
    token, raw = ApiToken.issue(member.user)
    assert TOKEN_LOOKUP.instances(hash_token("lab_nope")) == []
    assert anon.get("/api/runs", HTTP_X_AUTH_TOKEN=raw).status_code == 200
    ApiToken.objects.filter(pk=token.pk).update(revoked=True)
    assert TOKEN_LOOKUP.instances(hash_token(raw)) == []
    assert anon.get("/api/runs", HTTP_X_AUTH_TOKEN=raw).status_code == 401
    member.user.is_active = False
    member.user.save()
    assert member.client.get("/api/runs").status_code == 401


def test_a_compiled_values_query_converts_as_the_orm_does():
    users = [UserFactory(username=f"u{i}") for i in range(3)]
    query = Compiled(
        lambda name: ApiToken.objects.filter(user__username=name).values_list(
            "id", "created_at", "user__date_joined"
        ),
        arity=1,
    )
    for user in users:
        ApiToken.issue(user)
    for user in users:
        assert query.rows(user.username) == list(
            ApiToken.objects.filter(user__username=user.username).values_list(
                "id", "created_at", "user__date_joined"
            )
        )
