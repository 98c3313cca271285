# -*- test-case-name: tests.test_engines -*-
"""The two database engines GreyFox stores in: SQLite (the default) and PostgreSQL.

One storage layer serves both, as Synapse's ``storage/engines`` do: the SQL
in :mod:`greyfox._store` and :mod:`greyfox._cache` is written once, with
``?`` placeholders and every identifier quoted (``"user"`` is reserved in
PostgreSQL), and an :class:`Engine` supplies what differs: the DB-API
module and how to connect, the placeholder style, upserts, the hour bucket,
where the schema version lives, and a lock that lets several instances
migrate one database at once.  Functions that take a cursor get a
:class:`Cursor`, which converts as it goes.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

#: Any advisory lock ids will do, as long as every GreyFox uses the same ones.
MIGRATION_LOCK = 0x6772_6579_666F  # "greyfo"


class Engine:
    """What differs between the engines.  ``location``: a SQLite path or a
    PostgreSQL URI (its password never shown: see :meth:`shown`)."""

    name = ""
    module = ""
    #: Exceptions that mean the database is in trouble (locked, full, gone), not a row.
    trouble: tuple[type[BaseException], ...] = ()

    def __init__(self, location: str) -> None:
        self.location = location

    def shown(self) -> str:
        return self.location

    @property
    def local_dir(self) -> str:
        """Where this instance keeps its own files (side file of unsaved rows, tokenizers)."""
        raise NotImplementedError

    def sql(self, text: str) -> str:
        """``text`` in this engine's placeholder style."""
        return text

    def upsert(self, table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
        """Insert a row, or replace the one with the same ``keys``."""
        raise NotImplementedError

    def hour_of(self, expression: str) -> str:
        """The whole number of hours in ``expression`` (seconds), rounded down."""
        raise NotImplementedError

    def connect(self) -> Any:
        """A plain DB-API connection (start-up and the command line; synchronous)."""
        raise NotImplementedError

    def pool_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``adbapi.ConnectionPool``'s arguments after the module name."""
        raise NotImplementedError

    def values(self, args: Sequence[Any]) -> Sequence[Any]:
        """Parameters as this engine's driver stores them."""
        return args

    def schema_version(self, conn: Any) -> int:
        raise NotImplementedError

    def set_schema_version(self, conn: Any, version: int) -> None:
        raise NotImplementedError

    def lease_lock(self, txn: Any, key: int) -> None:
        """Hold ``key`` until the transaction ends (SQLite: its one writer already serialises)."""

    @contextmanager
    def migration_lock(self, conn: Any) -> Iterator[None]:
        yield

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[None]:
        """Commit what the block did, or roll it back."""
        with conn:
            yield


def quoted(columns: Sequence[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


class SqliteEngine(Engine):
    name = "sqlite"
    module = "sqlite3"
    trouble = (sqlite3.OperationalError,)

    @property
    def local_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.location))

    def upsert(self, table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
        return f"INSERT OR REPLACE INTO {table} ({quoted(columns)}) VALUES ({', '.join('?' * len(columns))})"

    def hour_of(self, expression: str) -> str:
        return f"CAST(({expression}) / 3600 AS INTEGER)"

    def connect(self) -> sqlite3.Connection:
        os.makedirs(self.local_dir, exist_ok=True)
        conn = sqlite3.connect(self.location)
        pragmas(conn)
        return conn

    def pool_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # One connection: more lose updates silently on SQLite.
        return (self.location,), {"check_same_thread": False, "cp_min": 1, "cp_max": 1, "cp_openfun": pragmas}

    def schema_version(self, conn: Any) -> int:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def set_schema_version(self, conn: Any, version: int) -> None:
        conn.execute(f"PRAGMA user_version={int(version)}")


def pragmas(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")


class PostgresEngine(Engine):
    name = "postgresql"
    module = "psycopg"

    def __init__(self, location: str) -> None:
        super().__init__(location)
        try:
            import psycopg
        except ImportError:
            raise RuntimeError("PostgreSQL needs psycopg: pip install 'greyfox[postgres]'") from None
        self.trouble = (psycopg.OperationalError, psycopg.InterfaceError)

    def shown(self) -> str:
        parts = urlsplit(self.location)
        if parts.password is None:
            return self.location
        host = parts.hostname or ""
        netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def local_dir(self) -> str:
        return os.path.abspath("./data")

    def sql(self, text: str) -> str:
        return text.replace("%", "%%").replace("?", "%s")

    def upsert(self, table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
        updates = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in columns if c not in keys)
        return (f"INSERT INTO {table} ({quoted(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                f"ON CONFLICT ({quoted(keys)}) DO " + (f"UPDATE SET {updates}" if updates else "NOTHING"))

    def hour_of(self, expression: str) -> str:
        return f"CAST(FLOOR(({expression}) / 3600) AS BIGINT)"

    def connect(self) -> Any:
        import psycopg

        # Autocommit: a statement outside a transaction() block is its own
        # transaction, and transaction() is a real one, not a savepoint in an
        # implicit transaction that closing the connection would roll back.
        return psycopg.connect(self.location, autocommit=True)

    def pool_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # cp_reconnect: a connection the server dropped is replaced, not used (and failed on) for ever.
        return (self.location,), {"cp_min": 1, "cp_max": 1, "cp_reconnect": True}

    def values(self, args: Sequence[Any]) -> Sequence[Any]:
        # (a Python bool is PostgreSQL's boolean, which an integer column refuses)
        return [int(a) if a is True or a is False else a for a in args]

    def schema_version(self, conn: Any) -> int:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def set_schema_version(self, conn: Any, version: int) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (int(version),))

    @contextmanager
    def migration_lock(self, conn: Any) -> Iterator[None]:
        """Several instances may start at once: one migrates, the others wait for it."""
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[None]:
        with conn.transaction():
            yield

    def lease_lock(self, txn: Any, key: int) -> None:
        txn.execute("SELECT pg_advisory_xact_lock(?)", (key,))


def engine_for(location: str) -> Engine:
    """The engine of ``GREYFOX_DB``: a ``postgresql://`` URI, or a SQLite path."""
    if location.startswith(("postgresql://", "postgres://")):
        return PostgresEngine(location)
    return SqliteEngine(location)


class Cursor:
    """A cursor (or an adbapi transaction) that takes GreyFox's SQL and speaks the engine's."""

    def __init__(self, raw: Any, engine: Engine) -> None:
        self.raw = raw
        self.engine = engine

    def execute(self, sql: str, args: Sequence[Any] = ()) -> "Cursor":
        self.raw.execute(self.engine.sql(sql), self.engine.values(args))
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> "Cursor":
        values = self.engine.values
        self.raw.executemany(self.engine.sql(sql), [values(r) for r in rows])
        return self

    def fetchone(self) -> Any:
        return self.raw.fetchone()

    def fetchall(self) -> list[Any]:
        return self.raw.fetchall()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.raw.fetchall())


class Connection:
    """A synchronous connection with :class:`Cursor`'s conversions (start-up and the command line)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.raw = engine.connect()

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        return Cursor(self.raw.cursor(), self.engine).execute(sql, args)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Cursor:
        return Cursor(self.raw.cursor(), self.engine).executemany(sql, rows)

    def cursor(self) -> Cursor:
        return Cursor(self.raw.cursor(), self.engine)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.engine.transaction(self.raw):
            yield

    def close(self) -> None:
        self.raw.close()
