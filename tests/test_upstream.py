"""The upstream HTTP client against a scripted server on a real loopback socket."""

from __future__ import annotations

import gzip
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from greyfox._upstream import (
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    UpstreamClient,
    host_header,
    split_url,
)

from .conftest import eventually, sleep

Script = Callable[["Server", bytes], None]


class Server(Protocol):
    """Answers each request's bytes with the factory's script."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.factory.live.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.received.append(data)
        if b"\r\n\r\n" in data:
            self.factory.script(self, data)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.live.remove(self)


class Scripted(Factory):
    protocol = Server

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.received: list[bytes] = []
        self.live: list[Server] = []


class Collect(Protocol):
    """A body protocol: keeps the bytes and how the body ended."""

    def __init__(self) -> None:
        self.data = b""
        self.ended: Deferred[list[Failure]] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.ended.callback([reason])  # in a list: a Failure as a result would fail the Deferred


@pytest_twisted.async_yield_fixture
async def serve() -> Any:
    ports = []

    def start(script: Script) -> tuple[Scripted, bytes]:
        factory = Scripted(script)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return factory, b"http://127.0.0.1:%d" % port.getHost().port

    client = UpstreamClient(reactor, connect_timeout=2)
    yield start, client
    await client.close()
    for port in ports:
        await port.stopListening()


def ok(body: bytes, extra: bytes = b"") -> Script:
    def script(server: Server, request: bytes) -> None:
        server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))

    return script


def then_close(answer: bytes) -> Script:
    """Write ``answer`` as it stands, then close the connection."""

    def script(server: Server, request: bytes) -> None:
        server.transport.write(answer)
        server.transport.loseConnection()

    return script


async def fetch(client: UpstreamClient, url: bytes, method: bytes = b"POST", body: bytes | None = b"{}") -> tuple[Any, Collect, Failure]:
    response = await client.request(method, url, [(b"Content-Type", [b"application/json"])], body)
    collect = Collect()
    response.deliverBody(collect)
    [ending] = await collect.ended
    return response, collect, ending


def test_urls() -> None:
    assert split_url(b"https://api.example.com/v1/chat?x=1") == ((b"https", b"api.example.com", 443), b"/v1/chat?x=1")
    assert split_url(b"http://127.0.0.1:8080") == ((b"http", b"127.0.0.1", 8080), b"/")
    assert host_header((b"https", b"api.example.com", 443)) == b"api.example.com"
    assert host_header((b"http", b"::1", 81)) == b"[::1]:81"


@pytest_twisted.ensureDeferred
async def test_requests_reuse_one_connection(serve: Any) -> None:
    start, client = serve
    factory, base = start(ok(b'{"a":1}', b"Content-Type: application/json\r\n"))
    for _ in range(3):
        response, body, ending = await fetch(client, base + b"/v1/chat/completions")
        assert response.code == 200 and body.data == b'{"a":1}' and ending.check(ResponseDone)
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert factory.connections == 1
    first = factory.received[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Content-Length: 2\r\n" in first and first.endswith(b"\r\n\r\n{}")


@pytest_twisted.ensureDeferred
async def test_chunks_that_arrive_in_one_read_are_delivered_together(serve: Any) -> None:
    events = [b"data: %d\n\n" % i for i in range(40)]

    def script(server: Server, request: bytes) -> None:
        server.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n")

    start, client = serve
    _, base = start(script)
    response = await client.request(b"POST", base + b"/v1/x", [], b"{}")
    pieces: list[bytes] = []
    collect = Collect()
    collect.dataReceived = pieces.append  # type: ignore[method-assign]
    response.deliverBody(collect)
    [ending] = await collect.ended
    assert ending.check(ResponseDone)
    assert b"".join(pieces) == b"".join(events)
    assert len(pieces) < 5  # one read (or a few, as TCP splits it), not one pass per chunk


@pytest_twisted.ensureDeferred
async def test_gzip_answers_are_decoded(serve: Any) -> None:
    start, client = serve
    packed = gzip.compress(b'{"usage":{}}')
    _, base = start(ok(packed, b"Content-Encoding: gzip\r\n"))
    response, body, ending = await fetch(client, base + b"/v1/x")
    assert body.data == b'{"usage":{}}' and ending.check(ResponseDone)
    assert not response.headers.hasHeader(b"content-encoding")


@pytest_twisted.ensureDeferred
async def test_body_until_close_is_complete_and_not_reused(serve: Any) -> None:
    start, client = serve
    factory, base = start(then_close(b"HTTP/1.1 200 OK\r\n\r\nall of it"))
    _, body, ending = await fetch(client, base + b"/v1/x")
    assert body.data == b"all of it" and ending.check(PotentialDataLoss)
    await fetch(client, base + b"/v1/x")
    assert factory.connections == 2


@pytest_twisted.ensureDeferred
async def test_a_dropped_body_fails(serve: Any) -> None:
    start, client = serve
    _, base = start(then_close(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"))
    _, body, ending = await fetch(client, base + b"/v1/x")
    assert body.data == b"only part" and ending.check(ResponseFailed)


@pytest_twisted.ensureDeferred
async def test_no_answer_and_refused(serve: Any) -> None:
    start, client = serve
    _, base = start(lambda server, request: server.transport.loseConnection())
    with pytest.raises(ResponseNeverReceived):
        await client.request(b"POST", base + b"/v1/x", [], b"{}")
    with pytest.raises(ConnectError):
        await client.request(b"GET", b"http://127.0.0.1:1/v1/models", [], None)


@pytest_twisted.ensureDeferred
async def test_cancel_before_the_answer_drops_the_connection(serve: Any) -> None:
    start, client = serve
    factory, base = start(lambda server, request: None)  # never answers
    d = client.request(b"POST", base + b"/v1/x", [], b"{}")
    await sleep(0.05)
    assert len(factory.live) == 1
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await sleep(0.05)
    assert factory.live == []


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_closed_by_the_server_is_not_reused(serve: Any) -> None:
    start, client = serve
    factory, base = start(ok(b"x"))
    await fetch(client, base + b"/v1/x")
    factory.live[0].transport.loseConnection()
    await sleep(0.05)
    _, body, _ = await fetch(client, base + b"/v1/x")
    assert body.data == b"x" and factory.connections == 2


@pytest_twisted.ensureDeferred
async def test_interim_answers_and_head(serve: Any) -> None:
    def script(server: Server, request: bytes) -> None:
        if request.startswith(b"HEAD"):
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
        else:
            server.transport.write(b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")

    start, client = serve
    _, base = start(script)
    response, body, _ = await fetch(client, base + b"/v1/x")
    assert response.code == 201 and body.data == b"ok"
    response, body, ending = await fetch(client, base + b"/v1/x", method=b"HEAD", body=None)
    assert response.code == 200 and body.data == b"" and ending.check(ResponseDone)


def make_ca_and_server_cert(hostname: str) -> tuple[bytes, bytes]:
    """(CA certificate PEM, server key + certificate PEM) for ``hostname``, made now."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("GreyFox test CA", ca_key, "GreyFox test CA", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build(hostname, key, "GreyFox test CA", ca_key, ca=False)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(serialization.Encoding.PEM), key_pem + cert.public_bytes(serialization.Encoding.PEM)


@pytest_twisted.ensureDeferred
async def test_https_upstreams_are_verified() -> None:
    """HTTPS works on a plain install, and a certificate the trust store does not vouch for is refused."""
    from twisted.internet.ssl import Certificate, PrivateCertificate

    ca_pem, server_pem = make_ca_and_server_cert("localhost")
    factory = Scripted(ok(b'{"tls":true}'))
    port = reactor.listenSSL(0, factory, PrivateCertificate.loadPEM(server_pem).options(), interface="127.0.0.1")
    url = b"https://localhost:%d/v1/models" % port.getHost().port
    trusting = UpstreamClient(reactor, 2, trust_root=Certificate.loadPEM(ca_pem))
    platform = UpstreamClient(reactor, 2)
    try:
        _, body, ending = await fetch(trusting, url, method=b"GET", body=None)
        assert body.data == b'{"tls":true}' and ending.check(ResponseDone)
        assert factory.received[0].startswith(b"GET /v1/models HTTP/1.1\r\nHost: localhost:")
        with pytest.raises(ResponseNeverReceived) as refused:
            await platform.request(b"GET", url, [], None)
        assert "certificate verify failed" in str(refused.value.reasons[0].value)
    finally:
        await trusting.close()
        await platform.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_finished_calls_cancel_leaves_the_next_call_on_its_connection_alone(serve: Any) -> None:
    """``send`` hands back a cancel function; the pooled connection goes on to
    carry other calls, which an old call's cancel must not touch."""
    start, client = serve
    factory, base = start(ok(b"{}"))
    told: list[Any] = []
    cancel_first = client.send(b"POST", base + b"/v1/x", [], b"{}", told.append)
    await eventually(lambda: len(told) == 1)
    first = told[0]
    collect = Collect()
    first.deliverBody(collect)
    await collect.ended
    second = client.request(b"POST", base + b"/v1/x", [], b"{}")
    cancel_first()  # too late for the first call: a no-op, not the second call's end
    second.addTimeout(5, reactor)
    response = await second
    assert response.code == 200 and factory.connections == 1 and len(told) == 1
