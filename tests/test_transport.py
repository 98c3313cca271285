"""write_now: an answer leaves at once over a real loopback socket, and never out of order."""

from __future__ import annotations

import socket
from typing import Any, AsyncIterator

import pytest_twisted
from twisted.internet import threads
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


@pytest_twisted.async_yield_fixture
async def held() -> AsyncIterator[tuple[Any, socket.socket, Any]]:
    """A Twisted server transport, the plain socket of its client, and the factory."""
    from twisted.internet import reactor

    factory = Factory.forProtocol(_Held)
    factory.connected, factory.lost = [], []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        await eventually(lambda: factory.connected)
        yield factory.connected[0].transport, client, factory
    finally:
        client.close()
        await port.stopListening()


def _read(client: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    client.settimeout(timeout)
    got = b""
    while len(got) < n:
        piece = client.recv(65536)
        if not piece:
            break
        got += piece
    return got


def test_the_bytes_leave_before_the_reactor_runs_again(held: Any) -> None:
    transport, client, _ = held
    write_now(transport, b"HTTP/1.1 200 OK\r\n\r\n")
    # The reactor does not run in this test: with a plain transport.write
    # the bytes would still wait in Twisted's queue.
    assert not transport._tempDataBuffer and not transport.dataBuffer
    assert _read(client, 19, timeout=1) == b"HTTP/1.1 200 OK\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_is_queued_and_later_writes_stay_behind_it(held: Any) -> None:
    transport, client, _ = held
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 16384  # 4 MiB: far more than the socket holds while the client does not read
    write_now(transport, big)
    assert transport._tempDataBuffer or transport.dataBuffer  # the rest is queued
    write_now(transport, b"<after>")  # must not jump the queue
    got = await threads.deferToThread(_read, client, len(big) + 7)
    assert got == big + b"<after>"


@pytest_twisted.ensureDeferred
async def test_a_write_to_a_connection_the_peer_reset_does_not_raise_and_the_connection_ends(held: Any) -> None:
    transport, client, factory = held
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()  # with linger 0: a reset
    write_now(transport, b"too late")
    write_now(transport, b"and again")
    await eventually(lambda: factory.lost)


def test_other_transports_get_an_ordinary_write() -> None:
    transport = StringTransport()
    write_now(transport, b"abc")
    write_now(transport, b"def")
    assert transport.value() == b"abcdef"
