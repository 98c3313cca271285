# -*- test-case-name: tests.test_json -*-
"""Parsing the JSON bodies that pass through, once each and cheaply.  Pure functions.

``json.loads(bytes)`` sniffs the encoding and matches a whitespace regex on
either side of the document: for a request body that is half of its cost.
Bodies on the wire are UTF-8 objects (RFC 8259 §8.1), so :func:`loads`
decodes UTF-8 and runs the scanner directly, and hands anything else (a BOM,
UTF-16, surrounding whitespace, an error) to ``json.loads`` unchanged, so
that results and error messages are the standard library's.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterator

_BLANK = " \t\n\r"


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is past a float's range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_PLAIN = json.JSONDecoder()
#: RFC 8259 JSON only: no NaN or Infinity, no number that overflows a float.
_STRICT = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)


def loads(body: bytes, decoder: json.JSONDecoder = _PLAIN) -> Any:
    """``json.loads(body)``, faster for a UTF-8 object with nothing around it."""
    if body[:1] == b"{":
        try:
            text = body.decode("utf-8", "surrogatepass")
            doc, end = decoder.scan_once(text, 0)
        except (StopIteration, ValueError):
            pass  # (the standard path says what is wrong, below)
        else:
            if end == len(text) or not text[end:].strip(_BLANK):
                return doc
    return decoder.decode(body.decode(json.detect_encoding(body), "surrogatepass"))


#: A body that may hold a lone surrogate: a ``\u`` escape, UTF-8-encoded
#: surrogate bytes (which ``json.loads`` takes, as ``surrogatepass`` decodes
#: them), or a NUL byte (UTF-16 and UTF-32, which ``json.loads`` also takes).
_MAY_HOLD_SURROGATES = re.compile(rb"\\u|\xed[\xa0-\xbf]|\x00")


def loads_request(body: bytes) -> Any:
    """A client's JSON body, as :func:`loads` parses it, refused (``ValueError``)
    when it holds what GreyFox could neither key, forward as UTF-8 nor record:
    ``NaN``, ``Infinity``, a number past a float's range (``1e999``), a lone
    surrogate, or nesting too deep to parse."""
    try:
        doc = loads(body, _STRICT)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    if _MAY_HOLD_SURROGATES.search(body):
        _check_text(doc)
    return doc


def _walk(doc: Any) -> Iterator[Any]:
    """Every value in ``doc``, and every key, depth first (no recursion)."""
    stack = [doc]
    while stack:
        value = stack.pop()
        yield value
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _check_text(doc: Any) -> None:
    for value in _walk(doc):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone surrogate (\\ud800-\\udfff), which is not text") from None

