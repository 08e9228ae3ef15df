"""The request pipeline: errors become the contract's JSON body (a client never sees a stack
trace, SQL or an internal name), and every endpoint that is not public needs a bearer token whose
role allows what the endpoint does."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from coldchain import keys
from coldchain.api import permission_of
from coldchain.auth import looks_like_token, token_hash
from coldchain.errors import ColdchainError, Forbidden, TooManyRequests, Unauthorized
from coldchain.store import TokenRejected

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "too_many_requests",
}


def error_body(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ColdchainError as exc:
        if exc.status >= 500:
            logger.warning("%s %s failed: %s", request.method, request.path, exc.message)
        response = error_body(exc.status, exc.code, exc.message)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="coldchain"'
        if isinstance(exc, TooManyRequests):
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        response = error_body(exc.status, code, exc.reason)
        for header in ("Allow", "Retry-After"):
            if header in exc.headers:
                response.headers[header] = exc.headers[header]
        return response
    except Exception:
        logger.exception("unexpected error on %s %s", request.method, request.path)
        return error_body(500, "internal", "internal error; the service logged the details")


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve the bearer token to an actor and check the endpoint's permission."""
    permission = permission_of(request.match_info.handler)
    if permission is None:
        return await handler(request)
    limiter = request.app[keys.AUTH_FAILURES]
    client = request.app[keys.PROXIES].client(
        request.remote, request.headers.getall("X-Forwarded-For", [])
    )
    header = request.headers.get("Authorization", "")
    if not header and request.headers.get("Upgrade", "").lower() == "websocket":
        # Browsers cannot set headers on a WebSocket: the token may come as ?token=.
        query_token = request.query.get("token", "")
        header = f"Bearer {query_token}" if query_token else ""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    well_formed = scheme.lower() == "bearer" and looks_like_token(token)
    digest = token_hash(token) if well_formed else b""
    wait = limiter.retry_after(client)
    if wait > 0 and not (well_formed and limiter.vouched(digest)):
        # Blocked: only a token that has signed in before gets through (see FailureLimiter).
        raise TooManyRequests(
            f"too many failed authentications from this address; try again in {wait:.0f} s", wait
        )
    if not header:
        raise Unauthorized(
            "this endpoint needs Authorization: Bearer <token> "
            "(make one with `coldchain token create`)"
        )
    if not well_formed:
        limiter.failed(client)
        raise Unauthorized("malformed Authorization header: expected Bearer <token>")
    try:
        actor = await request.app[keys.STORE].actor_for(digest)
    except TokenRejected as exc:
        limiter.failed(client)
        limiter.forget(digest)
        raise Unauthorized(str(exc)) from exc
    limiter.vouch(digest)
    if not actor.may(permission):
        raise Forbidden(f"role {actor.role} may not do this (needs '{permission}')")
    request[keys.ACTOR] = actor
    return await handler(request)
