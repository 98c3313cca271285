# -*- test-case-name: tests.test_copy -*-
"""``greyfox db copy --from SRC --to DST``: a database moved between SQLite and PostgreSQL.

The ledger, the cache (bodies and requests as stored), quota overrides, the
budget, the request id range and the fingerprint secret (without which
answers bought with a client's own credential could not be read) are copied
in batches, each its own transaction, with upserts: a copy run twice, or
resumed after a failure, gives the same target.  A target that holds rows
already is refused unless ``append`` is asked for.
Run it while no GreyFox uses either database (synchronous, for the command line).
"""

from __future__ import annotations

from typing import Any, Callable

from ._cache import TABLE_COLUMNS
from ._engines import Connection, quoted
from ._store import LEDGER_COLUMNS, meta_value, open_database, reserved_ids, set_meta_txn

#: Rows per transaction.
BATCH = 1000

_OVERRIDE_COLUMNS = ("user", "daily_tokens", "rpm", "tpm")


class CopyRefused(Exception):
    """The copy cannot be made as asked; the message is one line."""


def copy_database(source: str, target: str, append: bool = False,
                  progress: Callable[[str, int, int], None] = lambda table, done, total: None) -> dict[str, int]:
    """Copy ``source`` into ``target`` (each a SQLite path or a PostgreSQL URI); rows copied per table."""
    src = open_database(source)
    try:
        dst = open_database(target)
        try:
            return _copy(src, dst, append, progress)
        finally:
            dst.close()
    finally:
        src.close()


def _count(conn: Connection, table: str) -> int:
    return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def _copy(src: Connection, dst: Connection, append: bool, progress: Callable[[str, int, int], None]) -> dict[str, int]:
    occupied = _count(dst, "ledger") + _count(dst, "cache")
    if occupied and not append:
        raise CopyRefused(f"the target holds {occupied} rows already; copy into it with --append")
    secret, target_secret = meta_value(src, "fingerprint_secret"), meta_value(dst, "fingerprint_secret")
    # Entries bought with a client's credential are readable only under the secret that scoped them.
    private_ok = secret is not None and (target_secret in (None, secret) or not occupied)
    with dst.transaction():
        if secret is not None and private_ok:
            set_meta_txn(dst, "fingerprint_secret", secret)
        ids = max(reserved_ids(src), reserved_ids(dst), int(src.execute("SELECT COALESCE(MAX(id), 0) FROM ledger").fetchone()[0]))
        set_meta_txn(dst, "ids_reserved_to", str(ids))
        budget = meta_value(src, "daily_budget_usd")
        if budget is not None:
            set_meta_txn(dst, "daily_budget_usd", budget)
    copied = {
        "ledger": _copy_table(src, dst, "ledger", LEDGER_COLUMNS, ("id",), progress),
        "cache": _copy_table(src, dst, "cache", TABLE_COLUMNS, ("key", "scope"), progress,
                             where="" if private_ok else "scope = 'shared'"),
        "quota_overrides": _copy_table(src, dst, "quota_overrides", _OVERRIDE_COLUMNS, ("user",), progress),
    }
    return copied


def _copy_table(src: Connection, dst: Connection, table: str, columns: tuple[str, ...], keys: tuple[str, ...],
                progress: Callable[[str, int, int], None], where: str = "") -> int:
    """Copy ``table`` in key order, a batch a transaction (keyset paging: no OFFSET scans)."""
    filters = [where] if where else []
    total = int(src.execute(f"SELECT COUNT(*) FROM {table}" + (f" WHERE {where}" if where else "")).fetchone()[0])
    insert = dst.engine.upsert(table, columns, keys)
    key_index = [columns.index(k) for k in keys]
    after: tuple[Any, ...] | None = None
    done = 0
    progress(table, 0, total)
    while True:
        conditions = list(filters)
        args: tuple[Any, ...] = ()
        if after is not None:
            conditions.append(f"({quoted(keys)}) > ({', '.join('?' * len(keys))})")
            args = after
        sql = (f"SELECT {quoted(columns)} FROM {table}" + (f" WHERE {' AND '.join(conditions)}" if conditions else "")
               + f" ORDER BY {quoted(keys)} LIMIT {BATCH}")
        rows = src.execute(sql, args).fetchall()
        if not rows:
            return done
        with dst.transaction():
            dst.executemany(insert, rows)
        done += len(rows)
        after = tuple(rows[-1][i] for i in key_index)
        progress(table, done, total)
