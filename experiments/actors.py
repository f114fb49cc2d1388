"""Who did something: a signed-in user, an API token (scripts and agents), or the system."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from experiments.choices import ActorKind
from labsite.models import ApiToken


@dataclass(frozen=True)
class Actor:
    kind: str
    user: Any = None
    token: ApiToken | None = None

    @classmethod
    def system(cls) -> Actor:
        return cls(kind=ActorKind.SYSTEM)

    @classmethod
    def from_request(cls, request: Any) -> Actor:
        token = getattr(request, "auth", None)
        if isinstance(token, ApiToken):
            return cls(kind=ActorKind.AGENT, user=request.user, token=token)
        return cls(kind=ActorKind.USER, user=request.user)

    @property
    def user_id(self) -> int | None:
        return getattr(self.user, "id", None)
