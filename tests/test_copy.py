"""``greyfox db copy``: a real database moved to the test's engine and back, row for row."""

from __future__ import annotations

from typing import Any

from greyfox._cache import _store_many_txn, installation_secret
from greyfox._cli import main as cli
from greyfox._store import LEDGER_COLUMNS, LedgerRow, insert_rows_txn, open_database, set_budget_txn, set_override_txn


def make_source(path: str) -> None:
    conn = open_database(path)
    rows = [LedgerRow(id=i, ts=1000.0 + i, day="2026-12-04", user=f"user{i % 3}", endpoint="/v1/chat/completions",
                      model="gpt-4o-mini", stream=bool(i % 2), status=200, prompt_tokens=i, completion_tokens=2 * i,
                      total_tokens=3 * i, cost_usd=i / 1e6, cost_source="table", cache="MISS", error=None)
            for i in range(1, 2501)]  # more than one batch
    entries = [((f"{i:064x}", "shared" if i % 2 else "cred:abc", "openai", "/chat/completions", "m", i % 2 == 0, 200,
                 "application/json", 1.0, 2.0, 0, 5, 6, 1, 0.5, 0, 0, None), b'{"answer": %d}' % i + b"x" * 2000,
                b'{"model":"m"}')
               for i in range(1, 30)]
    installation_secret(conn)  # (as every GreyFox database has: it scopes the "cred:" entries)
    with conn.transaction():
        insert_rows_txn(conn.cursor(), rows)
        _store_many_txn(conn.cursor(), entries)
        set_override_txn(conn.cursor(), "user1", (1000, None, 5))
        set_budget_txn(conn.cursor(), 12.5)
    conn.close()


def dump(db: str) -> dict[str, Any]:
    conn = open_database(db)
    try:
        def rows(sql: str) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in conn.execute(sql).fetchall()]

        columns = ", ".join(f'"{c}"' for c in LEDGER_COLUMNS)
        return {
            "ledger": rows(f"SELECT {columns} FROM ledger ORDER BY id"),
            "cache": rows("SELECT key, scope, stream, size, body, request, cost_usd FROM cache ORDER BY key, scope"),
            "overrides": rows('SELECT "user", daily_tokens, rpm, tpm FROM quota_overrides'),
            "meta": rows("SELECT name, value FROM meta WHERE name != 'ids_reserved_to' ORDER BY name"),
            "ids_reserved_to": rows("SELECT value FROM meta WHERE name = 'ids_reserved_to'"),
        }
    finally:
        conn.close()


def test_a_database_copied_to_the_engine_and_back_is_the_same_row_for_row(tmp_path, database, capsys):
    source, back = str(tmp_path / "source.db"), str(tmp_path / "back.db")
    make_source(source)
    assert cli(["db", "copy", "--from", source, "--to", database]) == 0
    err = capsys.readouterr().err
    assert "ledger: 2500/2500 rows" in err and "copied 2500 ledger, 29 cache, 1 quota_overrides rows" in err
    assert cli(["db", "copy", "--from", database, "--to", back]) == 0
    original = dump(source)
    copied = dump(database)
    assert int(copied.pop("ids_reserved_to")[0][0]) >= 2500  # no id of the source is handed out again
    assert copied == {k: v for k, v in original.items() if k != "ids_reserved_to"}
    assert {k: v for k, v in dump(back).items() if k != "ids_reserved_to"} == copied
    assert len(original["ledger"]) == 2500 and [m[0] for m in original["meta"]] == ["daily_budget_usd", "fingerprint_secret"]


def test_a_target_with_rows_is_refused_unless_appended_to_and_appending_again_changes_nothing(tmp_path, database, capsys):
    source = str(tmp_path / "source.db")
    make_source(source)
    assert cli(["db", "copy", "--from", source, "--to", database]) == 0
    assert cli(["db", "copy", "--from", source, "--to", database]) == 1
    assert "the target holds 2529 rows already; copy into it with --append" in capsys.readouterr().err
    before = dump(database)
    assert cli(["db", "copy", "--from", source, "--to", database, "--append"]) == 0
    assert dump(database) == before


def test_a_database_that_cannot_be_opened_is_one_line(tmp_path, capsys):
    assert cli(["db", "copy", "--from", str(tmp_path / "a.db"), "--to", "postgresql://nobody@127.0.0.1:1/none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("greyfox db copy: ")
