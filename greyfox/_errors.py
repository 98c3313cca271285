# -*- test-case-name: tests.test_errors -*-
"""OpenAI-shaped errors: every error GreyFox makes itself looks like the API's own."""

from __future__ import annotations

import json
from typing import Any

import attr


@attr.s(auto_attribs=True, frozen=True)
class ApiError(Exception):
    """An error answered by GreyFox itself, in the OpenAI error shape.

    :ivar status: the HTTP status code.
    :ivar headers: extra response headers (``Retry-After`` and friends).
    """

    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "code": self.code,
            "param": self.param,
        }
        err.update(self.extra)
        return {"error": err}

    def to_bytes(self) -> bytes:
        return json.dumps(self.body()).encode("utf-8")

    def anthropic_body(self) -> dict[str, Any]:
        """The same error as the Anthropic API shapes its own (SPEC §2): the
        code (``cache_miss``, ``daily_budget``, ...) starts the message, which
        also names a replay miss's key."""
        message = self.message
        if self.code in _NAMED_CODES:
            message = f"{self.code}: {message}"
        key = dict(self.extra).get("key")
        if key:
            message += f" (key {key})"
        return {"type": "error", "error": {"type": anthropic_type(self.status), "message": message}}

    def to_anthropic_bytes(self) -> bytes:
        return json.dumps(self.anthropic_body()).encode("utf-8")


#: Codes a client needs to tell apart, named at the start of an Anthropic-shaped message.
_NAMED_CODES = frozenset({"cache_miss", "daily_token_limit", "daily_budget", "rate_limit", "runaway_loop"})


def anthropic_type(status: int) -> str:
    """The Anthropic error type of an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status == 529:
        return "overloaded_error"
    return "invalid_request_error" if status < 500 else "api_error"


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def unauthorized(message: str = "Incorrect or missing bearer token for this GreyFox proxy.") -> ApiError:
    return ApiError(401, message, "invalid_request_error", "invalid_api_key")


def not_found(message: str) -> ApiError:
    return ApiError(404, message, "invalid_request_error", "not_found")


def too_large(limit_bytes: int) -> ApiError:
    mib = limit_bytes / (1024 * 1024)
    return ApiError(
        413,
        f"Request body is larger than the {mib:g} MiB limit (GREYFOX_MAX_BODY_MB).",
        "invalid_request_error",
        "request_too_large",
    )


def unsupported_media(content_type: str) -> ApiError:
    return ApiError(
        415,
        f"Content-Type must be application/json, not {content_type or 'missing'!r}.",
        "invalid_request_error",
        "unsupported_media_type",
    )


def internal_error() -> ApiError:
    return ApiError(500, "GreyFox failed on this request; see its log.", "server_error", "internal_error")


def bad_gateway(message: str) -> ApiError:
    return ApiError(502, message, "upstream_error", "upstream_unreachable")


def gateway_timeout(message: str) -> ApiError:
    return ApiError(504, message, "upstream_error", "upstream_timeout")


def cache_miss(key: str | None, why: str = "", nearest: Any = None) -> ApiError:
    """Replay mode's 404.  With ``nearest`` (a :class:`~greyfox._cache.Nearest`),
    it names the nearest recorded request and the first path that differs."""
    detail = f" ({why})" if why else ""
    extra: tuple[tuple[str, Any], ...] = (("key", key),)
    if nearest is not None:
        first = nearest.differences[0].line() if nearest.differences else "nothing in the body"
        detail += f"; the nearest recorded request ({nearest.key[:12]}) differs at {first}"
        extra += (("nearest_key", nearest.key), ("differs_at", [d.path for d in nearest.differences[:10]]))
    return ApiError(
        404,
        "No cached answer for this request and replay mode never calls the upstream"
        f"{detail}. Record it first (GREYFOX_MODE=record) or import a cassette.",
        "cache_miss",
        "cache_miss",
        extra=extra,
    )


def describe_failure(e: BaseException) -> str:
    """A short reason, without tracebacks; unwraps twisted.web's failure lists."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(describe_failure(r.value) for r in reasons)
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]
