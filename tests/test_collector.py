"""Full collections on a timer: cyclic garbage is still freed, within a minute."""

from __future__ import annotations

import gc
import weakref

from twisted.internet.task import Clock

from greyfox._collector import FULL_PASS_INTERVAL, FullCollections


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_old_cyclic_garbage_is_freed_by_the_timed_full_pass_and_the_rule_is_restored():
    before = gc.get_threshold()
    clock = Clock()
    service = FullCollections(clock)
    service.startService()
    try:
        node = Node()
        gone = weakref.ref(node)
        gc.collect(1)  # survives the young collections: now in the old generation
        gc.collect(1)
        del node
        gc.collect(1)  # the young collections leave it where it is
        assert gone() is not None
        clock.advance(FULL_PASS_INTERVAL)
        assert gone() is None
    finally:
        service.stopService()
    assert gc.get_threshold() == before
