"""Turns every error into the contract's JSON body; a client never sees a stack trace."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from coldchain.errors import ColdchainError

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
        return error_body(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        return error_body(exc.status, code, exc.reason)
    except Exception:
        logger.exception("unexpected error on %s %s", request.method, request.path)
        return error_body(500, "internal", "internal error; the service logged the details")
