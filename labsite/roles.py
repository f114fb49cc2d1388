"""Roles are Django groups: member, pi, admin."""

from __future__ import annotations

from typing import Any

MEMBER = "member"
PI = "pi"
ADMIN = "admin"
ROLES = (MEMBER, PI, ADMIN)


def has_role(user: Any, role: str) -> bool:
    """True when the user is in the role's group (superusers hold every role)."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    if user.is_superuser:
        return True
    cache = getattr(user, "_labsite_roles", None)
    if cache is None:
        cache = set(user.groups.values_list("name", flat=True))
        user._labsite_roles = cache
    return role in cache


def is_pi(user: Any) -> bool:
    return has_role(user, PI)


def is_admin(user: Any) -> bool:
    return has_role(user, ADMIN)


def can_act_on(user: Any, owner_id: int | None) -> bool:
    """Owners act on their own work; PIs and admins on anyone's."""
    if not getattr(user, "is_authenticated", False):
        return False
    return owner_id == user.id or is_pi(user) or is_admin(user)


def assign_role(user: Any, role: str) -> None:
    """Put the user in the role's group (roles are cumulative: a PI is also a member)."""
    from django.contrib.auth.models import Group

    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    names = {MEMBER, role}
    for name in names:
        group, _ = Group.objects.get_or_create(name=name)
        user.groups.add(group)
    if role == ADMIN and not user.is_staff:
        user.is_staff = True
        user.save(update_fields=["is_staff"])
    user.__dict__.pop("_labsite_roles", None)


def roles_context(request: Any) -> dict[str, bool]:
    user = getattr(request, "user", None)
    return {"user_is_pi": is_pi(user), "user_is_admin": is_admin(user)}
