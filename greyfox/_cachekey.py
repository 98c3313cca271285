# -*- test-case-name: tests.test_cachekey -*-
"""Cache keys and credential fingerprints.  Pure functions.

A key is SHA-256 over the upstream name, the path and the canonical JSON of
the body as sent upstream (sorted keys, no insignificant whitespace,
:data:`IGNORED_FIELDS` left out).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

#: The scope of entries bought with GreyFox's own upstream key.
SHARED = "shared"

#: Body fields that cannot change the answer and so never split entries:
#: whether a stream ends with a usage chunk, and whether OpenRouter reports
#: its cost in the usage (GreyFox asks for it when the client did not).
IGNORED_FIELDS = frozenset({"stream_options", "usage"})


#: One encoder, made once: json.dumps builds a new one per call when given options.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(doc: Any) -> bytes:
    return _CANONICAL.encode(doc).encode("utf-8")


def canonical_request(body: dict[str, Any]) -> bytes:
    """The request as the key sees it: canonical JSON without the ignored fields.
    Cache entries and cassettes keep it, to explain a later miss."""
    kept = {k: v for k, v in body.items() if k not in IGNORED_FIELDS} if "stream_options" in body or "usage" in body else body
    return canonical_json(kept)


def key_of(upstream: str, path: str, canonical: bytes) -> str:
    """The hex key of a request given its :func:`canonical_request`."""
    h = hashlib.sha256()
    h.update(upstream.encode("utf-8") + b"\n" + path.encode("utf-8") + b"\n")
    h.update(canonical)
    return h.hexdigest()


def cache_key(upstream: str, path: str, body: dict[str, Any]) -> str:
    """The hex key of a request: same upstream, path and body fields -> same key."""
    return key_of(upstream, path, canonical_request(body))


def credential_scope(secret: bytes, credential: bytes) -> str:
    """A keyed fingerprint of a pass-through credential: the scope of what it bought.

    The credential itself is never stored; without the installation's secret
    the fingerprint says nothing about it.
    """
    return "cred:" + hmac.new(secret, credential, hashlib.sha256).hexdigest()[:32]
