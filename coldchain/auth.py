"""Bearer tokens, roles and what each role may do (CONTRACT.md section 3).

A token is 32 random bytes, shown once when made and stored only as its SHA-256 (a token has
far more entropy than a password, so a fast hash is the right one: there is nothing to brute
force). Every endpoint names the permission it needs; the middleware resolves the token to an
`Actor` and refuses what the actor's role does not allow. Failed authentications are rate
limited per client address.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

TOKEN_PREFIX: Final = "cc_"  # noqa: S105 - a prefix that makes tokens recognisable, no secret


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    PLANNER = "planner"
    ADMIN = "admin"


class Permission(StrEnum):
    READ = "read"
    CUSTODY = "custody"  # record custody and status events
    ALARMS = "alarms"  # acknowledge and close alarms
    SHIPMENTS = "shipments"  # create shipments
    ROUTES = "routes"  # plan routes
    NETWORK = "network"  # edit the route network
    PROFILES = "profiles"  # edit product profiles
    TOKENS = "tokens"  # make and revoke tokens
    AUDIT = "audit"  # read the audit log
    RECIPIENTS = "recipients"  # who hears about alarms


ROLE_PERMISSIONS: Final[dict[Role, frozenset[Permission]]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.OPERATOR: frozenset({Permission.READ, Permission.CUSTODY, Permission.ALARMS}),
    Role.PLANNER: frozenset(
        {Permission.READ, Permission.SHIPMENTS, Permission.ROUTES, Permission.NETWORK}
    ),
    Role.ADMIN: frozenset(Permission),
}


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is acting: the token's name and role (the audit log records `name`)."""

    token_id: int
    name: str
    role: Role

    def may(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    @property
    def label(self) -> str:
        return f"{self.name} (token {self.token_id}, {self.role})"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def looks_like_token(token: str) -> bool:
    return token.startswith(TOKEN_PREFIX) and 20 <= len(token) <= 100 and token.isascii()


class FailureLimiter:
    """At most `limit` failed authentications per client in a sliding `window_s`."""

    def __init__(self, limit: int = 20, window_s: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self._max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may try now."""
        failures = self._failures.get(client)
        if failures is None:
            return 0.0
        now = time.monotonic()
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return 0.0
        if len(failures) < self.limit:
            return 0.0
        return failures[0] + self.window_s - now

    def failed(self, client: str) -> None:
        if client not in self._failures and len(self._failures) >= self._max_clients:
            # Bounded memory under a spray of addresses: forget the oldest client.
            self._failures.pop(next(iter(self._failures)))
        self._failures.setdefault(client, deque()).append(time.monotonic())
