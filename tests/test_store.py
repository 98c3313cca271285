"""The group-commit ledger with a fake database and a fake clock."""

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from greyfox._store import Ledger, LedgerRow


class FakeDB:
    def __init__(self):
        self.batches = []
        self.broken = False
        self.pending: list[Deferred] = []
        self.manual = False

    #: The end of the id range the database has recorded, and how often ids were claimed.
    ids_end = 0
    claims = 0

    def run(self, fn, rows, *args):
        if self.broken:
            return fail(RuntimeError("disk I/O error"))
        if fn.__name__ == "claim_ids_txn":
            self.claims += 1
            self.ids_end += rows  # (the block)
            return succeed(self.ids_end)
        if self.manual:
            d = Deferred()
            self.pending.append(d)
            d.addCallback(lambda _: self.batches.append(list(rows)))
            return d
        self.batches.append(list(rows))
        return succeed(None)


def row(ledger):
    return LedgerRow(id=ledger.next_id(), ts=0, day="2026-11-27", user="u", endpoint="/v1/x")


def test_rows_arriving_during_a_write_form_the_next_batch():
    clock, db = Clock(), FakeDB()
    db.manual = True
    ledger = Ledger(db.run, clock, last_id=41)
    first = row(ledger)
    assert first.id == 42
    ledger.record(first)
    clock.advance(Ledger.FLUSH_DELAY)
    for _ in range(3):
        ledger.record(row(ledger))
    flushed = ledger.flush()
    assert not flushed.called
    db.pending.pop(0).callback(None)
    clock.advance(0)
    db.pending.pop(0).callback(None)
    assert [len(b) for b in db.batches] == [1, 3]
    assert flushed.called and ledger.pending == 0


def test_a_failing_database_keeps_rows_and_retries():
    clock, db = Clock(), FakeDB()
    ledger = Ledger(db.run, clock)
    db.broken = True
    ledger.record(row(ledger))
    ledger.record(row(ledger))
    clock.advance(Ledger.FLUSH_DELAY)
    assert ledger.degraded and ledger.pending == 2
    clock.advance(10)
    assert ledger.pending == 2
    db.broken = False
    clock.advance(10)
    assert ledger.degraded is None and ledger.pending == 0
    assert [r.id for r in db.batches[0]] == [1, 2]


def test_flush_with_nothing_queued_fires_at_once():
    assert Ledger(FakeDB().run, Clock()).flush().called


def test_steady_load_makes_batches_of_a_flush_delay_not_a_few_rows():
    """Rows arriving while a batch is written wait for the flush delay too:
    a commit per few rows, under load, cost the reactor's core a tenth of a millisecond a request."""
    clock, db = Clock(), FakeDB()
    db.manual = True
    ledger = Ledger(db.run, clock)
    started: dict[int, int] = {}
    for ms in range(1000):  # a row every millisecond for a second; each write takes 5 ms
        ledger.record(row(ledger))
        clock.advance(0.001)
        if db.pending:
            first = id(db.pending[0])
            started.setdefault(first, ms)
            if ms - started[first] >= 5:
                del started[first]
                db.pending.pop(0).callback(None)
    assert len(db.batches) <= 12 and sum(len(b) for b in db.batches) >= 900


# -- rows a client or an upstream made unstorable --

import sqlite3  # noqa: E402

from greyfox._store import ID_BLOCK, insert_rows_txn, open_database, prepare_database, storable  # noqa: E402


def test_storable_replaces_what_sqlite_refuses_and_says_so():
    bad = LedgerRow(id=7, ts=1.0, day="d", user="u", endpoint="/v1/chat/completions", model="gpt\ud800",
                    prompt_tokens=2**64, cost_usd=float("nan"), error="upstream said no")
    fixed = storable(bad)
    assert fixed.model == "gpt\\ud800" and fixed.prompt_tokens == 2**63 - 1 and fixed.cost_usd is None
    assert fixed.error == "upstream said no; unstorable values replaced: cost_usd, model, prompt_tokens"
    fine = LedgerRow(id=8, ts=1.0, day="d", user="u", endpoint="/v1/x", model="gpt-4o", prompt_tokens=5)
    assert storable(fine) is fine


def test_unstorable_rows_are_stored_flagged_on_every_engine(database):
    conn = open_database(database)
    rows = [LedgerRow(id=i, ts=1.0, day="d", user="u", endpoint="/v1/x", total_tokens=1) for i in (1, 2, 3, 4)]
    rows[1].model = "\ud800"
    rows[2].total_tokens = 18446744073709551616
    rows[3].user = "nul\x00user"
    with conn.transaction():
        assert insert_rows_txn(conn, rows) == []
    stored = conn.execute('SELECT id, model, total_tokens, "user", error FROM ledger ORDER BY id').fetchall()
    conn.close()
    assert [tuple(r) for r in stored] == [
        (1, None, 1, "u", None),
        (2, "\\ud800", 1, "u", "unstorable values replaced: model"),
        (3, None, 2**63 - 1, "u", "unstorable values replaced: total_tokens"),
        (4, None, 1, "nul\\x00user", "unstorable values replaced: user"),  # (PostgreSQL's text holds no NUL)
    ]


@pytest.mark.sqlite_only
def test_one_unstorable_row_does_not_hold_back_its_batch(tmp_path):
    conn = open_database(str(tmp_path / "l.db"))
    rows = [LedgerRow(id=i, ts=1.0, day="d", user="u", endpoint="/v1/x", total_tokens=1) for i in (1, 2, 3)]
    rows[1].model = "\ud800"
    rows[2].total_tokens = 18446744073709551616
    with pytest.raises((UnicodeEncodeError, OverflowError, sqlite3.Error)):
        conn.executemany("INSERT INTO ledger (id, ts, day, user, endpoint, model, total_tokens) VALUES (?,?,?,?,?,?,?)",
                         [(r.id, r.ts, r.day, r.user, r.endpoint, r.model, r.total_tokens) for r in rows])
    conn.raw.rollback()
    with conn.transaction():
        assert insert_rows_txn(conn, rows) == []
    stored = conn.execute("SELECT id, model, total_tokens, error FROM ledger ORDER BY id").fetchall()
    assert stored == [
        (1, None, 1, None),
        (2, "\\ud800", 1, "unstorable values replaced: model"),
        (3, None, 2**63 - 1, "unstorable values replaced: total_tokens"),
    ]


def test_a_spill_file_with_bad_lines_never_stops_a_start(tmp_path):
    db = str(tmp_path / "g.db")
    open_database(db).close()
    good = '{"id": 5, "ts": 1.0, "day": "d", "user": "u", "endpoint": "/v1/x", "model": "\\ud800"}'
    with open(db + ".unsaved.jsonl", "w") as f:
        f.write(good + "\n{not json\n" + '{"id": 6, "colour": "red"}\n')
    state = prepare_database(db)
    assert state.last_id >= 5
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT id, model FROM ledger").fetchall() == [(5, "\\ud800")]
    assert not (tmp_path / "g.db.unsaved.jsonl").exists()
    assert (tmp_path / "g.db.unsaved.jsonl.rejected").read_text().splitlines() == ["{not json", '{"id": 6, "colour": "red"}']


# -- request ids are never reused --


def test_a_start_after_a_hard_kill_continues_past_every_id_handed_out_and_keeps_its_secret(database):
    first = prepare_database(database)
    # The process handed out ids up to first.last_id + 1,000 and was killed before writing any row.
    second = prepare_database(database)
    assert second.last_id >= first.last_id + ID_BLOCK > first.last_id + 1_000
    assert second.secret == first.secret  # (entries bought with a client's credential stay readable)


def test_the_next_block_of_ids_is_claimed_before_the_current_one_runs_out():
    clock, db = Clock(), FakeDB()
    db.ids_end = ID_BLOCK  # (this ledger's block, claimed at start)
    ledger = Ledger(db.run, clock, last_id=0)
    ledger.record(row(ledger))
    clock.advance(Ledger.FLUSH_DELAY)
    assert db.claims == 0  # most of the block is left
    while ledger.last_id < ID_BLOCK // 2 + 1:
        ledger.next_id()
    ledger.record(row(ledger))
    clock.advance(Ledger.FLUSH_DELAY)
    assert db.claims == 1 and ledger.reserved_to == 2 * ID_BLOCK
    ledger.record(row(ledger))
    clock.advance(Ledger.FLUSH_DELAY)
    assert db.claims == 1  # claimed already
    while ledger.last_id < ID_BLOCK:
        ledger.next_id()
    assert ledger.next_id() == ID_BLOCK + 1  # one instance: the next block follows on


def test_ids_jump_past_blocks_other_instances_claimed():
    clock, db = Clock(), FakeDB()
    ledger = Ledger(db.run, clock, last_id=0)  # block 1 .. ID_BLOCK
    db.ids_end = 3 * ID_BLOCK  # two other instances claimed the next two blocks
    while ledger.last_id < ID_BLOCK // 2 + 1:
        ledger.next_id()
    ledger.record(row(ledger))
    clock.advance(Ledger.FLUSH_DELAY)
    while ledger.last_id < ID_BLOCK:
        ledger.next_id()
    assert ledger.next_id() == 3 * ID_BLOCK + 1


def test_instances_claiming_ids_at_once_get_different_blocks(database):
    from concurrent.futures import ThreadPoolExecutor

    from greyfox._engines import Connection, engine_for
    from greyfox._store import claim_ids_txn

    open_database(database).close()

    def claim(_: int) -> int:
        conn = Connection(engine_for(database))
        try:
            with conn.transaction():
                return claim_ids_txn(conn, ID_BLOCK)
        finally:
            conn.close()

    with ThreadPoolExecutor(8) as pool:
        ends = list(pool.map(claim, range(16)))
    assert sorted(ends) == [ID_BLOCK * i for i in range(1, 17)]  # sixteen blocks, none given twice


def test_rows_past_the_memory_bound_go_to_the_side_file_while_the_database_is_down():
    clock, db = Clock(), FakeDB()
    spilled: list[list[LedgerRow]] = []
    ledger = Ledger(db.run, clock, spill=lambda rows: spilled.append(list(rows)) or succeed(None))
    ledger.MAX_QUEUED = 10
    db.broken = True
    for _ in range(25):
        ledger.record(row(ledger))
    clock.advance(Ledger.FLUSH_DELAY)
    assert [r.id for r in spilled[0]] == list(range(1, 21))  # the oldest, down to half the bound
    assert ledger.pending == 5 and ledger.spilled == 20
    db.broken = False
    clock.advance(10)
    assert ledger.pending == 0 and [r.id for r in db.batches[0]] == list(range(21, 26))


def test_a_database_of_an_older_schema_is_migrated_on_every_engine(database):
    from greyfox import _engines, _store

    engine = _engines.engine_for(database)
    conn = _engines.Connection(engine)
    old = 5
    with conn.transaction():
        statements = _store.POSTGRES_SCHEMA if engine.name == "postgresql" else [
            s for step in _store.MIGRATIONS[:old] for s in step]
        for statement in statements:
            conn.execute(statement)
        engine.set_schema_version(conn.raw, old)
        conn.execute('INSERT INTO ledger (id, ts, day, "user", endpoint, status) VALUES (7, 1.0, \'d\', \'u\', \'/v1/x\', 200)')
    conn.close()
    conn = open_database(database)
    assert [tuple(r) for r in conn.execute("SELECT id, instance FROM ledger").fetchall()] == [(7, None)]
    assert engine.schema_version(conn.raw) == _store.SCHEMA_VERSION
    conn.close()
