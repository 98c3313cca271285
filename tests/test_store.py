"""The group-commit ledger with a fake database and a fake clock."""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from greyfox._store import Ledger, LedgerRow


class FakeDB:
    def __init__(self):
        self.batches = []
        self.broken = False
        self.pending: list[Deferred] = []
        self.manual = False

    def run(self, fn, rows):
        if self.broken:
            return fail(RuntimeError("disk I/O error"))
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
