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
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
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
    """At most `limit` failed authentications per client in a sliding `window_s`.

    A blocked address is refused without looking at its token, except for tokens that have
    signed in successfully before (`vouch`): behind a NAT, one client's failures would
    otherwise lock out everyone sharing the address, operators acknowledging alarms included.
    Such a token is still checked against the database on every request, so revoking it takes
    effect at once; a token never seen working waits out the block, so a blocked address cannot
    make the database check guesses."""

    def __init__(
        self,
        limit: int = 20,
        window_s: float = 60.0,
        max_clients: int = 10_000,
        max_vouched: int = 10_000,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}
        self._max_vouched = max_vouched
        self._vouched: OrderedDict[bytes, None] = OrderedDict()

    def vouch(self, token_digest: bytes) -> None:
        """The token with this hash signed in: let it through blocked addresses from now on."""
        self._vouched[token_digest] = None
        self._vouched.move_to_end(token_digest)
        if len(self._vouched) > self._max_vouched:
            self._vouched.popitem(last=False)

    def forget(self, token_digest: bytes) -> None:
        """The token with this hash was refused (revoked, expired): vouch for it no more."""
        self._vouched.pop(token_digest, None)

    def vouched(self, token_digest: bytes) -> bool:
        return token_digest in self._vouched

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


class Proxies:
    """The reverse proxies whose `X-Forwarded-For` is believed (`COLDCHAIN_TRUSTED_PROXIES`).

    Behind a proxy every request comes from the proxy's address, so one client's failed
    sign-ins would lock out everyone behind it. A request from a trusted proxy is counted
    against the nearest address in `X-Forwarded-For` that is not a trusted proxy: each proxy
    appends the address it was reached from, so that hop was written by a proxy we trust,
    while anything to its left is whatever the client sent. With none configured the header is
    ignored, so that no client can pick the address it is counted against."""

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self._networks: tuple[IPv4Network | IPv6Network, ...] = tuple(
            ip_network(n, strict=False) for n in networks
        )

    def client(self, peer: str | None, forwarded_for: Sequence[str]) -> str:
        """The address a request is counted against: `peer`, or when that is a trusted proxy,
        the nearest untrusted hop of the `X-Forwarded-For` header values (the leftmost when
        every hop is trusted)."""
        address = peer or "unknown"
        if not self._networks or not self._trusted(address):
            return address
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        for hop in reversed(hops):
            if not hop:
                continue
            if not self._trusted(hop):
                return hop[:64]
            address = hop
        return address

    def _trusted(self, address: str) -> bool:
        try:
            ip = ip_address(address)
        except ValueError:
            return False  # not an address: whatever a client wrote there
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._networks)
