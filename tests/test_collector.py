"""Full collections timed by the reactor: when idle, or after ten busy minutes; cyclic garbage is still freed."""

from __future__ import annotations

import gc
import weakref

import pytest_twisted
from twisted.internet.task import Clock

from greyfox._collector import FULL_PASS_INTERVAL, FULL_PASS_MAX_WAIT, FullCollections

from .conftest import post_json
from .test_proxy import CHAT


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def old_garbage() -> weakref.ref:
    """A cycle that reached the old generation, then became garbage."""
    node = Node()
    gone = weakref.ref(node)
    gc.collect(1)  # survives the young collections: now in the old generation
    gc.collect(1)
    del node
    gc.collect(1)  # the young collections leave it where it is
    assert gone() is not None
    return gone


def advance(clock: Clock, seconds: float) -> None:
    for _ in range(int(seconds)):
        clock.advance(1)


def test_old_cyclic_garbage_is_freed_when_idle_and_the_rule_is_restored():
    before = gc.get_threshold()
    clock = Clock()
    service = FullCollections(clock)
    service.startService()
    try:
        gone = old_garbage()
        advance(clock, FULL_PASS_INTERVAL + 5)
        assert gone() is None
    finally:
        service.stopService()
    assert gc.get_threshold() == before


def test_under_unbroken_load_the_pass_waits_but_not_forever():
    clock = Clock()
    busy = [True]
    service = FullCollections(clock, busy=lambda: busy[0])
    service.startService()
    try:
        gone = old_garbage()
        advance(clock, FULL_PASS_INTERVAL * 5)
        assert gone() is not None  # no pause while requests are in flight ...
        advance(clock, FULL_PASS_MAX_WAIT)
        assert gone() is None  # ... until it has waited too long
        gone = old_garbage()
        advance(clock, FULL_PASS_INTERVAL + 5)
        busy[0] = False
        advance(clock, 5)
        assert gone() is None  # the first idle moment
    finally:
        service.stopService()


@pytest_twisted.ensureDeferred
async def test_cache_hits_keep_the_proxy_busy_for_the_collector(start_proxy, http):
    proxy = await start_proxy()
    busy = proxy.service._busy  # what the service gives FullCollections
    busy()
    assert not busy()  # nothing since the last look
    await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    assert busy() and not busy()
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    assert response.headers.getRawHeaders(b"x-greyfox-cache") == [b"HIT"]  # answered at once: never in flight
    assert busy()
