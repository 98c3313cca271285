"""The /v1 front end on twisted.web and treq: what a request may not smuggle in or out.

Real sockets: raw requests to GreyFox, the fake upstream (or a TLS one) behind it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from .conftest import post_json
from .test_proxy import CHAT, RawClient, _wait, raw_post


async def raw(proxy: Any, data: bytes) -> bytes:
    """Send ``data`` on a new connection; everything GreyFox answered once it closed."""
    port = proxy.service.port.getHost().port
    client = RawClient(data)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await _wait(client.closed, 5)
    return client.received


def status_and_doc(answer: bytes) -> tuple[int, Any, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():  # one chunk, then the last
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return int(head.split(b" ")[1]), json.loads(body), head


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/../admin",
        b"/v1/models/../../secret",
        b"/v1/%2e%2e/admin",
        b"/v1/%2E./admin",
        b"/v1/./models",
        b"/v1//models",
        b"/v1/files/..%2Fx",
        b"/v1/models\\..\\x",
        b"/v1/mod%5cels",
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_path_that_could_leave_the_upstreams_base_is_a_400_and_never_forwarded(start_proxy, path):
    proxy = await start_proxy()
    answer = await raw(proxy, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, doc, head = status_and_doc(answer)
    assert status == 400 and doc["error"]["code"] == "invalid_path", doc
    assert b"x-greyfox-request-id" in head.lower()
    assert not proxy.upstream.received


@pytest_twisted.ensureDeferred
async def test_a_path_with_bytes_outside_ascii_is_refused_before_it_reaches_greyfox(start_proxy):
    proxy = await start_proxy()
    answer = await raw(proxy, b"GET /v1/mod\xc3\xa9ls HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")  # (twisted.web's own refusal)
    assert not proxy.upstream.received


@pytest.mark.parametrize("method", [b"TRACE", b"CONNECT", b"PROPFIND"])
@pytest_twisted.ensureDeferred
async def test_only_the_apis_methods_are_relayed(start_proxy, method):
    proxy = await start_proxy()
    answer = await raw(proxy, method + b" /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, doc, _ = status_and_doc(answer)
    assert status == 405 and doc["error"]["code"] == "method_not_allowed"
    assert not proxy.upstream.received


@pytest_twisted.ensureDeferred
async def test_a_chunked_requests_trailer_is_not_taken_for_a_header(start_proxy):
    proxy = await start_proxy(GREYFOX_CLIENT_TOKEN="gf-client")
    body = json.dumps(CHAT).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer gf-client\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n" % len(body) + body + b"\r\n0\r\nX-App-User-Id: mallory\r\nAuthorization: Bearer other\r\n\r\n"
    )
    status, doc, _ = status_and_doc(await raw(proxy, request))
    assert status == 200, doc
    [seen] = proxy.upstream.received
    assert seen.header("x-app-user-id") is None and "other" not in json.dumps(seen.headers)
    await proxy.service.ledger.flush()
    [row] = (await proxy.service.api.requests({}))[1]["requests"]
    assert row["user"] == "anonymous"


@pytest_twisted.ensureDeferred
async def test_expect_continue_is_answered_here_not_forwarded(start_proxy):
    proxy = await start_proxy()
    request = raw_post(0, CHAT, headers=b"Expect: 100-continue\r\n")
    answer = await raw(proxy, request)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")
    [seen] = proxy.upstream.received
    assert seen.header("expect") is None


@pytest_twisted.ensureDeferred
async def test_an_upstreams_cookie_never_reaches_another_request(start_proxy, http):
    proxy = await start_proxy()
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="set-cookie"))
    assert response.code == 200 and response.headers.getRawHeaders(b"set-cookie") is None
    await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="other"))
    assert proxy.upstream.received[-1].header("cookie") is None


@pytest_twisted.ensureDeferred
async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(start_proxy, http):
    """Upstreams drop idle keep-alive connections; the next request gets a new one, not a 502."""
    from . import fakeupstream
    from .conftest import sleep

    closing = fakeupstream.start(idle_timeout=0.2)
    try:
        proxy = await start_proxy(OPENAI_BASE_URL=f"{closing.url}/openai/v1")
        for i in range(2):
            doc = dict(CHAT, messages=[{"role": "user", "content": f"Say hello #{i}"}])
            response, _ = await post_json(http, proxy.v1 + "/chat/completions", doc)
            assert response.code == 200
            await sleep(0.5)  # the upstream has closed the pooled connection by now
        assert len(closing.received) == 2
    finally:
        await closing.port.stopListening()


@pytest.mark.parametrize(
    "head",
    [
        b"GET /api/status HTTP/1.1\r\nHost: .1\r\nConnection: close\r\n\r\n",
        b"GET /api/status HTTP/1.1\r\nHost: \xff\xfe\r\nConnection: close\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: \xff\xfe\r\nConnection: close\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: [::1\r\nConnection: close\r\n\r\n",
        b"GET /%ff%fe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /healthz%00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"HEAD /index.html%00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ],
    ids=["dot-host", "binary-host-api", "binary-host-v1", "bracket-host", "non-utf8-path", "nul-path", "nul-file"],
)
@pytest_twisted.ensureDeferred
async def test_a_strange_host_or_path_is_a_clean_answer_and_nothing_is_logged_as_an_error(start_proxy, head):
    proxy = await start_proxy()
    answer = await raw(proxy, head)
    status = int(answer.split(b" ", 2)[1])
    assert status < 500, answer[:300]
    assert not proxy.upstream.received


@pytest_twisted.ensureDeferred
async def test_a_head_sent_a_byte_at_a_time_is_cut_off_at_the_idle_timeout(start_proxy):
    from .conftest import sleep

    proxy = await start_proxy()
    proxy.service.site.timeOut = 0.5  # (60 s as the daemon runs)
    port = proxy.service.port.getHost().port
    slow = RawClient(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), slow)
    for _ in range(30):  # a byte every 0.1 s: each would put twisted.web's idle timeout off
        if slow.closed.called:
            break
        slow.transport.write(b"X")
        await sleep(0.1)
    assert slow.closed.called, "a head trickling in a byte at a time held the connection past the timeout"
    assert not proxy.upstream.received
    # A client that sends its head at once and then a slow body is not cut off by it.
    body = json.dumps(CHAT).encode()
    steady = RawClient(raw_post(0, CHAT).split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), steady)
    for i in range(0, len(body), 10):
        steady.transport.write(body[i:i + 10])
        await sleep(0.1)
    await _wait(steady.closed, 5)
    assert steady.received.startswith(b"HTTP/1.1 200 ")


@pytest_twisted.ensureDeferred
async def test_a_users_own_token_makes_the_request_theirs_whatever_the_header_says(start_proxy, http, tmp_path):
    config = tmp_path / "greyfox.toml"
    config.write_text('[users.alice]\ntoken_env = "ALICE_TOKEN"\n')
    proxy = await start_proxy({"config": str(config)}, ALICE_TOKEN="alice-secret", GREYFOX_CLIENT_TOKEN="shared")

    async def send(token: str | None, user: str = "mallory") -> int:
        headers = {"x-app-user-id": user} | ({"authorization": f"Bearer {token}"} if token else {})
        response, _ = await post_json(http, proxy.v1 + "/chat/completions", CHAT, headers)
        return response.code

    assert await send("alice-secret") == 200  # alice's token, a header claiming mallory
    assert await send("shared", "bob") == 200  # GreyFox's shared token: the header names the user
    assert await send(None) == 401 and await send("alice-secre") == 401
    await proxy.service.ledger.flush()
    rows = (await proxy.service.api.requests({}))[1]["requests"]
    assert [r["user"] for r in rows] == ["anonymous", "anonymous", "bob", "alice"]
    assert [r["status"] for r in rows] == [401, 401, 200, 200]
    assert all("secret" not in json.dumps(r.headers) and "shared" not in json.dumps(r.headers)
               for r in proxy.upstream.received)


@pytest.mark.parametrize("body", [b'{"daily_budget_usd": NaN}', b'{"daily_budget_usd": 1e999}',
                                  b'{"daily_budget_usd": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"])
@pytest_twisted.ensureDeferred
async def test_an_admin_write_greyfox_cannot_read_is_a_400(start_proxy, http, body):
    proxy = await start_proxy()
    response = await http.put(proxy.url + "/api/quotas", data=body, headers={b"content-type": [b"application/json"]})
    assert response.code == 400 and json.loads(await response.content())["error"]["code"] == "invalid_json"
    assert proxy.service.quotas.daily_budget_usd == 0
