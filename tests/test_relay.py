"""The streaming primitive with fakes: no sockets, time from a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure

from greyfox._relay import BodyPump, ClientGone, Fanout, StreamIdle, Subscriber
from greyfox._watchdog import Watchdog
from greyfox._tokens import IncrementalCounter
from twisted.web.client import ResponseDone
from greyfox._usage import StreamMeter


class FakeTransport:
    """The upstream response's transport, as the pump sees it."""

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.stopped = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped += 1


class FakeRequest:
    """A client request: collects writes and the producer registered on it."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.channel = object()

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming and self.producer is None
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class Ends(list):  # type: ignore[type-arg]
    """What a pump's ``on_end`` was called with (a list, to see it is called once)."""

    def failure(self) -> Failure:
        [failure] = self
        assert isinstance(failure, Failure)
        return failure


def pipeline(n: int = 2, strip: tuple[bool, ...] = ()) -> tuple[Clock, BodyPump, Fanout, list[tuple[Subscriber, FakeRequest]], FakeTransport]:
    clock = Clock()
    left: list[bool] = []
    fanout = Fanout(StreamMeter(IncrementalCounter(None)), keep=1 << 20, on_empty=lambda: left.append(True))
    subs = []
    for i in range(n):
        request = FakeRequest()
        sub = Subscriber(request, strip[i] if i < len(strip) else False, clock, lambda: None)
        sub.on_leave = fanout.leave
        fanout.add(sub)
        subs.append((sub, request))
    ends = Ends()
    pump = BodyPump(fanout, clock, idle_timeout=30, on_end=ends.append)
    pump.ends = ends  # type: ignore[attr-defined]
    fanout.on_empty = pump.stopProducing
    transport = FakeTransport()
    pump.makeConnection(transport)
    return clock, pump, fanout, subs, transport


USAGE_ONLY = b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}\n\n'
DELTA = b'data: {"choices": [{"delta": {"content": "hi"}}], "usage": null}\n\n'


def test_events_reach_every_client_and_only_askers_get_the_usage_chunk():
    clock, pump, fanout, subs, transport = pipeline(2, strip=(True, False))
    pump.dataReceived(DELTA + USAGE_ONLY[:20])
    pump.dataReceived(USAGE_ONLY[20:] + b"data: [DONE]\n\n")
    (_, stripped), (_, full) = subs
    assert b"".join(stripped.written) == DELTA + b"data: [DONE]\n\n"
    assert b"".join(full.written) == DELTA + USAGE_ONLY + b"data: [DONE]\n\n"
    assert fanout.meter.usage.total_tokens == 3


def test_one_slow_client_pauses_the_upstream_until_every_client_resumes():
    clock, pump, fanout, subs, transport = pipeline(2)
    (a, ra), (b, rb) = subs
    ra.producer.pauseProducing()
    rb.producer.pauseProducing()
    assert transport.paused == 1
    ra.producer.resumeProducing()
    assert transport.resumed == 0  # b is still slow
    rb.producer.resumeProducing()
    assert transport.resumed == 1


def test_upstream_is_aborted_only_when_the_last_client_leaves():
    clock, pump, fanout, subs, transport = pipeline(2)
    (a, ra), (b, rb) = subs
    gone: list[Failure] = []
    a.done.addErrback(gone.append)
    b.done.addErrback(gone.append)
    ra.producer.stopProducing()
    ra.producer.stopProducing()  # twisted.web and Klein both tell us: idempotent
    assert transport.stopped == 0
    pump.dataReceived(DELTA)
    assert rb.written == [DELTA] and ra.written == []
    b.done.cancel()  # Klein cancels when its client goes
    assert transport.stopped == 1
    assert pump.ends == []  # a tick later: the request hears first that its client left
    clock.advance(0)
    assert pump.ends.failure().check(ClientGone)
    assert len(gone) == 2  # each client's call ended too


def test_a_silent_upstream_is_ended_by_the_watchdog():
    clock, pump, fanout, subs, transport = pipeline(1)
    clock.advance(20)
    pump.dataReceived(DELTA)  # data resets the watchdog
    clock.advance(20)
    assert pump.ends == []
    clock.advance(9)
    assert pump.ends == []  # 49 s: 29 s after the last byte
    clock.advance(2)
    assert pump.ends.failure().check(StreamIdle) and transport.stopped == 1
    assert not clock.getDelayedCalls()


def test_the_read_timer_goes_on_timing_the_body():
    """One DelayedCall for the whole upstream call: the read timeout until the
    headers, then the (shorter) idle timeout from there."""
    clock = Clock()
    timed_out: list[str] = []
    watchdog = Watchdog(clock, 600, lambda: timed_out.append("no headers"), look_within=30)
    clock.advance(10)  # the response headers came
    fanout = Fanout(None, keep=1 << 20, on_empty=lambda: None)
    ends = Ends()
    pump = BodyPump(fanout, clock, idle_timeout=30, on_end=ends.append, watchdog=watchdog)
    pump.makeConnection(FakeTransport())
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(29)
    assert ends == [] and timed_out == []
    clock.advance(1)
    assert ends.failure().check(StreamIdle) and timed_out == [] and not clock.getDelayedCalls()


def test_the_read_timer_fires_when_no_headers_come():
    clock = Clock()
    timed_out: list[str] = []
    Watchdog(clock, 600, lambda: timed_out.append("no headers"), look_within=300)
    clock.advance(599)
    assert timed_out == []
    clock.advance(1)
    assert timed_out == ["no headers"] and not clock.getDelayedCalls()


def test_a_clean_end_unregisters_and_fires_done():
    clock, pump, fanout, subs, transport = pipeline(1)
    pump.dataReceived(DELTA)
    pump.connectionLost(Failure(ResponseDone()))
    assert pump.ends == [None] and subs[0][1].producer is None
    assert not clock.getDelayedCalls()  # the watchdog is gone too


def test_a_late_joiner_gets_what_was_kept_first():
    clock, pump, fanout, subs, transport = pipeline(1)
    pump.dataReceived(DELTA)
    late = FakeRequest()
    sub = Subscriber(late, False, clock, lambda: None)
    fanout.add(sub)
    pump.dataReceived(DELTA)
    assert late.written == [DELTA, DELTA] and late.producer is sub
