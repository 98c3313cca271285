# -*- test-case-name: tests.test_transport -*-
"""Writing to a TCP transport without waiting for the reactor's next pass.

Twisted queues every write and sends it when the reactor next polls the
socket for writability: one more poll, and two ``epoll_ctl`` calls to watch
and unwatch the socket, for each answer a proxy already has in hand, and the
answer waits behind every other event of the current pass.  asyncio's
transports send at once when nothing is queued; :func:`write_now` does the
same for Twisted's TCP transports, and leaves any other transport (TLS, the
tests' in-memory ones) to its own ``write``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.tcp import Connection


def write_now(transport: Any, data: bytes) -> None:
    """Send ``data`` now if nothing is queued before it; queue what the socket does not take.

    Whatever is queued goes through ``transport.write``, so order, flow
    control (a registered producer is paused when the queue grows) and error
    handling stay Twisted's: a send that fails is queued too, and the reactor
    meets the error at its next write as it would have.
    """
    if (
        isinstance(transport, Connection)
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
    ):
        sent = transport.writeSomeData(data)
        if sent == len(data):
            return
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
    transport.write(data)
