# -*- test-case-name: tests.test_store -*-
"""SQLite persistence through adbapi: schema, the group-commit ledger, queries.

The schema is migrated synchronously at start-up, before the port opens.  At
run time every statement goes through one ``adbapi.ConnectionPool`` with a
single connection (more connections lose updates silently on SQLite).
Functions named ``*_txn`` run in the pool's thread with a cursor.
"""

from __future__ import annotations

import json
import math
import operator
import os
from typing import Any, Callable, Sequence

import attr
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ._engines import Connection, Cursor, engine_for, quoted

log = Logger()

# Each entry migrates from version i to i + 1; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE ledger (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            day TEXT NOT NULL,
            user TEXT NOT NULL,
            upstream TEXT,
            model TEXT,
            endpoint TEXT NOT NULL,
            stream INTEGER NOT NULL DEFAULT 0,
            status INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            total_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL,
            cache TEXT NOT NULL DEFAULT 'NONE',
            saved_tokens INTEGER NOT NULL DEFAULT 0,
            saved_usd REAL NOT NULL DEFAULT 0,
            latency_ms REAL,
            ttfb_ms REAL,
            usage_source TEXT NOT NULL DEFAULT 'none',
            error TEXT
        )""",
        "CREATE INDEX ledger_day ON ledger (day)",
        "CREATE INDEX ledger_ts ON ledger (ts)",
        "CREATE INDEX ledger_user_day ON ledger (user, day)",
    ),
    (
        """CREATE TABLE cache (
            key TEXT NOT NULL,
            scope TEXT NOT NULL,
            upstream TEXT NOT NULL,
            path TEXT NOT NULL,
            model TEXT,
            stream INTEGER NOT NULL,
            status INTEGER NOT NULL,
            content_type TEXT NOT NULL,
            created REAL NOT NULL,
            last_used REAL NOT NULL,
            size INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL,
            body BLOB NOT NULL,
            PRIMARY KEY (key, scope)
        )""",
        "CREATE INDEX cache_last_used ON cache (last_used)",
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    (
        """CREATE TABLE quota_overrides (
            user TEXT PRIMARY KEY,
            daily_tokens INTEGER,
            rpm INTEGER,
            tpm INTEGER
        )""",
    ),
    # The canonical request of each entry (packed like the body; NULL for
    # entries stored before): a replay miss is explained by the nearest one.
    ("ALTER TABLE cache ADD COLUMN request BLOB",),
    # Usage details (SPEC §5) and where each row's price came from; rows
    # priced before are from the shipped table.
    (
        "ALTER TABLE ledger ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE ledger ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE ledger ADD COLUMN cost_source TEXT",
        "UPDATE ledger SET cost_source = 'table' WHERE cost_usd IS NOT NULL AND total_tokens > 0",
        "ALTER TABLE cache ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE cache ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE cache ADD COLUMN cost_source TEXT",
    ),
    # The instance that served each request (SPEC §8).
    ("ALTER TABLE ledger ADD COLUMN instance TEXT",),
    # Instances sharing a database learn each other's new cache entries by their time.
    ("CREATE INDEX cache_created ON cache (created)",),
    # Instances sharing a database: their leases of the daily limits and their
    # calls per conversation (see greyfox._leases and the loop breaker).
    (
        """CREATE TABLE leases (
            day TEXT NOT NULL,
            subject TEXT NOT NULL,
            instance TEXT NOT NULL,
            granted REAL NOT NULL,
            used REAL NOT NULL,
            held REAL NOT NULL,
            updated REAL NOT NULL,
            PRIMARY KEY (day, subject, instance)
        )""",
        """CREATE TABLE loop_calls (
            instance TEXT NOT NULL,
            user TEXT NOT NULL,
            fingerprint INTEGER NOT NULL,
            at REAL NOT NULL,
            calls INTEGER NOT NULL,
            PRIMARY KEY (instance, user, fingerprint, at)
        )""",
        "CREATE INDEX loop_calls_at ON loop_calls (at)",
        'CREATE TABLE breaker_resets (user TEXT PRIMARY KEY, at REAL NOT NULL)',
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


#: The schema of version :data:`POSTGRES_BASE` on PostgreSQL, created whole (no
#: PostgreSQL database predates it); :data:`POSTGRES_MIGRATIONS` go on from there.
POSTGRES_BASE = 5
POSTGRES_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE ledger (
        id BIGINT PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        day TEXT NOT NULL,
        "user" TEXT NOT NULL,
        upstream TEXT,
        model TEXT,
        endpoint TEXT NOT NULL,
        stream BIGINT NOT NULL DEFAULT 0,
        status BIGINT NOT NULL,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        cached_tokens BIGINT NOT NULL DEFAULT 0,
        total_tokens BIGINT NOT NULL DEFAULT 0,
        cost_usd DOUBLE PRECISION,
        cache TEXT NOT NULL DEFAULT 'NONE',
        saved_tokens BIGINT NOT NULL DEFAULT 0,
        saved_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
        latency_ms DOUBLE PRECISION,
        ttfb_ms DOUBLE PRECISION,
        usage_source TEXT NOT NULL DEFAULT 'none',
        error TEXT,
        cache_write_tokens BIGINT NOT NULL DEFAULT 0,
        reasoning_tokens BIGINT NOT NULL DEFAULT 0,
        cost_source TEXT
    )""",
    "CREATE INDEX ledger_day ON ledger (day)",
    "CREATE INDEX ledger_ts ON ledger (ts)",
    'CREATE INDEX ledger_user_day ON ledger ("user", day)',
    """CREATE TABLE cache (
        key TEXT NOT NULL,
        scope TEXT NOT NULL,
        upstream TEXT NOT NULL,
        path TEXT NOT NULL,
        model TEXT,
        stream BIGINT NOT NULL,
        status BIGINT NOT NULL,
        content_type TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        last_used DOUBLE PRECISION NOT NULL,
        size BIGINT NOT NULL,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        cached_tokens BIGINT NOT NULL DEFAULT 0,
        cost_usd DOUBLE PRECISION,
        body BYTEA NOT NULL,
        request BYTEA,
        cache_write_tokens BIGINT NOT NULL DEFAULT 0,
        reasoning_tokens BIGINT NOT NULL DEFAULT 0,
        cost_source TEXT,
        PRIMARY KEY (key, scope)
    )""",
    "CREATE INDEX cache_last_used ON cache (last_used)",
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE quota_overrides (
        "user" TEXT PRIMARY KEY,
        daily_tokens BIGINT,
        rpm BIGINT,
        tpm BIGINT
    )""",
)
#: PostgreSQL's SQL of each migration past :data:`POSTGRES_BASE`, by the version it starts from.
POSTGRES_MIGRATIONS: dict[int, tuple[str, ...]] = {
    5: ("ALTER TABLE ledger ADD COLUMN instance TEXT",),
    6: ("CREATE INDEX cache_created ON cache (created)",),
    7: (
        """CREATE TABLE leases (
            day TEXT NOT NULL,
            subject TEXT NOT NULL,
            instance TEXT NOT NULL,
            granted DOUBLE PRECISION NOT NULL,
            used DOUBLE PRECISION NOT NULL,
            held DOUBLE PRECISION NOT NULL,
            updated DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (day, subject, instance)
        )""",
        """CREATE TABLE loop_calls (
            instance TEXT NOT NULL,
            "user" TEXT NOT NULL,
            fingerprint BIGINT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            calls BIGINT NOT NULL,
            PRIMARY KEY (instance, "user", fingerprint, at)
        )""",
        "CREATE INDEX loop_calls_at ON loop_calls (at)",
        'CREATE TABLE breaker_resets ("user" TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL)',
    ),
}


def migrate(conn: Connection) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; return the version found.
    Several instances may start on one PostgreSQL at once: one migrates, under
    a lock, and the others find the schema done."""
    engine = conn.engine
    with engine.migration_lock(conn.raw):
        with conn.transaction():
            found = engine.schema_version(conn.raw)
        if found > SCHEMA_VERSION:
            raise RuntimeError(f"database schema v{found} is newer than this GreyFox (v{SCHEMA_VERSION})")
        version = found
        if engine.name == "postgresql" and version < POSTGRES_BASE:
            with conn.transaction():
                for statement in POSTGRES_SCHEMA:
                    conn.execute(statement)
                engine.set_schema_version(conn.raw, POSTGRES_BASE)
            version = POSTGRES_BASE
        steps = POSTGRES_MIGRATIONS if engine.name == "postgresql" else dict(enumerate(MIGRATIONS))
        for version in range(version, SCHEMA_VERSION):
            with conn.transaction():
                for statement in steps[version]:
                    conn.execute(statement)
                engine.set_schema_version(conn.raw, version + 1)
    return found


def spill_path(db: str) -> str:
    """The side file of rows the database would not take: beside a SQLite file,
    in ``./data`` for PostgreSQL."""
    engine = engine_for(db)
    if engine.name == "sqlite":
        return db + ".unsaved.jsonl"
    return os.path.join(engine.local_dir, "greyfox-postgresql.unsaved.jsonl")


def row_json(row: LedgerRow) -> str:
    """One row as a line of ASCII JSON (lone surrogates escaped, any integer kept)."""
    return json.dumps(attr.asdict(row))


def spill(db_path: str, rows: Sequence[LedgerRow]) -> str:
    """Append rows the database would not take to a side file (at shutdown only)."""
    path = spill_path(db_path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(row_json(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def _recover_spill(conn: Connection, db_path: str) -> int:
    """Insert the rows a previous run spilled, then remove the side file.

    Never stops a start: lines that are not rows, and rows the database
    refuses, go to ``<side file>.rejected`` (and the log says so); when the
    database cannot take them now, the side file stays for the next start.
    """
    path = spill_path(db_path)
    if not os.path.exists(path):
        return 0
    rows: list[LedgerRow] = []
    rejected: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="backslashreplace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rows.append(LedgerRow(**json.loads(line)))
                except (ValueError, TypeError):
                    rejected.append(line.rstrip("\n"))
        with conn.transaction():
            refused = insert_rows_txn(conn.cursor(), rows)
        rejected += [row_json(row) for row, _ in refused]
        if rejected:
            with open(path + ".rejected", "a", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in rejected)
            log.warn("ledger: {n} lines of {path} are not rows it can store; kept in {path}.rejected",
                     n=len(rejected), path=path)
        os.remove(path)
    except (OSError, *conn.engine.trouble) as e:  # (inserting again at the next start is harmless: an upsert)
        log.warn("ledger: cannot insert the rows spilled by the last shutdown yet ({e}); {path} is kept for the next start",
                 e=e, path=path)
        return 0
    log.info("ledger: recovered {n} rows spilled by the last shutdown", n=len(rows) - len(refused))
    return len(rows) - len(refused)


def recover_spill(db_path: str) -> int:
    """Insert the side file's rows on a connection of its own (in a thread, while running)."""
    conn = open_database(db_path)
    try:
        n = _recover_spill(conn, db_path)
    finally:
        conn.close()
    if os.path.exists(spill_path(db_path)):
        raise RuntimeError("the database did not take the side file's rows")
    return n


@attr.s(auto_attribs=True, frozen=True)
class StartState:
    """What the running service needs from the database, read once at start."""

    last_id: int
    cache_entries: list[Any]
    cache_stats: Any
    secret: bytes
    overrides: dict[str, tuple[int | None, int | None, int | None]]
    budget_override: float | None


def open_database(db: str) -> Connection:
    """A migrated connection to ``db`` (a SQLite path or a PostgreSQL URI;
    command line and start-up; synchronous)."""
    conn = Connection(engine_for(db))
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def prepare_database(path: str) -> StartState:
    """Create the file and its directory, migrate, and read the start state.

    Synchronous: called once at start-up, before the port opens.
    """
    from ._cache import installation_secret, load_index, load_stats

    conn = open_database(path)
    try:
        _recover_spill(conn, path)
        with conn.transaction():
            end = claim_ids_txn(conn, ID_BLOCK)
        last_id = end - ID_BLOCK
        overrides, budget = limits_txn(conn)
        return StartState(last_id, load_index(conn), load_stats(conn), installation_secret(conn), overrides, budget)
    finally:
        conn.close()


#: Request ids are handed out from a range recorded in the database ahead of
#: use.  A start continues after the recorded end, so an id a client was given
#: never names another request, even when a hard kill lost its row.  A clean
#: stop records where it ended (no gap); a hard kill leaves a gap of at most this.
ID_BLOCK = 100_000


def meta_value(txn: Any, name: str) -> str | None:
    """A value of the ``meta`` table (``None`` when it has none of that name)."""
    row = txn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def set_meta_txn(txn: Any, name: str, value: str) -> None:
    txn.execute(txn.engine.upsert("meta", ("name", "value"), ("name",)), (name, value))


def reserved_ids(conn: Any) -> int:
    """The end of the recorded id range (0 when none is)."""
    return int(meta_value(conn, "ids_reserved_to") or 0)


def claim_ids_txn(txn: Any, block: int) -> int:
    """Claim the next ``block`` ids for this instance; the end of the block
    (its ids are ``end - block + 1 .. end``).

    One UPDATE moves the recorded end on: on PostgreSQL it locks the row, so
    instances claiming at once get blocks one after the other, never the same.
    A database that has no recorded end yet starts past its highest id.
    """
    # Writes first: SQLite then takes its write lock at once, and a second
    # instance waits for it instead of failing to upgrade a stale read.
    txn.execute("INSERT INTO meta (name, value) SELECT 'ids_reserved_to', CAST(COALESCE(MAX(id), 0) AS TEXT) "
                "FROM ledger WHERE true ON CONFLICT (name) DO NOTHING")
    txn.execute("UPDATE meta SET value = CAST(CAST(value AS BIGINT) + ? AS TEXT) WHERE name = 'ids_reserved_to'",
                (block,))
    return reserved_ids(txn)


def release_ids_txn(txn: Any, last_id: int, end: int) -> None:
    """At a clean stop, hand back the unused rest of this instance's block,
    unless another instance claimed ids after it."""
    txn.execute("UPDATE meta SET value = ? WHERE name = 'ids_reserved_to' AND value = ?", (str(last_id), str(end)))


class Pool:
    """An ``adbapi.ConnectionPool`` on the database's engine whose interactions
    get a :class:`~greyfox._engines.Cursor` (GreyFox's SQL in the engine's dialect)."""

    def __init__(self, db: str, reactor: Any = None) -> None:
        self.engine = engine_for(db)
        args, kwargs = self.engine.pool_arguments()
        if reactor is not None:
            kwargs["cp_reactor"] = reactor
        self._pool = adbapi.ConnectionPool(self.engine.module, *args, cp_noisy=False, **kwargs)

    def runInteraction(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d = self._pool.runInteraction(_with_cursor, self.engine, f, *args)
        if self.engine.name != "postgresql":
            return d

        def once_more(failure: Any) -> Deferred[Any]:
            # The server dropped the connection (a restart, a failover): adbapi
            # has replaced it, so the interaction is tried once on the new one.
            failure.trap(adbapi.ConnectionLost, *self.engine.trouble)
            return self._pool.runInteraction(_with_cursor, self.engine, f, *args)

        return d.addErrback(once_more)

    def close(self) -> None:
        self._pool.close()


def _with_cursor(txn: Any, engine: Any, f: Callable[..., Any], *args: Any) -> Any:
    return f(Cursor(txn, engine), *args)



@attr.s(auto_attribs=True, slots=True)
class LedgerRow:
    """One request as metered: what the ledger table stores."""

    id: int
    ts: float
    day: str
    user: str
    endpoint: str
    upstream: str | None = None
    model: str | None = None
    stream: bool = False
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = 0.0
    #: ``upstream``, ``table`` or ``config``; ``None`` when no price is known (or nothing was used).
    cost_source: str | None = None
    cache: str = "NONE"
    saved_tokens: int = 0
    saved_usd: float = 0.0
    latency_ms: float | None = None
    ttfb_ms: float | None = None
    usage_source: str = "none"
    error: str | None = None
    #: The GreyFox that served it (``GREYFOX_INSTANCE``; the host name and port by default).
    instance: str | None = None


LEDGER_COLUMNS = tuple(a.name for a in attr.fields(LedgerRow))
_INSERTS: dict[str, str] = {}  # engine name -> the ledger's upsert


def _insert_sql(engine: Any) -> str:
    sql = _INSERTS.get(engine.name)
    if sql is None:
        sql = _INSERTS[engine.name] = engine.upsert("ledger", LEDGER_COLUMNS, ("id",))
    return sql


#: A row's values in column order (``attr.astuple`` is generic and recursive: slow per row).
_row_values = operator.attrgetter(*LEDGER_COLUMNS)


#: SQLite's INTEGER range.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
#: Columns that may hold NULL; any other takes its default when a value cannot be stored.
_NULLABLE = frozenset({"upstream", "model", "cost_usd", "cost_source", "latency_ms", "ttfb_ms", "error", "instance"})
_DEFAULTS = {a.name: a.default for a in attr.fields(LedgerRow) if a.default is not attr.NOTHING}


def _storable_value(name: str, value: Any) -> Any:
    """``value`` as SQLite can store it in column ``name`` (itself when it already can)."""
    if value is None:
        return None if name in _NULLABLE else _DEFAULTS.get(name, "")
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return min(max(value, _INT_MIN), _INT_MAX)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return None if name in _NULLABLE else _DEFAULTS.get(name, 0.0)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, from a JSON escape such as "\\ud800"
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        if "\x00" in value:  # (PostgreSQL's text holds no NUL)
            value = value.replace("\x00", "\\x00")
        return value
    return str(value)


def storable(row: LedgerRow) -> LedgerRow:
    """``row`` with every value SQLite cannot store replaced, and the replacement
    named in its ``error``; ``row`` itself when nothing needed replacing.  Pure.

    A client or an upstream chooses some of a row's values (a model name with
    a lone surrogate, a token count past 2**63): such a row must be stored
    rather than stop the ledger.
    """
    changes: dict[str, Any] = {}
    for name in LEDGER_COLUMNS:
        value = getattr(row, name)
        fixed = _storable_value(name, value)
        if fixed is not value:
            changes[name] = fixed
    if not changes:
        return row
    note = "unstorable values replaced: " + ", ".join(sorted(changes))
    error = changes.get("error", row.error)
    changes["error"] = f"{error}; {note}" if error else note
    return attr.evolve(row, **changes)


def write_batch_txn(txn: Any, rows: Sequence[LedgerRow]) -> list[tuple[LedgerRow, str]]:
    """One ledger batch."""
    return insert_rows_txn(txn, rows)


def insert_rows_txn(txn: Any, rows: Sequence[LedgerRow]) -> list[tuple[LedgerRow, str]]:
    """Insert ``rows``; return those that could not be stored even once made
    storable, each with the reason (in practice none).

    One ``executemany`` for the batch.  When a value in it is one SQLite
    refuses, the batch is inserted row by row, each made :func:`storable`, so
    one bad row never holds the others back.  ``OperationalError`` (locked,
    disk full, I/O) is the database's trouble, not a row's: it propagates and
    the whole batch waits for a retry.
    """
    engine = txn.engine
    insert, trouble = _insert_sql(engine), engine.trouble
    # PostgreSQL aborts a transaction at its first error: each try gets a savepoint to return to.
    savepoints = engine.name == "postgresql"
    try:
        if savepoints:
            txn.execute("SAVEPOINT batch")
        txn.executemany(insert, [_row_values(r) for r in rows])
        return []
    except trouble:
        raise
    except Exception:
        if savepoints:
            txn.execute("ROLLBACK TO SAVEPOINT batch")
    refused = []
    for r in rows:  # (rows before the bad one may be in already: the upsert writes them again)
        try:
            if savepoints:
                txn.execute("SAVEPOINT one")
            txn.execute(insert, _row_values(storable(r)))
        except trouble:
            raise
        except Exception as e:
            if savepoints:
                txn.execute("ROLLBACK TO SAVEPOINT one")
            refused.append((r, f"{type(e).__name__}: {e}"))
    return refused


class Ledger:
    """Group-commit writer: rows queue in memory, one transaction per batch.

    :meth:`record` never waits.  A batch is written as soon as the reactor is
    free; rows that arrive meanwhile form the next batch.  A failing database
    keeps the rows queued and retries with back-off (``degraded`` says why);
    nothing is dropped.

    :param run: ``ConnectionPool.runInteraction`` or a stand-in.
    """

    MAX_BATCH = 500
    #: Rows kept in memory while the database cannot be written (about 25 MB);
    #: past it, the oldest half go to the side file.
    MAX_QUEUED = 50_000
    RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 5.0)
    #: How long a row may wait for companions: each batch is one thread hop
    #: and one commit, so a short wait saves most of them at low load.  It is
    #: also what a hard kill can lose.
    FLUSH_DELAY = 0.1

    def __init__(self, run: Callable[..., Deferred[Any]], clock: IReactorTime, last_id: int = 0,
                 reserved_to: int | None = None,
                 spill: Callable[[list[LedgerRow]], Deferred[Any]] | None = None,
                 recover: Callable[[], Deferred[Any]] | None = None) -> None:
        """:param reserved_to: the end of the block of ids claimed for this
        instance (see :func:`claim_ids_txn`); ``last_id + ID_BLOCK`` when not given.
        :param spill: writes rows to the side file, off the reactor thread
            (``None``: rows stay in memory however many).
        :param recover: inserts the side file's rows into the database and
            removes it, off the reactor thread: once the database takes
            writes again after rows were spilled."""
        self._spill = spill
        self._recover = recover
        self._spilling = False  # a spill or a recovery of the side file is running
        self._on_disk = 0  # rows spilled and not recovered yet
        self.spilled = 0
        self._run = run
        self._clock = clock
        self._last_id = last_id
        self._block_end = last_id + ID_BLOCK if reserved_to is None else reserved_to
        #: The block claimed ahead (``(first, end)``), and whether a claim is running.
        self._next_block: tuple[int, int] | None = None
        self._claiming = False
        self._queue: list[LedgerRow] = []
        self._writing = False
        self._scheduled: IDelayedCall | None = None
        # Batches leave the queue front in order and go back to its front on
        # failure, so commits follow record order: counting is enough.
        self._recorded = 0
        self._committed = 0
        self._waiters: list[tuple[int, Deferred[None]]] = []
        self._failures = 0
        self._write_started: float | None = None
        self.degraded: str | None = None
        self.written = 0

    def next_id(self) -> int:
        self._last_id += 1
        if self._last_id > self._block_end:
            if self._next_block is not None:
                self._last_id, self._block_end = self._next_block
                self._next_block = None
            elif self._last_id == self._block_end + 1:  # (said once)
                log.error("ledger: request ids ran past the claimed block before the next was claimed")
        return self._last_id

    @property
    def reserved_to(self) -> int:
        """The end of the last block claimed for this instance."""
        return self._next_block[1] if self._next_block is not None else self._block_end

    def _claim_ahead(self) -> None:
        """Past half its block, claim the next, so that the ids never wait for the database."""
        if self._claiming or self._next_block is not None or self._last_id <= self._block_end - ID_BLOCK // 2:
            return
        self._claiming = True

        def claimed(end: int) -> None:
            self._claiming = False
            self._next_block = (end - ID_BLOCK + 1, end)

        def failed(f: Any) -> None:
            self._claiming = False  # (tried again with the next batch)

        self._run(claim_ids_txn, ID_BLOCK).addCallbacks(claimed, failed)

    @property
    def last_id(self) -> int:
        """The id given to the latest request (every request gets one as it arrives)."""
        return self._last_id

    @property
    def pending(self) -> int:
        """Rows not yet committed (queued or being written)."""
        return self._recorded - self._committed

    @property
    def writing(self) -> bool:
        return self._writing

    def record(self, row: LedgerRow) -> None:
        """Queue a row for the next batch.  Never blocks, never raises."""
        self._queue.append(row)
        self._recorded += 1
        self._schedule(self.FLUSH_DELAY)

    def flush(self, within: float | None = None) -> Deferred[None]:
        """Fires once every row recorded so far is committed, or after
        ``within`` seconds if that comes first (a locked database makes a
        commit wait)."""
        if self._committed >= self._recorded:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((self._recorded, d))
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.reset(0)
        self._schedule(0)
        if within is None:
            return d
        either: Deferred[None] = Deferred()
        timer = self._clock.callLater(within, lambda: either.called or either.callback(None))

        def committed(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not either.called:
                either.callback(None)

        d.addCallback(committed)
        return either

    def stalled(self) -> float:
        """Seconds the batch being written has waited for the database (0 when none is)."""
        return 0.0 if self._write_started is None else self._clock.seconds() - self._write_started

    def take_all(self) -> list[LedgerRow]:
        """Remove and return every queued row (for the shutdown spill)."""
        rows, self._queue = self._queue, []
        return rows

    def _schedule(self, delay: float) -> None:
        if self._scheduled is None and not self._writing:
            self._scheduled = self._clock.callLater(delay, self._write)

    def _write(self) -> None:
        self._scheduled = None
        if self._writing or not self._queue:
            return
        batch = self._queue[: self.MAX_BATCH]
        del self._queue[: self.MAX_BATCH]
        self._writing = True
        self._write_started = self._clock.seconds()
        self._claim_ahead()
        d = self._run(write_batch_txn, batch)
        d.addCallbacks(self._written, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _written(self, refused: list[tuple[LedgerRow, str]] | None, batch: list[LedgerRow]) -> None:
        self._writing = False
        self._write_started = None
        for row, reason in refused or ():
            log.error("ledger: row {id} cannot be stored ({reason}); the row, as JSON: {row}",
                      id=row.id, reason=reason, row=row_json(row))
        self.written += len(batch)
        if self.degraded is not None:
            log.info("ledger: database writable again, {n} queued rows follow", n=len(self._queue))
        self.degraded = None
        self._failures = 0
        if self._on_disk and self._recover is not None and not self._spilling:
            self._recover_side_file()
        self._committed += len(batch)
        ready = [d for target, d in self._waiters if target <= self._committed]
        self._waiters = [(t, d) for t, d in self._waiters if t > self._committed]
        if self._queue:
            # More came while this batch was written.  Writing it at once made,
            # under steady load, batches of a few rows: hundreds of commits a
            # second, and the DB thread's switches cost the reactor's core
            # 0.1 ms a request.  Wait as the first row did, unless the batch is
            # full or someone waits for it.
            urgent = len(self._queue) >= self.MAX_BATCH or self._waiters
            self._schedule(0 if urgent else self.FLUSH_DELAY)
        for d in ready:
            d.callback(None)

    def _failed(self, failure: Any, batch: list[LedgerRow]) -> None:
        self._writing = False
        self._write_started = None
        self._queue[:0] = batch
        delay = self.RETRY_DELAYS[min(self._failures, len(self.RETRY_DELAYS) - 1)]
        self._failures += 1
        reason = failure.getErrorMessage() or failure.type.__name__
        if self.degraded is None:
            log.warn("ledger: cannot write to the database ({reason}); {n} rows kept in memory, retrying",
                     reason=reason, n=len(self._queue))
        self.degraded = f"ledger database not writable: {reason}"
        self._schedule(delay)
        if len(self._queue) > self.MAX_QUEUED and self._spill is not None and not self._spilling:
            self._spill_oldest()

    def _spill_oldest(self) -> None:
        """Past :attr:`MAX_QUEUED` rows in memory, the oldest go to the side
        file (inserted at the next start): memory stays bounded in a long outage."""
        rows = self._queue[: len(self._queue) - self.MAX_QUEUED // 2]
        del self._queue[: len(rows)]
        self._spilling = True

        def spilled(_: object) -> None:
            self._spilling = False
            self._committed += len(rows)  # (the oldest rows: commits still follow record order)
            self.spilled += len(rows)
            self._on_disk += len(rows)
            log.warn("ledger: database still not writable; {n} rows moved from memory to the side file", n=len(rows))

        def failed(f: Any) -> None:
            self._spilling = False
            self._queue[:0] = rows
            log.error("ledger: neither the database nor the side file takes rows ({e}); {n} kept in memory",
                      e=f.getErrorMessage(), n=len(self._queue))

        assert self._spill is not None
        self._spill(rows).addCallbacks(spilled, failed)

    def _recover_side_file(self) -> None:
        """The database takes writes again: the rows spilled meanwhile go in now."""
        self._spilling = True  # (no spill while the side file is read and removed)
        on_disk, self._on_disk = self._on_disk, 0

        def recovered(n: object) -> None:
            self._spilling = False
            log.info("ledger: the database is back; {n} rows from the side file are in it", n=n)

        def failed(f: Any) -> None:
            self._spilling = False
            self._on_disk += on_disk  # (tried again after the next good write, or at the next start)
            log.warn("ledger: could not insert the side file's rows yet ({e})", e=f.getErrorMessage())

        assert self._recover is not None
        self._recover().addCallbacks(recovered, failed)


# -- queries (run in the pool's thread) --

_SUMS = """
    COUNT(*) AS requests,
    SUM(CASE WHEN cache = 'HIT' THEN 0 ELSE prompt_tokens END),
    SUM(CASE WHEN cache = 'HIT' THEN 0 ELSE completion_tokens END),
    SUM(CASE WHEN cache = 'HIT' THEN 0 ELSE total_tokens END),
    SUM(CASE WHEN cache = 'HIT' THEN 0 ELSE COALESCE(cost_usd, 0) END),
    SUM(CASE WHEN cache = 'HIT' THEN 1 ELSE 0 END),
    SUM(saved_tokens),
    SUM(saved_usd),
    SUM(CASE WHEN cost_usd IS NULL AND cache != 'HIT' AND total_tokens > 0 THEN 1 ELSE 0 END),
    SUM(CASE WHEN cache = 'HIT' THEN 0 ELSE cached_tokens END),
    SUM(CASE WHEN cache = 'HIT' THEN 0 ELSE cache_write_tokens END),
    SUM(CASE WHEN cache = 'HIT' THEN 0 ELSE reasoning_tokens END)
"""

GROUPS = {"user": '"user"', "model": "model", "day": "day", "upstream": "upstream", "hour": None}
SPLITS = {"user": '"user"', "model": "model", "upstream": "upstream"}


def usage_txn(
    txn: Any, group: str, ts_from: float, ts_to: float, split: str | None = None, utc_offset: int = 0
) -> list[dict[str, Any]]:
    """Totals per ``group`` (and per ``split`` within it) for ``ts_from <= ts < ts_to``.

    ``group="hour"`` buckets by local hour, using ``utc_offset`` seconds.
    """
    column = GROUPS[group] or txn.engine.hour_of(f"ts + {int(utc_offset)}")
    select = column if split is None else f"{column}, {SPLITS[split]}"
    txn.execute(
        f"SELECT {select}, {_SUMS} FROM ledger WHERE ts >= ? AND ts < ? GROUP BY {select} ORDER BY {select}",
        (ts_from, ts_to),
    )
    rows = []
    for record in txn.fetchall():
        if split is None:
            key, sub, sums = record[0], None, record[1:]
        else:
            key, sub, sums = record[0], record[1], record[2:]
        if group == "hour":
            key = _hour_label(key, utc_offset)
        n, prompt, completion, total, cost, hits, saved_t, saved_usd, unpriced, cached, written, reasoning = sums
        # (int() and float(): PostgreSQL sums integers as numeric, a Decimal, which JSON does not take)
        row = {
            "key": key,
            "requests": int(n),
            "prompt_tokens": int(prompt or 0),
            "completion_tokens": int(completion or 0),
            "total_tokens": int(total or 0),
            "cost_usd": round(float(cost or 0), 10),
            "cache_hits": int(hits or 0),
            "saved_tokens": int(saved_t or 0),
            "saved_usd": round(float(saved_usd or 0), 10),
            "unpriced_requests": int(unpriced or 0),
            "cached_tokens": int(cached or 0),
            "cache_write_tokens": int(written or 0),
            "reasoning_tokens": int(reasoning or 0),
        }
        if split is not None:
            row["split"] = sub
        rows.append(row)
    return rows


def _hour_label(hours: int, utc_offset: int) -> str:
    from datetime import datetime, timedelta, timezone

    local = datetime.fromtimestamp(hours * 3600 - utc_offset, timezone(timedelta(seconds=utc_offset)))
    return local.strftime("%Y-%m-%dT%H:00")


def requests_txn(txn: Any, limit: int, before: int | None, filters: dict[str, Any]) -> list[dict[str, Any]]:
    """Newest first; ``filters`` maps ledger column -> exact value."""
    where, args = [], []
    if before is not None:
        where.append("id < ?")
        args.append(before)
    for column, value in filters.items():
        where.append(f'"{column}" = ?')
        args.append(value)
    sql = f"SELECT {quoted(LEDGER_COLUMNS)} FROM ledger"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(limit)
    txn.execute(sql, args)
    return [dict(zip(LEDGER_COLUMNS, row)) for row in txn.fetchall()]


def day_totals(db: str, day: str) -> list[tuple[str, int, float]]:
    """(user, tokens, dollars) charged on ``day``: rebuilds the quota counters at start."""
    conn = Connection(engine_for(db))
    try:
        return day_totals_txn(conn, day)
    finally:
        conn.close()


def day_totals_txn(txn: Any, day: str, instance: str | None = None) -> list[tuple[str, int, float]]:
    """:func:`day_totals` on an open connection (by ``instance`` only, when given)."""
    mine = "" if instance is None else " AND instance = ?"
    return [(user, int(tokens or 0), float(usd or 0)) for user, tokens, usd in txn.execute(
        'SELECT "user", SUM(total_tokens), SUM(COALESCE(cost_usd, 0)) FROM ledger '
        f"WHERE day = ? AND cache != 'HIT'{mine} GROUP BY \"user\"",
        (day,) if instance is None else (day, instance),
    ).fetchall()]


def limits_txn(txn: Any) -> tuple[dict[str, tuple[int | None, int | None, int | None]], float | None]:
    """Every user's limit overrides and the budget set through the API (any instance's)."""
    found = txn.execute('SELECT "user", daily_tokens, rpm, tpm FROM quota_overrides').fetchall()
    budget = meta_value(txn, "daily_budget_usd")
    return {u: (d, r, t) for u, d, r, t in found}, None if budget is None else float(budget)


def set_override_txn(txn: Any, user: str, limits: tuple[int | None, int | None, int | None]) -> None:
    if all(v is None for v in limits):
        txn.execute('DELETE FROM quota_overrides WHERE "user" = ?', (user,))
    else:
        txn.execute(txn.engine.upsert("quota_overrides", ("user", "daily_tokens", "rpm", "tpm"), ("user",)),
                    (user, *limits))


def set_budget_txn(txn: Any, usd: float | None) -> None:
    if usd is None:
        txn.execute("DELETE FROM meta WHERE name = 'daily_budget_usd'")
    else:
        set_meta_txn(txn, "daily_budget_usd", repr(usd))
