"""The service's one error tree. Each class carries the HTTP status and a stable code that the
error middleware turns into the contract's `{"error": {"code", "message"}}` body."""

from __future__ import annotations

from typing import ClassVar


class ColdchainError(Exception):
    """Base of every error the service raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ColdchainError):
    """The environment or a command line does not make sense."""

    code = "config"


class BadRequest(ColdchainError):
    status = 400
    code = "bad_request"


class NotFound(ColdchainError):
    status = 404
    code = "not_found"


class Conflict(ColdchainError):
    status = 409
    code = "conflict"


class NoFeasibleRoute(Conflict):
    """A well-formed route request that no route of the network meets (hold, deadline,
    handoffs): the message carries the planner's reason and what would be needed."""

    code = "no_feasible_route"


class StoreUnavailable(ColdchainError):
    """PostgreSQL cannot be reached or refused the connection; retrying may help."""

    status = 503
    code = "store_unavailable"


class Unstorable(BadRequest):
    """PostgreSQL refused the data itself (a value it cannot hold, a constraint, a size limit):
    the same write fails again whatever the server's state, so retrying cannot help."""

    code = "unstorable"


class Unauthorized(ColdchainError):
    status = 401
    code = "unauthorized"


class Forbidden(ColdchainError):
    status = 403
    code = "forbidden"


class TooManyRequests(ColdchainError):
    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
