# -*- test-case-name: tests.test_tokens -*-
"""Token counting that works offline and counts streams exactly.

The two official encodings ship gzipped in ``greyfox/data`` (taken from the
MIT-licensed ``bpe-openai`` wheel; byte-identical to OpenAI's published files).
:func:`seed_cache` writes them where tiktoken looks before downloading, so
tiktoken itself checks them against the official SHA-256; nothing is fetched.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
from importlib import resources
from typing import Any, Iterable


_PUBLIC = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"

#: Official SHA-256 of each encoding file (as in tiktoken_ext.openai_public).
ENCODINGS = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}


#: Text larger than this is counted in the reactor's thread pool, not on the
#: reactor: tiktoken takes about 0.3 µs a token, so a 100k-token agent context
#: (or a long answer that came without usage) counted there would hold every
#: other connection for ~30 ms.  (It releases the GIL.)
THREADED_COUNT_BYTES = 16 * 1024


def seed_cache(cache_dir: str) -> None:
    """Write the shipped encodings into tiktoken's download cache.

    Called once at start-up (synchronous file I/O, off the request path).
    A file already there with the right hash is left alone.
    """
    os.makedirs(cache_dir, exist_ok=True)
    for name, sha in ENCODINGS.items():
        target = os.path.join(cache_dir, hashlib.sha1(_PUBLIC.format(name).encode()).hexdigest())
        if os.path.exists(target):
            with open(target, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() == sha:
                    continue
        data = gzip.decompress((resources.files("greyfox") / "data" / f"{name}.tiktoken.gz").read_bytes())
        if hashlib.sha256(data).hexdigest() != sha:
            raise RuntimeError(f"shipped {name} does not match its official SHA-256")
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)


def load_encodings(cache_dir: str) -> dict[str, Any]:
    """Seed the cache and load both encodings (about 0.5 s: call it in a thread)."""
    import tiktoken

    seed_cache(cache_dir)
    os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    return {name: tiktoken.get_encoding(name) for name in ENCODINGS}


def encoding_name_for(model: str) -> str:
    """The encoding a model uses; cl100k for models tiktoken does not know.

    For non-OpenAI models any count is an estimate; cl100k is a fair one.
    """
    from tiktoken.model import encoding_name_for_model

    base = model.rsplit("/", 1)[-1]
    try:
        name = encoding_name_for_model(base)
    except KeyError:
        return "cl100k_base"
    return name if name in ENCODINGS else "cl100k_base"


def rough_count(text: str) -> int:
    """A count for when no encoding is loaded yet: ~4 characters a token."""
    return (len(text) + 3) // 4


class IncrementalCounter:
    """Counts the tokens of a text that arrives in pieces, exactly.

    BPE never merges across the encoding's pre-tokenizer pieces, so every
    piece but the last two (which may still grow) is final and is encoded on
    its own.  The total equals ``len(enc.encode_ordinary(whole_text))`` for any
    chunking (see tests/test_tokens.py).

    Until an encoding is known (the tokenizers load in a thread, once), the
    text is kept, up to ``MAX_UNRESOLVED`` characters, and :attr:`total` is a
    rough count; once one is known (a later :meth:`feed` resolves it, or
    :meth:`resolve` is handed it) the kept text is counted and the total is
    exact again.
    """

    __slots__ = ("_enc", "_pat", "_pending", "_counted", "_all", "_resolve", "_rough")

    #: A single pre-tokenizer piece longer than this (a run of one character,
    #: base64...) is counted as it stands, so a pathological stream costs
    #: linear, not quadratic, time.  Real text never comes near it.
    MAX_PENDING = 1 << 16
    #: Text kept while no encoding is known; past it, the rest is counted roughly.
    MAX_UNRESOLVED = 4 << 20

    def __init__(self, enc: Any | None, resolve: Any = None) -> None:
        """``resolve``: a callable giving the encoding or ``None`` while it is
        not loaded, asked at each piece until it gives one."""
        self._resolve = resolve
        self._set(enc)
        self._pending = ""
        self._counted = 0
        self._all = 0  # characters seen, for the rough count
        self._rough = 0  # characters counted roughly (past MAX_UNRESOLVED, with no encoding)

    def _set(self, enc: Any | None) -> None:
        self._enc = enc
        self._pat = _compile(enc._pat_str) if enc is not None else None

    @property
    def exact(self) -> bool:
        """Whether :attr:`total` is tiktoken's count of the text fed."""
        return self._enc is not None and not self._rough

    def resolve(self, enc: Any | None) -> None:
        """Count with ``enc`` from now on, the text kept so far included."""
        if self._enc is None and enc is not None:
            self._set(enc)
            self._count_final()

    def feed(self, text: str) -> None:
        if not text:
            return
        self._all += len(text)
        if self._enc is None and self._resolve is not None:
            self._set(self._resolve())
        if self._enc is None:
            if len(self._pending) + len(text) <= self.MAX_UNRESOLVED:
                self._pending += text
            else:
                self._rough += len(text)
            return
        self._pending += text
        self._count_final()

    def _count_final(self) -> None:
        """Count the pieces of the pending text that can no longer change."""
        pending = self._pending
        ends = [m.end() for m in self._pat.finditer(pending)]
        if len(ends) > 2:
            start = 0
            for end in ends[:-2]:
                self._counted += len(self._enc.encode_ordinary(pending[start:end]))
                start = end
            pending = pending[start:]
        if len(pending) > self.MAX_PENDING:
            self._counted += len(self._enc.encode_ordinary(pending))
            pending = ""
        self._pending = pending

    @property
    def total(self) -> int:
        """Tokens of everything fed so far."""
        if self._enc is None:
            return (self._all + 3) // 4
        rough = (self._rough + 3) // 4
        if not self._pending:
            return self._counted + rough
        return self._counted + rough + len(self._enc.encode_ordinary(self._pending))


def count_text(enc: Any | None, text: str) -> int:
    if enc is None:
        return rough_count(text)
    return len(enc.encode_ordinary(text))


class KnownCounts:
    """Token counts of long prompt texts already seen, oldest forgotten first.

    An agent resends its whole conversation on every turn: without this,
    admission tokenized all of it again each time (quadratic in the
    conversation's length; ~0.3 µs a token).  A text shorter than
    ``MIN_CHARS`` is counted afresh (hashing and storing it would cost about
    as much); the texts kept come to at most ``max_chars`` characters.
    Thread-safe: large prompts are counted in the reactor's thread pool.
    """

    MIN_CHARS = 512

    def __init__(self, max_chars: int = 4_000_000) -> None:
        self.max_chars = max_chars
        self.chars = 0
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def count(self, enc: Any | None, text: str) -> int:
        if enc is None or len(text) < self.MIN_CHARS:
            return count_text(enc, text)
        key = (enc.name, text)
        known = self._counts.get(key)
        if known is not None:
            return known
        n = len(enc.encode_ordinary(text))  # (outside the lock: tiktoken releases the GIL)
        if len(text) <= self.max_chars:
            with self._lock:
                if key not in self._counts:
                    self._counts[key] = n
                    self.chars += len(text)
                    while self.chars > self.max_chars:
                        oldest = next(iter(self._counts))  # (dicts keep insertion order)
                        del self._counts[oldest]
                        self.chars -= len(oldest[1])
        return n


#: The process's memory of prompt texts (see KnownCounts).
known_counts = KnownCounts()


#: Parts nested deeper than this in a message's content are not counted (no API nests them).
MAX_CONTENT_DEPTH = 16


def _content_text(content: Any, depth: int = 0) -> Iterable[str]:
    """Text parts of a message ``content`` (a string or a list of parts)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list) and depth < MAX_CONTENT_DEPTH:
        for part in content:
            if isinstance(part, str):
                yield part
            elif isinstance(part, dict):
                for key in ("text", "input_text", "output_text"):
                    if isinstance(part.get(key), str):
                        yield part[key]
                if isinstance(part.get("content"), (str, list)):
                    yield from _content_text(part["content"], depth + 1)


def estimate_prompt_tokens(enc: Any | None, body: dict[str, Any], known: KnownCounts | None = None) -> int:
    """Prompt tokens of a request body, counted locally.

    Chat messages use OpenAI's published accounting (3 tokens a message plus
    3 to prime the reply); images and audio are not counted.  Long texts
    seen before are not tokenized again (``known``: the process's
    :data:`known_counts` by default).
    """
    count = (known or known_counts).count
    total = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += 3
            if isinstance(message, dict):
                for text in _content_text(message.get("content")):
                    total += count(enc, text)
                if isinstance(message.get("name"), str):
                    total += 1
                calls = message.get("tool_calls")
                if isinstance(calls, list):
                    for call in calls:
                        fn = call.get("function") if isinstance(call, dict) else None
                        if not isinstance(fn, dict):
                            continue
                        for key in ("name", "arguments"):
                            if isinstance(fn.get(key), str):
                                total += count(enc, fn[key])
        total += 3
    for text in _content_text(body.get("system")):  # the Messages API's system prompt
        total += count(enc, text)
    for key in ("prompt", "input", "instructions"):
        value = body.get(key)
        if isinstance(value, str):
            total += count(enc, value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    total += count(enc, item)
                elif isinstance(item, list):  # pre-tokenized input
                    total += len(item) if all(isinstance(t, int) for t in item) else 0
                elif isinstance(item, int):
                    total += 1
                elif isinstance(item, dict):
                    total += 3
                    for text in _content_text(item.get("content")):
                        total += count(enc, text)
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        import json

        total += count(enc, json.dumps(tools, separators=(",", ":")))
    return total


def _compile(pattern: str) -> Any:
    """tiktoken's pre-tokenizer pattern, compiled with ``regex`` (imported here:
    it costs 1.3 MB, and a proxy whose upstreams report usage never needs it)."""
    import regex

    return regex.compile(pattern)
