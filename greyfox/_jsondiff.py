# -*- test-case-name: tests.test_jsondiff -*-
"""What differs between two JSON requests, as JSON paths.  Pure functions.

A replay miss is explained by the recorded request nearest to it: the one
with the fewest differing leaves, and those leaves as paths such as
``messages[1].content`` with short old and new values.  Objects are compared
key by key in sorted order, arrays index by index, so the same two requests
always give the same lines.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

import attr

#: Stands for a key or array element that one side does not have.
ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "ABSENT"})()

#: A value is shown in at most this many characters (strings around their first difference).
SHOWN = 48

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@attr.s(auto_attribs=True, frozen=True)
class Difference:
    """One leaf that differs: its path, and its value on each side (or :data:`ABSENT`)."""

    path: str
    old: Any
    new: Any

    def line(self) -> str:
        """``messages[0].content: "Say hi" → "Say hello"``, each value shortened."""
        old, new = shorten_pair(self.old, self.new)
        return f"{self.path or '(the whole body)'}: {old} → {new}"


def child_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if _NAME.match(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{json.dumps(key, ensure_ascii=False)}]"


def differences(old: Any, new: Any, path: str = "") -> list[Difference]:
    """Every leaf of ``old`` and ``new`` that differs, in document order."""
    return list(_walk(old, new, path))


def _walk(old: Any, new: Any, path: str) -> Iterator[Difference]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            yield from _walk(old.get(key, ABSENT), new.get(key, ABSENT), child_path(path, key))
    elif isinstance(old, list) and isinstance(new, list):
        for i in range(max(len(old), len(new))):
            yield from _walk(old[i] if i < len(old) else ABSENT, new[i] if i < len(new) else ABSENT, child_path(path, i))
    elif not same(old, new):
        yield Difference(path, old, new)


def same(a: Any, b: Any) -> bool:
    """JSON equality: ``1`` is not ``true`` and ``1`` is not ``1.0`` (Python says both are)."""
    return a is b or (type(a) is type(b) and a == b)


def distance(old: Any, new: Any) -> int:
    """How far apart two requests are: the number of leaves that differ."""
    return sum(max(_leaf_count(d.old), _leaf_count(d.new)) for d in _walk(old, new, ""))


def _leaf_count(value: Any) -> int:
    """A whole subtree present on one side only weighs its leaves (a new message is not one small change)."""
    if value is ABSENT:
        return 0
    if isinstance(value, dict):
        return sum(_leaf_count(v) for v in value.values()) or 1
    if isinstance(value, list):
        return sum(_leaf_count(v) for v in value) or 1
    return 1


def nearest(target: Any, candidates: Iterator[tuple[str, Any]] | list[tuple[str, Any]]) -> tuple[str, list[Difference]] | None:
    """The candidate ``(name, request)`` nearest to ``target`` and what differs;
    the first of equally near ones wins (callers list the most recent first)."""
    best: tuple[int, str, Any] | None = None
    for name, request in candidates:
        d = distance(request, target)
        if best is None or d < best[0]:
            best = (d, name, request)
    if best is None:
        return None
    return best[1], differences(best[2], target)


def shorten_pair(old: Any, new: Any) -> tuple[str, str]:
    """Both values as short JSON text; two long strings are cut around their first difference."""
    if isinstance(old, str) and isinstance(new, str):
        start = _common_prefix(old, new)
        return _window(old, start), _window(new, start)
    return _shown(old), _shown(new)


def _shown(value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    if isinstance(value, str):
        return _window(value, 0)
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


def _window(text: str, start: int) -> str:
    """``text`` as a JSON string of at most about :data:`SHOWN` characters that shows ``text[start]``."""
    if len(text) <= SHOWN:
        return json.dumps(text, ensure_ascii=False)
    begin = max(0, min(start - SHOWN // 3, len(text) - SHOWN))
    end = begin + SHOWN
    body = json.dumps(text[begin:end], ensure_ascii=False)[1:-1]
    return '"' + ("…" if begin else "") + body + ("…" if end < len(text) else "") + '"'


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
