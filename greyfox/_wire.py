# -*- test-case-name: tests.test_wire -*-
"""HTTP/1.1 pieces both of GreyFox's connections share.  Pure functions and values.

The parsing itself is httptools (llhttp, Node.js's parser): this module only
holds header fields and writes message heads.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Iterable, Iterator

from twisted.web.http import RESPONSES

#: Header values are written as given; these two bytes would split a field.
_CRLF_FREE = bytes.maketrans(b"\r\n", b"  ")

#: Lower-cased name -> (the name as it came, its values), in arrival order.
Fields = dict[bytes, tuple[bytes, list[bytes]]]


def add_field(fields: Fields, name: bytes, value: bytes) -> None:
    """One more field, as a parser hands it over."""
    key = name.lower()
    field = fields.get(key)
    if field is None:
        fields[key] = (name, [value])
    else:
        field[1].append(value)


def first_value(fields: Fields, lower: bytes) -> bytes | None:
    """A field's first value; ``lower``: its name in lower case."""
    field = fields.get(lower)
    return None if field is None else field[1][0]


def as_fields(headers: Iterable[tuple[bytes, list[bytes]]]) -> Fields:
    """``(name, values)`` pairs (twisted.web's ``Headers``) as :data:`Fields`."""
    fields: Fields = {}
    for name, values in headers:
        for value in values:
            add_field(fields, name, value)
    return fields


class RawHeaders:
    """Header fields as bytes, matched by name without case, kept in arrival order.

    The part of ``twisted.web.http_headers.Headers`` the relay uses, without
    its per-call name normalisation (it showed in the profile).  ``fields``
    maps each lower-cased name to (the name as it came, its values): the
    parsers fill it as fields arrive, so no name is lowered twice.
    """

    __slots__ = ("fields",)

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] = (), fields: Fields | None = None) -> None:
        self.fields: Fields = {} if fields is None else fields
        for name, value in pairs:
            add_field(self.fields, name, value)

    def addRawHeader(self, name: bytes, value: bytes) -> None:
        add_field(self.fields, name, value)

    def setRawHeaders(self, name: bytes, values: list[bytes]) -> None:
        self.fields[name.lower()] = (name, list(values))

    def removeHeader(self, name: bytes) -> None:
        self.fields.pop(name.lower(), None)

    def hasHeader(self, name: bytes) -> bool:
        return name.lower() in self.fields

    def getRawHeaders(self, name: bytes, default: list | None = None) -> list | None:  # type: ignore[type-arg]
        field = self.fields.get(name.lower())
        return default if field is None else field[1]

    def first(self, name: bytes) -> bytes | None:
        return first_value(self.fields, name.lower())

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, list[bytes]]]:
        return iter(self.fields.values())

    def __repr__(self) -> str:
        return f"RawHeaders({list(self.fields.values())!r})"


def encode_fields(fields: Iterable[tuple[bytes, list[bytes]]]) -> bytes:
    """``Name: value\\r\\n`` lines; CR and LF inside a value become spaces."""
    return b"".join([name + b": " + value.translate(_CRLF_FREE) + b"\r\n" for name, values in fields for value in values])


_STATUS_LINES: dict[int, bytes] = {}


def status_line(code: int) -> bytes:
    line = _STATUS_LINES.get(code)
    if line is None:
        line = _STATUS_LINES[code] = b"HTTP/1.1 %d %s\r\n" % (code, RESPONSES.get(code, b"Unknown"))
    return line


class HttpDate:
    """The ``Date`` header value, formatted at most once a second."""

    def __init__(self, now: callable = time.time) -> None:  # type: ignore[valid-type]
        self._now = now
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        second = int(self._now())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode("ascii")
        return self._value
