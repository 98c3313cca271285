"""GreyFox's HTTP/1.1 server protocol for /v1, on an in-memory transport (no sockets).

The proxy behind it is covered end to end elsewhere; these tests pin the
HTTP behaviour a client sees: framing, keep-alive, pipelining, errors, and
the hand-over of everything that is not /v1 to twisted.web.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site

from greyfox._server import IDLE_TIMEOUT, ServerFactory, V1Request, is_v1, sniff

from .conftest import in_thread, sleep


class Health(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"site:" + request.path


class Harness:
    """One server connection; requests are answered by ``answer`` (or held in ``held``)."""

    def __init__(self, max_body: int = 1024, hold: bool = False) -> None:
        self.clock = Clock()
        self.held: list[V1Request] = []
        self.hold = hold
        self.seen: list[V1Request] = []
        root = Resource()
        root.putChild(b"healthz", Health())
        self.site = Site(root)
        self.factory = ServerFactory(self.site, self.answer, max_body, self.clock)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        self.channel = self.factory.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def answer(self, request: V1Request) -> None:
        self.seen.append(request)
        if self.hold:
            self.held.append(request)
            return
        body = json.dumps({"path": request.path.decode(), "body": request.content.read().decode()}).encode()
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        request.write(body)
        request.finish()

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def output(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out


def responses(raw: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split HTTP/1.1 responses written on a connection (Content-Length or chunked)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        if status == 100:
            raw = rest
            continue
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            body, raw = rest[:n], rest[n:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    raw = rest[2:]
                    break
                body += rest[:size]
                rest = rest[size + 2 :]
        else:
            body, raw = rest, b""
        out.append((status, headers, body))
    return out


def test_v1_targets() -> None:
    assert is_v1(b"/v1") and is_v1(b"/v1/chat/completions") and is_v1(b"/v1?x=1")
    assert not is_v1(b"/v10/x") and not is_v1(b"/api/usage") and not is_v1(b"/") and not is_v1(b"/v")
    assert sniff(b"POST /v1/chat/completions HTTP/1.1\r\n") is True
    assert sniff(b"\r\nGET /v1 HTTP/1.1\r\n") is True
    assert sniff(b"GET /healthz HTTP/1.1\r\n") is False
    assert sniff(b"GET /v1") is None  # cannot tell yet: /v1 or /v10?
    assert sniff(b"POS") is None


def test_request_body_and_keep_alive() -> None:
    h = Harness()
    h.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    h.send(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    [(s1, hd1, b1), (s2, _, b2)] = responses(h.output())
    assert (s1, json.loads(b1)) == (200, {"path": "/v1/chat/completions", "body": "hello"})
    assert hd1[b"transfer-encoding"] == b"chunked" and b"date" in hd1
    assert json.loads(b2) == {"path": "/v1/embeddings", "body": "hi"}
    assert not h.transport.disconnecting


def test_chunked_upload_is_joined() -> None:
    h = Harness()
    h.send(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    [(_, _, body)] = responses(h.output())
    assert json.loads(body)["body"] == "abcde"


def test_pipelined_requests_are_answered_in_order() -> None:
    h = Harness(hold=True)
    h.send(b"GET /v1/models/a HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models/b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r.path for r in h.held] == [b"/v1/models/a"]  # the second waits for the first answer
    first = h.held.pop()
    first.setHeader(b"Content-Length", b"1")
    first.write(b"A")
    first.finish()
    assert [r.path for r in h.held] == [b"/v1/models/b"]
    second = h.held.pop()
    second.write(b"B")
    second.finish()
    assert [body for _, _, body in responses(h.output())] == [b"A", b"B"]


def test_connection_close_and_http10() -> None:
    h = Harness()
    h.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    [(_, headers, _)] = responses(h.output())
    assert headers[b"connection"] == b"close" and h.transport.disconnecting

    h = Harness()
    h.send(b"GET /v1/models HTTP/1.0\r\n\r\n")
    raw = h.output()
    assert raw.startswith(b"HTTP/1.1 200 ") and b"chunked" not in raw  # HTTP/1.0: ends with the connection
    assert h.transport.disconnecting


def test_expect_continue() -> None:
    h = Harness()
    h.send(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert h.output() == b"HTTP/1.1 100 Continue\r\n\r\n"
    h.send(b"ok")
    [(status, _, body)] = responses(h.output())
    assert status == 200 and json.loads(body)["body"] == "ok"


def test_malformed_request_gets_openai_error_and_close() -> None:
    h = Harness()
    h.send(b"POST /v1/x HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n")
    [(status, headers, body)] = responses(h.output())
    assert status == 400 and headers[b"connection"] == b"close"
    assert json.loads(body)["error"]["code"] == "invalid_http"
    assert h.transport.disconnecting and h.seen == []


def test_oversized_head_is_refused() -> None:
    h = Harness()
    h.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    [(status, _, body)] = responses(h.output())
    assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large"


def test_oversized_body_is_dropped_and_flagged() -> None:
    h = Harness(max_body=10, hold=True)
    h.send(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" + b"x" * 20)
    [request] = h.held
    assert request.body_too_large and request.content.read() == b""


def test_other_paths_are_served_by_twisted_web() -> None:
    h = Harness()
    h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    [(status, headers, body)] = responses(h.output())
    assert (status, body) == (200, b"site:/healthz") and b"twistedweb" in headers.get(b"server", b"").lower()
    assert h.seen == []


def test_a_v1_connection_that_asks_for_something_else_is_bridged() -> None:
    h = Harness(hold=True)
    h.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert h.output() == b""  # the /v1 answer comes first
    [request] = h.held
    request.write(b"models")
    request.finish()
    [(s1, _, b1), (s2, _, b2)] = responses(h.output())
    assert (s1, b1, s2, b2) == (200, b"models", 200, b"site:/healthz")
    h.send(b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n")
    [(status, _, _)] = responses(h.output())
    assert status == 405  # twisted.web answered it: the chunked body was passed on intact


def test_client_gone_mid_response() -> None:
    h = Harness(hold=True)
    h.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    [request] = h.held
    outcomes: list[Any] = []
    request.notifyFinish().addBoth(outcomes.append)
    request.write(b"partial")
    h.channel.connectionLost(Exception("gone"))
    assert request.channel is None and len(outcomes) == 1 and outcomes[0].check(Exception)
    request.write(b"more")  # writes after the client left are dropped, not errors
    request.finish()


def test_idle_connection_times_out() -> None:
    h = Harness()
    h.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    h.clock.advance(IDLE_TIMEOUT - 1)
    assert not h.transport.disconnecting
    h.clock.advance(2)
    assert h.transport.disconnecting


def test_a_busy_connection_is_not_timed_out_and_the_idle_time_counts_from_its_answer() -> None:
    h = Harness(hold=True)
    h.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    h.clock.advance(IDLE_TIMEOUT + 1)  # the answer takes its time
    assert not h.transport.disconnecting
    [request] = h.held
    request.write(b"models")
    request.finish()
    h.clock.advance(IDLE_TIMEOUT - 1)
    assert not h.transport.disconnecting
    h.clock.advance(2)
    assert h.transport.disconnecting and not h.clock.getDelayedCalls()


@pytest.mark.parametrize("method", [b"HEAD"])
def test_head_has_no_body(method: bytes) -> None:
    h = Harness()
    h.send(method + b" /v1/models HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = h.output()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"chunked" not in head and rest.startswith(b"HTTP/1.1 200")


@pytest_twisted.ensureDeferred
async def test_one_keep_alive_connection_mixing_v1_and_the_console(start_proxy: Any) -> None:
    """Over a real socket: an SDK-like client that also polls /healthz on the same connection."""
    running = await start_proxy()
    port = running.service.port.getHost().port
    chat = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})

    ports: set[int] = set()

    def client() -> list[tuple[int, bytes]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        out = []
        for method, path, body in [("POST", "/v1/chat/completions", chat), ("GET", "/healthz", None),
                                   ("POST", "/v1/chat/completions", chat), ("GET", "/v1/models", None)]:
            headers = {"Content-Type": "application/json"} if body else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            out.append((response.status, response.read()))
            ports.add(conn.sock.getsockname()[1])
        conn.close()
        return out

    results = await in_thread(client)
    assert [status for status, _ in results] == [200, 200, 200, 200]
    assert len(ports) == 1  # one connection throughout
    assert json.loads(results[0][1])["choices"][0]["message"]["content"] == json.loads(results[2][1])["choices"][0]["message"]["content"]
    assert json.loads(results[1][1])["status"] == "ok"


def test_a_bug_while_serving_is_logged_and_answered_500(observe_errors: Any) -> None:
    h = Harness()

    def broken(request: V1Request) -> None:
        raise ZeroDivisionError("a bug")

    h.factory.handle = broken
    h.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    [(status, headers, body)] = responses(h.output())
    assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
    assert h.transport.disconnecting
    assert len(observe_errors) == 1
    observe_errors.clear()  # expected: the fixture fails tests on logged errors


# -- the console and API resource, loaded in a thread at start --


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello " + request.path


@pytest_twisted.ensureDeferred
async def test_a_request_before_the_console_is_loaded_waits_for_it(http: Any) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from greyfox._http import WhenLoaded

    loading: Deferred[Any] = Deferred()
    port = reactor.listenTCP(0, Site(WhenLoaded(loading)), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}"
        early = http.get(url + "/healthz")
        answered: list[Any] = []
        early.addBoth(lambda r: answered.append(r) or r)
        await sleep(0.1)
        assert not answered  # waiting, not answered with an error
        loading.callback(_Hello())
        response = await early
        assert response.code == 200 and await response.content() == b"hello /healthz"
        response = await http.get(url + "/api/usage")  # once loaded, straight through
        assert await response.content() == b"hello /api/usage"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_console_that_cannot_load_answers_500_and_says_so_in_the_log(http: Any, observe_errors: Any) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from greyfox._http import WhenLoaded

    loading: Deferred[Any] = Deferred()
    port = reactor.listenTCP(0, Site(WhenLoaded(loading)), interface="127.0.0.1")
    try:
        loading.errback(ImportError("no klein"))
        response = await http.get(f"http://127.0.0.1:{port.getHost().port}/healthz")
        assert response.code == 500
        await response.content()
        assert [e["log_failure"].type for e in observe_errors] == [ImportError]
        observe_errors.clear()
    finally:
        await port.stopListening()
