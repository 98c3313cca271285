# -*- test-case-name: tests.test_routing -*-
"""Where a request goes and which headers travel with it.  Pure functions."""

from __future__ import annotations

from typing import Iterable, Mapping
from urllib.parse import unquote_to_bytes

import attr

from ._config import Upstream

#: Lower-cased name -> (the name as it came, its values), in arrival order.
Fields = dict[bytes, tuple[bytes, list[bytes]]]


def as_fields(headers: Iterable[tuple[bytes, list[bytes]]]) -> Fields:
    """``(name, values)`` pairs (twisted.web's ``Headers.getAllRawHeaders``) as :data:`Fields`."""
    fields: Fields = {}
    for name, values in headers:
        key = name.lower()
        field = fields.get(key)
        if field is None:
            fields[key] = (name, list(values))
        else:
            field[1].extend(values)
    return fields


def first_value(fields: Fields, lower: bytes) -> bytes | None:
    """A field's first value; ``lower``: its name in lower case."""
    field = fields.get(lower)
    return None if field is None else field[1][0]

# RFC 9110 §7.6.1 hop-by-hop headers, plus what the relay re-frames itself:
# the upstream client decodes gzip and de-chunks, the server re-frames the response.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"content-encoding",
        b"host",
    }
)

# Never sent upstream: GreyFox's own credential and controls, client cookies,
# Accept-Encoding (the HTTP client asks for gzip and decodes it itself) and
# Expect (twisted.web answered the client's 100-continue; the body is here).
_NOT_FORWARDED = frozenset({b"authorization", b"x-api-key", b"cookie", b"accept-encoding", b"x-app-user-id", b"expect"})

# Never relayed back: an upstream's cookies are not the client's business.
_NOT_RELAYED = frozenset({b"set-cookie", b"set-cookie2"})


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Route:
    """An upstream and the model name as that upstream knows it."""

    upstream: Upstream
    model: str | None
    prefixed: bool = False


def resolve(model: str | None, upstreams: Mapping[str, Upstream], default: str, api: str = "openai") -> Route:
    """``deepseek/deepseek-chat`` -> (deepseek, ``deepseek-chat``); else the default upstream.

    Only the name of an upstream that speaks the request's ``api`` counts as a
    prefix, so ``anthropic/claude-sonnet-4`` sent for chat completions to a
    default OpenRouter upstream keeps its slash.
    """
    if model and "/" in model:
        prefix, _, rest = model.partition("/")
        upstream = upstreams.get(prefix)
        if upstream is not None and upstream.api == api and rest:
            return Route(upstream, rest, True)
    return Route(upstreams[default], model)


#: What never goes upstream, and what never comes back, by lower-cased name.
_NOT_SENT = HOP_BY_HOP | _NOT_FORWARDED
_NOT_RETURNED = HOP_BY_HOP | _NOT_RELAYED


def _named_by_connection(fields: Fields) -> frozenset[bytes]:
    """The fields a ``Connection`` header names as hop-by-hop."""
    field = fields.get(b"connection")
    if field is None:
        return frozenset()
    return frozenset(t.strip().lower() for value in field[1] for t in value.split(b",") if t.strip())


def forwarded_fields(fields: Fields) -> list[tuple[bytes, list[bytes]]]:
    """The client's headers as they may go upstream (no hop-by-hop, no credentials)."""
    drop = _NOT_SENT
    if b"connection" in fields:
        drop = drop | _named_by_connection(fields)
    return [field for lower, field in fields.items() if lower not in drop and not lower.startswith(b"x-greyfox-")]


def returned_fields(fields: Fields) -> list[tuple[bytes, list[bytes]]]:
    """The upstream's response headers as they may go to the client."""
    drop = _NOT_RETURNED
    if b"connection" in fields:
        drop = drop | _named_by_connection(fields)
    return [field for lower, field in fields.items() if lower not in drop]


def upstream_authorization(upstream: Upstream, client_credential: tuple[bytes, bytes] | None,
                           client_token_set: bool) -> tuple[bytes, bytes] | None:
    """The credential header to send upstream, as ``(name, value)``.

    The upstream's own key when it has one (``Authorization: Bearer``, or
    ``x-api-key`` for the Anthropic API); otherwise the client's own header
    passes through, unless it is GreyFox's own client token.
    """
    if upstream.api_key:
        key = upstream.api_key.encode("latin-1")
        return (b"x-api-key", key) if upstream.api == "anthropic" else (b"Authorization", b"Bearer " + key)
    if client_token_set:
        return None
    return client_credential


def path_problem(target: bytes) -> str | None:
    """Why a ``/v1`` request target (after ``/v1``) must not be appended to an
    upstream's base URL, or ``None`` when it may.

    A dot segment (``/v1/../x``, plain or percent-encoded) or an empty one
    would reach other paths of the upstream with GreyFox's key; a backslash
    is a separator to some servers; bytes outside ASCII are not a URL.
    """
    path, _, query = target.partition(b"?")
    if not target.isascii() or any(c < 0x21 or c == 0x7F for c in target):
        return "a URL holds printable ASCII only"
    decoded = unquote_to_bytes(path)
    if b"\\" in decoded:
        return "a backslash is not allowed"
    segments = decoded.split(b"/")[1:]
    if any(segment in (b"", b".", b"..") for segment in segments) and target != b"/":
        return "empty, '.' and '..' segments are not allowed"
    return None


def upstream_url(upstream: Upstream, subpath: bytes, query: bytes = b"") -> bytes:
    """``base_url`` + the path after ``/v1`` (+ the query string), as sent on the wire.
    An Anthropic base URL has no ``/v1`` (as for the Anthropic SDK)."""
    url = upstream.base_url.encode("ascii") + (b"/v1" if upstream.api == "anthropic" else b"") + subpath
    if query:
        url += b"?" + query
    return url


def bearer(header: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer`` header, if that is what it is."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None
