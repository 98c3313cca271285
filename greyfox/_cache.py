# -*- test-case-name: tests.test_cache -*-
"""The response cache: an in-memory index over bodies in SQLite (compressed past 1 KiB).

What decides a hit (key, scope, age, size, usage) lives in memory, so a
lookup never waits on the database; a body is read from SQLite only when it
is not among the recently used bodies kept in memory.  Bodies are compressed
and written in the pool's thread, off the reactor.  The total stored size is
capped, least recently used entries go first.
"""

from __future__ import annotations

import base64
import json
import operator
import os
import zlib
from collections import OrderedDict
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import attr
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ._cachekey import SHARED, canonical_request, key_of
from ._jsondiff import Difference, nearest
from ._store import meta_value
from ._sse import SSEParser
from ._usage import Usage, is_usage_only

log = Logger()

#: Entries larger than this (uncompressed) are not cached.
MAX_ENTRY_BYTES = 8 * 1024 * 1024
#: Decompressed bodies kept in memory for instant hits.
HOT_BYTES = 64 * 1024 * 1024
CASSETTE_VERSION = 1
#: A cassette entry's ``usage`` fields (any may be left out: 0).
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens")
#: Where a price came from (SPEC §5); ``None``: no price known.
COST_SOURCES = (None, "upstream", "table", "config")

_COLUMNS = (
    "key", "scope", "upstream", "path", "model", "stream", "status", "content_type",
    "created", "last_used", "size", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
    "cache_write_tokens", "reasoning_tokens", "cost_source",
)
#: An entry's values in column order, in one C call.
_entry_values = operator.attrgetter(*_COLUMNS)
#: Every column of the table: the entry's, the body and the canonical request.
TABLE_COLUMNS = _COLUMNS + ("body", "request")


@attr.s(auto_attribs=True, slots=True)
class CacheEntry:
    """What the index knows of a stored answer (its body is in SQLite)."""

    key: str
    scope: str
    upstream: str
    path: str
    model: str | None
    stream: bool
    status: int
    content_type: str
    created: float
    last_used: float
    size: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float | None = None
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_source: str | None = None

    @property
    def id(self) -> str:
        return f"{self.scope}:{self.key}"

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens, self.cache_write_tokens,
                     self.reasoning_tokens, self.cost_usd if self.cost_source == "upstream" else None)

    def row(self) -> tuple[Any, ...]:
        return _entry_values(self)


def _entry_of(row: Sequence[Any]) -> CacheEntry:
    """The entry of a row whose first columns are :data:`_COLUMNS` (``stream`` is an integer there)."""
    return CacheEntry(*row[:5], bool(row[5]), *row[6:len(_COLUMNS)])


class Body:
    """A decompressed body.  For a stream, the variant without the usage-only
    chunk is made the first time a client that did not ask for usage needs it
    (storing an answer should not pay for a replay that may never come)."""

    __slots__ = ("full", "stream", "_without_usage")

    def __init__(self, full: bytes, stream: bool = False) -> None:
        self.full = full
        self.stream = stream
        self._without_usage: bytes | None = None

    def for_client(self, wants_usage_chunk: bool) -> bytes:
        if wants_usage_chunk or not self.stream:
            return self.full
        if self._without_usage is None:
            parser = SSEParser(max_event_bytes=len(self.full) + 1)
            events = parser.feed(self.full)
            tail = parser.flush()
            if tail is not None:
                events.append(tail)
            self._without_usage = b"".join(e.raw for e in events if not is_usage_only(e))
        return self._without_usage


# -- SQL, run in the pool's thread --


_SIZE = _COLUMNS.index("size")


#: Bodies shorter than this are stored as they are: compressing one costs
#: 8-15 µs whatever its size (zlib's set-up), to save a few hundred bytes.
COMPRESS_FROM = 1024
#: The first byte of a body stored as it is.  A zlib stream never starts
#: with it (its first byte names the method, 8), so older rows read as before.
_RAW = b"\x00"


def pack_body(body: bytes) -> bytes:
    """A body as the ``body`` column stores it."""
    return _RAW + body if len(body) < COMPRESS_FROM else zlib.compress(body, 1)  # level 1: JSON and SSE still shrink 3-5x


def unpack_body(blob: bytes) -> bytes:
    return blob[1:] if blob[:1] == _RAW else zlib.decompress(blob)


def _store_many_txn(txn: Any, batch: list[tuple[tuple[Any, ...], bytes, bytes | None]]) -> list[int]:
    """Pack and write a batch of (entry row, body, canonical request) in one
    transaction (in the pool's thread); the stored sizes of the bodies, in order."""
    rows, sizes = [], []
    for row, body, request in batch:
        blob = pack_body(body)
        sizes.append(len(blob))
        packed = pack_body(request) if request is not None else None
        rows.append(row[:_SIZE] + (len(blob),) + row[_SIZE + 1 :] + (blob, packed))
    txn.executemany(txn.engine.upsert("cache", TABLE_COLUMNS, ("key", "scope")), rows)
    return sizes


def _body_txn(txn: Any, key: str, scope: str) -> bytes | None:
    txn.execute("SELECT body FROM cache WHERE key = ? AND scope = ?", (key, scope))
    row = txn.fetchone()
    return unpack_body(row[0]) if row else None


#: A replay miss compares itself with at most this many recorded requests.
NEAREST_CANDIDATES = 200


@attr.s(auto_attribs=True, frozen=True)
class Nearest:
    """The recorded request nearest to a missed one: its key, and what differs (old = recorded)."""

    key: str
    differences: list[Difference]


def _nearest_txn(txn: Any, candidates: list[tuple[str, str]], waiting: dict[tuple[str, str], bytes],
                 request: bytes) -> Nearest | None:
    target = json.loads(request)

    def recorded() -> Iterator[tuple[str, Any]]:
        for key, scope in candidates:
            data = waiting.get((key, scope))
            if data is None:
                txn.execute("SELECT request FROM cache WHERE key = ? AND scope = ?", (key, scope))
                row = txn.fetchone()
                if row is None or row[0] is None:  # gone, or stored before requests were kept
                    continue
                data = unpack_body(row[0])
            yield key, json.loads(data)

    found = nearest(target, recorded())
    return Nearest(*found) if found is not None else None


def _delete_txn(txn: Any, ids: list[tuple[str, str]]) -> None:
    txn.executemany("DELETE FROM cache WHERE key = ? AND scope = ?", ids)


def _touch_txn(txn: Any, touched: list[tuple[float, str, str]]) -> None:
    txn.executemany("UPDATE cache SET last_used = ? WHERE key = ? AND scope = ?", touched)


@attr.s(auto_attribs=True)
class CacheStats:
    """Lifetime cache counters, seeded from the ledger at start, kept in memory."""

    hits: int = 0
    misses: int = 0
    saved_tokens: int = 0
    saved_usd: float = 0.0

    def observe(self, cache: str, saved_tokens: int, saved_usd: float) -> None:
        if cache == "HIT":
            self.hits += 1
            self.saved_tokens += saved_tokens
            self.saved_usd += saved_usd
        elif cache in ("MISS", "REFRESH"):
            self.misses += 1


def load_stats(conn: Any) -> CacheStats:
    row = conn.execute(
        "SELECT COALESCE(SUM(CASE WHEN cache = 'HIT' THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN cache IN ('MISS', 'REFRESH') THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(saved_tokens), 0), COALESCE(SUM(saved_usd), 0) FROM ledger"
    ).fetchone()
    return CacheStats(int(row[0]), int(row[1]), int(row[2]), float(row[3]))  # (PostgreSQL sums in Decimal)


def load_index(conn: Any) -> list[CacheEntry]:
    """Every entry's metadata, least recently used first (start-up, synchronous)."""
    rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM cache ORDER BY last_used").fetchall()
    return [_entry_of(r) for r in rows]


#: Entries stored by other instances are looked for this far back from the
#: newest one seen (their clocks may differ from this one's by up to this
#: much, and their writes land up to a batch later).
LEARN_WINDOW = 10.0
#: At most this many new entries are taken per look.
LEARN_BATCH = 1000


def recent_entries_txn(txn: Any, since: float) -> list[CacheEntry]:
    """Entries created after ``since`` (any instance's), oldest first."""
    txn.execute(f"SELECT {', '.join(_COLUMNS)} FROM cache WHERE created > ? ORDER BY created LIMIT {LEARN_BATCH}",
                (since,))
    return [_entry_of(r) for r in txn.fetchall()]


def installation_secret(conn: Any) -> bytes:
    """The random key of credential fingerprints, created once per database."""
    found = meta_value(conn, "fingerprint_secret")
    if found is not None:
        return bytes.fromhex(found)
    secret = os.urandom(32)
    with conn.transaction():
        conn.execute("INSERT INTO meta (name, value) VALUES ('fingerprint_secret', ?)", (secret.hex(),))
    return secret


class Cache:
    """The index, the hot bodies, and the writes behind them.

    :param run: ``ConnectionPool.runInteraction`` or a stand-in.
    :param read: the same for the body reads (``run`` when not given): on a
        connection of their own, a write waiting on a locked database does
        not hold a cold hit up.
    :param ttl: seconds an entry stays valid; 0 = forever.
    :param max_bytes: cap on the stored (compressed) size.
    """

    #: Stores wait this long for companions: one transaction for all of them.
    WRITE_DELAY = 0.1

    def __init__(
        self,
        run: Callable[..., Deferred[Any]],
        clock: IReactorTime,
        entries: Iterable[CacheEntry] = (),
        ttl: float = 0.0,
        max_bytes: int = 1024 * 1024 * 1024,
        hot_bytes: int = HOT_BYTES,
        read: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        self._run = run
        self._read = read or run
        self._clock = clock
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._index: OrderedDict[str, CacheEntry] = OrderedDict((e.id, e) for e in entries)
        #: Entries written to the database, and their bytes there: one consistent
        #: snapshot (an entry served from memory before its write is in neither).
        self.stored = sum(1 for e in self._index.values() if e.size)
        self.bytes = sum(e.size for e in self._index.values())
        self._hot: OrderedDict[str, Body] = OrderedDict()
        self._hot_bytes = 0
        self._hot_cap = hot_bytes
        self._touched: dict[str, CacheEntry] = {}
        self._touch_call: Any = None
        self._writes: list[tuple[CacheEntry, bytes, bytes | None]] = []
        self._write_call: Any = None

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, key: str, scopes: Iterable[str]) -> CacheEntry | None:
        """The freshest valid entry for ``key`` in the first scope that has one."""
        now = self._clock.seconds()
        for scope in scopes:
            entry = self._index.get(f"{scope}:{key}")
            if entry is None:
                continue
            if self.ttl and now - entry.created > self.ttl:
                self._forget([entry])
                continue
            return entry
        return None

    def hot_body(self, entry: CacheEntry) -> Body | None:
        """The entry's body if it is in memory (then it counts as used), else ``None``."""
        hot = self._hot.get(entry.id)
        if hot is not None:
            self._use(entry)
            self._hot.move_to_end(entry.id)
        return hot

    async def body(self, entry: CacheEntry) -> Body | None:
        """The entry's body: from memory, else one read in the pool's thread."""
        hot = self.hot_body(entry)
        if hot is not None:
            return hot
        self._use(entry)
        data = await self._read(_body_txn, entry.key, entry.scope)
        if data is None:
            self._forget([entry])
            return None
        body = Body(data, entry.stream)
        self._keep_hot(entry.id, body)
        return body

    def store(self, entry: CacheEntry, data: bytes, request: bytes | None = None) -> None:
        """Store a complete answer (and the canonical request it answers).  It is served from memory at once; the
        write is batched with the others of the next :attr:`WRITE_DELAY`
        seconds (one transaction; a failed write is logged and the entry
        dropped).  No Deferred per entry: this runs for every relayed answer."""
        if len(data) > MAX_ENTRY_BYTES:
            return
        eid = entry.id
        old = self._index.pop(eid, None)
        if old is not None:
            self._uncount(old)
        self._index[eid] = entry
        self._keep_hot(eid, Body(data, entry.stream))
        self._writes.append((entry, data, request))
        if self._write_call is None:
            self._write_call = self._clock.callLater(self.WRITE_DELAY, self._write_batch)

    def flush(self) -> Deferred[None]:
        """Write what waits for the next batch now (at shutdown, before the database closes)."""
        if self._write_call is not None and self._write_call.active():
            self._write_call.cancel()
        if self._touch_call is not None and self._touch_call.active():
            self._touch_call.cancel()
        writes = [self._write_batch()] if self._writes else []
        if self._touched:
            writes.append(self._write_touches())
        self._write_call = self._touch_call = None
        return DeferredList(writes, consumeErrors=True).addCallback(lambda _: None)

    def _write_batch(self) -> Deferred[None]:
        self._write_call = None
        batch, self._writes = self._writes, []
        copies = [(entry.row(), data, request) for entry, data, request in batch]  # a snapshot: the entry may change meanwhile

        def written(sizes: list[int]) -> None:
            for (entry, _, _), size in zip(batch, sizes):
                if self._index.get(entry.id) is entry:
                    entry.size = size
                    self.bytes += size
                    self.stored += 1
            self._evict()

        def failed(f: Any) -> None:
            log.warn("cache: could not store {n} entries ({reason})", n=len(batch), reason=f.getErrorMessage())
            for entry, _, _ in batch:
                if self._index.get(entry.id) is entry:
                    del self._index[entry.id]
                self._drop_hot(entry.id)

        return self._run(_store_many_txn, copies).addCallbacks(written, failed)

    def clear(self, model: str | None = None, older_than: float | None = None) -> Deferred[int]:
        """Remove entries (all, or of one model, or created before a time); fires with the count."""
        doomed = [
            e for e in self._index.values()
            if (model is None or e.model == model) and (older_than is None or e.created < older_than)
        ]
        return self._forget(doomed).addCallback(lambda _: len(doomed))

    def entries(self) -> list[CacheEntry]:
        return list(self._index.values())

    def learn(self, entries: Iterable[CacheEntry]) -> int:
        """Add entries another instance stored in the shared database (their
        bodies are read on first use); those known already are left as they
        are.  The number added."""
        added = 0
        for entry in entries:
            if entry.id in self._index:
                continue
            self._index[entry.id] = entry
            if entry.size:
                self.bytes += entry.size
                self.stored += 1
            added += 1
        return added

    def newest(self) -> float:
        """The creation time of the newest entry known (0 when there is none)."""
        return max((e.created for e in self._index.values()), default=0.0)

    def nearest(self, upstream: str, path: str, scopes: Iterable[str], request: bytes) -> Deferred[Nearest | None]:
        """The recorded request of the same upstream and path nearest to ``request``
        (canonical JSON), and what differs; read and compared in the read pool's thread.
        Only the :data:`NEAREST_CANDIDATES` most recently used entries are compared."""
        readable = set(scopes)
        candidates = list(islice(
            ((e.key, e.scope) for e in reversed(self._index.values())
             if e.upstream == upstream and e.path == path and e.scope in readable),
            NEAREST_CANDIDATES,
        ))
        waiting = {(e.key, e.scope): r for e, _, r in self._writes if r is not None}  # not in the database yet
        return self._read(_nearest_txn, candidates, waiting, request)

    # -- internals --

    def _use(self, entry: CacheEntry) -> None:
        entry.last_used = self._clock.seconds()
        if entry.id in self._index:
            self._index.move_to_end(entry.id)
        self._touched[entry.id] = entry
        if self._touch_call is None:
            self._touch_call = self._clock.callLater(5, self._write_touches)

    def _write_touches(self) -> Deferred[None]:
        self._touch_call = None
        touched, self._touched = self._touched, {}
        rows = [(e.last_used, e.key, e.scope) for e in touched.values()]
        return self._run(_touch_txn, rows).addErrback(lambda f: None)  # LRU order is a hint

    def _keep_hot(self, entry_id: str, body: Body) -> None:
        size = _hot_size(body)
        if size > self._hot_cap:
            return
        self._drop_hot(entry_id)
        self._hot[entry_id] = body
        self._hot_bytes += size
        while self._hot_bytes > self._hot_cap:
            _, old = self._hot.popitem(last=False)
            self._hot_bytes -= _hot_size(old)

    def _drop_hot(self, entry_id: str) -> None:
        body = self._hot.pop(entry_id, None)
        if body is not None:
            self._hot_bytes -= _hot_size(body)

    def _evict(self) -> None:
        doomed = []
        total = self.bytes
        for entry in self._index.values():  # least recently used first
            if total <= self.max_bytes:
                break
            doomed.append(entry)
            total -= entry.size
        if doomed:
            self._forget(doomed)

    def _uncount(self, entry: CacheEntry) -> None:
        if entry.size:
            self.bytes -= entry.size
            self.stored -= 1

    def _forget(self, entries: list[CacheEntry]) -> Deferred[Any]:
        for e in entries:
            if self._index.pop(e.id, None) is not None:
                self._uncount(e)
            self._drop_hot(e.id)
            self._touched.pop(e.id, None)
        d = self._run(_delete_txn, [(e.key, e.scope) for e in entries])
        return d.addErrback(lambda f: log.warn("cache: could not delete entries ({r})", r=f.getErrorMessage()))


def _hot_size(body: Body) -> int:
    """Memory a hot body may hold: a stream counts its variant, made or not yet."""
    return len(body.full) * (2 if body.stream else 1)


# -- cassettes: JSON Lines, no credentials; used by the command line, synchronously --


def export_lines(conn: Any, include_private: bool = False) -> Iterator[str]:
    """One JSON line per entry, sorted by key, fields sorted: a re-recorded
    cassette diffs line by line.  Entries bought with a client's own credential
    are left out unless ``include_private`` (they are then written as shared,
    and a shared entry of the same key wins)."""
    where = "" if include_private else "WHERE scope = 'shared'"
    last_key = None
    for row in conn.execute(
        f"SELECT {', '.join(TABLE_COLUMNS)} FROM cache {where} ORDER BY key, scope = 'shared' DESC, scope"
    ):
        entry = _entry_of(row)
        if entry.key == last_key:
            continue
        last_key = entry.key
        data, request = unpack_body(row[-2]), row[-1]
        doc: dict[str, Any] = {
            "version": CASSETTE_VERSION,
            "key": entry.key,
            "upstream": entry.upstream,
            "path": entry.path,
            "model": entry.model,
            "stream": entry.stream,
            "status": entry.status,
            "content_type": entry.content_type,
            "created": entry.created,
            "usage": {k: getattr(entry, k) for k in USAGE_FIELDS},
            "cost_usd": entry.cost_usd,
            "cost_source": entry.cost_source,
        }
        if request is not None:
            doc["request"] = json.loads(unpack_body(request))
        try:
            doc["body"] = data.decode("utf-8")
        except UnicodeDecodeError:
            doc["body_b64"] = base64.b64encode(data).decode("ascii")
        yield json.dumps(doc, ensure_ascii=False, sort_keys=True)


class CassetteError(Exception):
    """A cassette line is unusable; the message names the line."""


def _parse_line(number: int, line: str) -> tuple[CacheEntry, bytes, bytes | None]:
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise CassetteError(f"line {number}: not JSON ({e})") from None

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise CassetteError(f"line {number}: {what}")

    need(isinstance(doc, dict), "not a JSON object")
    need(doc.get("version") == CASSETTE_VERSION, f"version must be {CASSETTE_VERSION}")
    key = doc.get("key")
    need(isinstance(key, str) and len(key) == 64 and all(c in "0123456789abcdef" for c in key), "key must be 64 hex digits")
    for field in ("upstream", "path", "content_type"):
        need(isinstance(doc.get(field), str) and doc[field], f"{field} must be a non-empty string")
    need(doc.get("model") is None or isinstance(doc["model"], str), "model must be a string")
    need(isinstance(doc.get("stream"), bool), "stream must be true or false")
    need(doc.get("status") == 200, "status must be 200")
    need(isinstance(doc.get("created"), (int, float)), "created must be a number")
    usage = doc.get("usage")
    need(isinstance(usage, dict), "usage must be an object")
    counts = {k: usage.get(k, 0) for k in USAGE_FIELDS}
    need(all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**63 for n in counts.values()),
         "usage counts must be whole numbers")
    cost = doc.get("cost_usd")
    need(cost is None or (isinstance(cost, (int, float)) and cost >= 0), "cost_usd must be a number or null")
    source = doc.get("cost_source")
    need(source in COST_SOURCES, f"cost_source must be one of {', '.join(map(str, COST_SOURCES))}")
    if isinstance(doc.get("body"), str):
        data = doc["body"].encode("utf-8")
    elif isinstance(doc.get("body_b64"), str):
        try:
            data = base64.b64decode(doc["body_b64"], validate=True)
        except ValueError:
            raise CassetteError(f"line {number}: body_b64 is not base64") from None
    else:
        raise CassetteError(f"line {number}: body or body_b64 is required")
    need(len(data) <= MAX_ENTRY_BYTES, "body is larger than a cache entry may be")
    request = None
    if "request" in doc:
        need(isinstance(doc["request"], dict), "request must be a JSON object")
        request = canonical_request(doc["request"])
        need(key_of(doc["upstream"], doc["path"], request) == key,
             "key does not match the request (a changed request needs recording again)")
    entry = CacheEntry(
        key, SHARED, doc["upstream"], doc["path"], doc.get("model"), doc["stream"], 200, doc["content_type"],
        float(doc["created"]), float(doc["created"]), 0, cost_usd=cost, cost_source=source, **counts,
    )
    return entry, data, request


def import_lines(conn: Any, lines: Iterable[str]) -> int:
    """Validate every line, then insert all of them in one transaction (or none)."""
    parsed = [_parse_line(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    with conn.transaction():
        _store_many_txn(conn.cursor(), [(entry.row(), data, request) for entry, data, request in parsed])
    return len(parsed)
