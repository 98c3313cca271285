"""write_now: an answer leaves at once over a real loopback socket, and never out of order."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from greyfox._transport import write_now

from .conftest import eventually


class _Held(Protocol):
    """The server side of one connection, kept for the test to write on."""

    def connectionMade(self) -> None:
        self.factory.connected.append(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost.append(reason)


async def _connection() -> tuple[Any, socket.socket, Any, Any]:
    """A Twisted server transport and the plain socket of its client."""
    from twisted.internet import reactor

    factory = Factory.forProtocol(_Held)
    factory.connected, factory.lost = [], []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    await eventually(lambda: factory.connected)
    return factory.connected[0].transport, client, factory, port


def _read(client: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    client.settimeout(timeout)
    got = b""
    while len(got) < n:
        piece = client.recv(65536)
        if not piece:
            break
        got += piece
    return got


@pytest_twisted.ensureDeferred
async def test_the_bytes_leave_before_the_reactor_runs_again() -> None:
    transport, client, _, port = await _connection()
    try:
        write_now(transport, b"HTTP/1.1 200 OK\r\n\r\n")
        # No await: the reactor has not run since the call.  With a plain
        # transport.write the bytes would still wait in Twisted's queue.
        assert not transport._tempDataBuffer and not transport.dataBuffer
        assert _read(client, 19, timeout=1) == b"HTTP/1.1 200 OK\r\n\r\n"
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_is_queued_and_later_writes_stay_behind_it() -> None:
    transport, client, _, port = await _connection()
    try:
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 16384  # 4 MiB: far more than the socket holds while the client does not read
        write_now(transport, big)
        assert transport._tempDataBuffer or transport.dataBuffer  # the rest is queued
        write_now(transport, b"<after>")  # must not jump the queue
        from twisted.internet import threads

        got = await threads.deferToThread(_read, client, len(big) + 7)
        assert got == big + b"<after>"
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_write_to_a_connection_the_peer_reset_does_not_raise_and_the_connection_ends() -> None:
    transport, client, factory, port = await _connection()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # with linger 0: a reset
        write_now(transport, b"too late")
        write_now(transport, b"and again")
        await eventually(lambda: factory.lost)
    finally:
        await port.stopListening()


def test_other_transports_get_an_ordinary_write() -> None:
    transport = StringTransport()
    write_now(transport, b"abc")
    write_now(transport, b"def")
    assert transport.value() == b"abcdef"
