"""The relay end to end: real sockets, the official openai SDK, a fake upstream."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
from typing import Any

import openai
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogPublisher

from greyfox import _flight

from . import fakeupstream
from .conftest import DEEPSEEK_KEY, PROXY_KEY, eventually, in_thread, post_json, sleep

CLIENT_KEY = "sk-client-key-should-not-travel"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}


def sdk(base_url: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=kw.pop("api_key", CLIENT_KEY), max_retries=0, **kw)


# -- round trips through the official SDK --


@pytest_twisted.ensureDeferred
async def test_sdk_chat_round_trip_uses_the_proxy_key(start_proxy):
    proxy = await start_proxy()

    def call():
        raw = sdk(proxy.v1).chat.completions.with_raw_response.create(**CHAT)
        return raw.headers, raw.parse()

    headers, completion = await in_thread(call)
    assert completion.choices[0].message.content == fakeupstream.REPLY
    assert headers["x-greyfox-request-id"].isdigit()
    [seen] = proxy.upstream.received
    assert seen.path == "/openai/v1/chat/completions"
    assert seen.header("authorization") == f"Bearer {PROXY_KEY}"
    assert CLIENT_KEY not in json.dumps(seen.headers)


@pytest_twisted.ensureDeferred
async def test_sdk_stream_relays_every_delta_and_hides_the_usage_chunk(start_proxy):
    proxy = await start_proxy()

    def call():
        chunks = list(sdk(proxy.v1).chat.completions.create(**CHAT, stream=True))
        return chunks

    chunks = await in_thread(call)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == fakeupstream.REPLY
    assert all(c.choices for c in chunks), "the usage-only chunk the proxy asked for leaked to the client"
    [seen] = proxy.upstream.received
    assert seen.body["stream_options"] == {"include_usage": True}


@pytest_twisted.ensureDeferred
async def test_sdk_stream_with_include_usage_gets_the_usage_chunk(start_proxy):
    proxy = await start_proxy()

    def call():
        return list(
            sdk(proxy.v1).chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
        )

    chunks = await in_thread(call)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == fakeupstream.PROMPT_TOKENS + fakeupstream.COMPLETION_TOKENS


@pytest_twisted.ensureDeferred
async def test_async_sdk_stream(start_proxy):
    proxy = await start_proxy()

    def call():
        async def run():
            client = openai.AsyncOpenAI(base_url=proxy.v1, api_key=CLIENT_KEY, max_retries=0)
            stream = await client.chat.completions.create(**CHAT, stream=True)
            text = ""
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            await client.close()
            return text

        return asyncio.run(run())

    assert await in_thread(call) == fakeupstream.REPLY


@pytest_twisted.ensureDeferred
async def test_models_and_other_v1_paths_are_relayed(start_proxy, http):
    proxy = await start_proxy()
    models = await in_thread(lambda: sdk(proxy.v1).models.list())
    assert [m.id for m in models.data] == ["gpt-4o-mini"]
    response = await http.get(proxy.v1 + "/files/abc/content?x=1")
    assert response.code == 200
    assert json.loads(await response.content())["echo"] == "/openai/v1/files/abc/content"
    assert proxy.upstream.received[-1].header("authorization") == f"Bearer {PROXY_KEY}"


# -- routing --


@pytest_twisted.ensureDeferred
async def test_prefixed_model_goes_to_its_upstream_without_the_prefix(start_proxy):
    proxy = await start_proxy()
    completion = await in_thread(
        lambda: sdk(proxy.v1).chat.completions.create(model="deepseek/deepseek-chat", messages=CHAT["messages"])
    )
    assert completion.choices[0].message.content == fakeupstream.REPLY
    [seen] = proxy.upstream.received
    assert seen.path == "/deepseek/v1/chat/completions"
    assert seen.body["model"] == "deepseek-chat"
    assert seen.header("authorization") == f"Bearer {DEEPSEEK_KEY}"


@pytest_twisted.ensureDeferred
async def test_upstream_without_key_gets_the_client_credential(start_proxy):
    proxy = await start_proxy()
    await in_thread(
        lambda: sdk(proxy.v1).chat.completions.create(
            model="openrouter/anthropic/claude-sonnet-4", messages=CHAT["messages"]
        )
    )
    [seen] = proxy.upstream.received
    assert seen.path == "/openrouter/v1/chat/completions"
    assert seen.body["model"] == "anthropic/claude-sonnet-4"
    assert seen.header("authorization") == f"Bearer {CLIENT_KEY}"


@pytest_twisted.ensureDeferred
async def test_client_token_is_required_and_never_forwarded(start_proxy, http):
    proxy = await start_proxy(GREYFOX_CLIENT_TOKEN="gf-client-token")
    for auth in (None, "Bearer wrong", "Basic gf-client-token"):
        headers = {"authorization": auth} if auth else {}
        response, body = await post_json(http, proxy.v1 + "/chat/completions", CHAT, headers)
        assert response.code == 401
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert proxy.upstream.received == []
    # Right token: the keyed upstream gets its key, the key-less one gets no credential at all.
    ok = sdk(proxy.v1, api_key="gf-client-token")
    await in_thread(lambda: ok.chat.completions.create(**CHAT))
    await in_thread(lambda: ok.chat.completions.create(model="openrouter/x/y", messages=CHAT["messages"]))
    first, second = proxy.upstream.received
    assert first.header("authorization") == f"Bearer {PROXY_KEY}"
    assert second.header("authorization") is None


# -- bad input: OpenAI-shaped, nothing upstream, still serving --


@pytest_twisted.ensureDeferred
async def test_bad_inputs_are_refused_before_the_upstream(start_proxy, http):
    proxy = await start_proxy(GREYFOX_MAX_BODY_MB="0.001")
    url = proxy.v1 + "/chat/completions"
    cases = [
        (b"{not json", b"application/json", 400, "invalid_json"),
        (b"[1, 2]", b"application/json", 400, "invalid_json"),
        (json.dumps({"messages": []}).encode(), b"application/json", 400, "missing_model"),
        (json.dumps(CHAT).encode(), b"text/plain", 415, "unsupported_media_type"),
        (json.dumps(dict(CHAT, pad="x" * 2000)).encode(), b"application/json", 413, "request_too_large"),
    ]
    for body, content_type, status, code in cases:
        response = await http.request("POST", url, data=body, headers={b"content-type": [content_type]})
        doc = json.loads(await response.content())
        assert response.code == status, (body[:40], doc)
        assert doc["error"]["code"] == code
        assert set(doc["error"]) >= {"message", "type", "code", "param"}
        assert response.headers.getRawHeaders(b"x-greyfox-request-id")
    response, _ = await post_json(http, url, CHAT, {"x-app-user-id": "bad\x01user"})
    assert response.code == 400
    assert proxy.upstream.received == []
    response, body = await post_json(http, url, CHAT)
    assert response.code == 200 and json.loads(body)["choices"]


# -- upstream failures --


@pytest_twisted.ensureDeferred
async def test_upstream_error_is_relayed_with_status_and_body(start_proxy, http):
    proxy = await start_proxy()
    response, body = await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="fail-500"))
    assert response.code == 500
    assert json.loads(body)["error"]["message"] == "fake failure 500"


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_is_502(start_proxy, http):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    proxy = await start_proxy(OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1")
    response, body = await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    assert response.code == 502
    assert json.loads(body)["error"]["code"] == "upstream_unreachable"


@pytest_twisted.ensureDeferred
async def test_no_response_headers_in_time_is_504(start_proxy, http):
    proxy = await start_proxy(GREYFOX_READ_TIMEOUT="0.3")
    response, body = await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="hang"))
    assert response.code == 504
    assert "GREYFOX_READ_TIMEOUT" in json.loads(body)["error"]["message"]


async def broken_off(http: Any, url: str, doc: Any) -> bytes:
    """POST ``doc``; the body the client got before its response was aborted (fails if it ended cleanly)."""
    from twisted.web.client import ResponseFailed

    response = await http.post(url, data=json.dumps(doc).encode(), headers={b"content-type": [b"application/json"]})
    assert response.code == 200
    got: list[bytes] = []
    try:
        await response.collect(got.append)
    except ResponseFailed:
        return b"".join(got)
    raise AssertionError(f"a broken-off answer ended as if complete: {b''.join(got)!r}")


def assert_ends_with_an_error_event(body: bytes, code: str, said: str) -> None:
    last = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")][-1]
    error = json.loads(last[len(b"data: "):])["error"]
    assert error["code"] == code and said in error["message"], error


@pytest_twisted.ensureDeferred
async def test_an_upstream_body_that_is_not_the_gzip_it_says_is_a_502(start_proxy, http):
    proxy = await start_proxy()
    response, body = await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="bad-gzip"))
    assert response.code == 502 and json.loads(body)["error"]["code"] == "upstream_unreachable"
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", CHAT)  # and the proxy serves on
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_silent_stream_is_aborted_after_the_idle_timeout(start_proxy, http):
    proxy = await start_proxy(GREYFOX_STREAM_IDLE_TIMEOUT="0.3")
    body = await broken_off(http, proxy.v1 + "/chat/completions", dict(CHAT, model="stall-after-2", stream=True))
    assert body.count(b"data: {\"id\"") == 2
    assert_ends_with_an_error_event(body, "upstream_broke_off", "GREYFOX_STREAM_IDLE_TIMEOUT")
    assert await _wait(proxy.upstream.lost[0], 2.0) is True
    await eventually(lambda: proxy.service.ledger.pending == 0 and proxy.service.ledger.written == 1)
    [row] = (await proxy.service.api.requests({}))[1]["requests"]
    assert "GREYFOX_STREAM_IDLE_TIMEOUT" in row["error"]


@pytest_twisted.ensureDeferred
async def test_upstream_dropping_mid_stream_aborts_the_client_stream(start_proxy, http):
    proxy = await start_proxy()
    body = await broken_off(http, proxy.v1 + "/chat/completions", dict(CHAT, model="drop-after-2", stream=True))
    assert body.count(b"data: {\"id\"") == 2
    assert b"[DONE]" not in body
    assert_ends_with_an_error_event(body, "upstream_broke_off", "dropped")
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", CHAT)  # and the proxy serves on
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_json_answers_keep_their_length_and_a_cut_one_is_not_passed_off_as_complete(start_proxy, http):
    proxy = await start_proxy()
    response, body = await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    assert response.length == len(body)  # framed by Content-Length (twisted.web.client keeps it here), not chunked
    assert len(response.headers.getRawHeaders(b"date")) == 1  # the upstream's; not a second one of ours
    response = await http.post(proxy.v1 + "/chat/completions", data=json.dumps(dict(CHAT, model="truncate")).encode(),
                               headers={b"content-type": [b"application/json"]})
    assert response.code == 200
    try:
        await response.content()
    except Exception as e:  # the connection closed short of the declared length
        assert "ResponseFailed" in type(e).__name__ or "PotentialDataLoss" in repr(e), e
    else:
        raise AssertionError("a truncated answer reached the client as a complete one")
    response, body = await post_json(http, proxy.v1 + "/chat/completions", CHAT)  # and the proxy serves on
    assert response.code == 200


# -- streaming mechanics --


class RawClient(Protocol):
    """An HTTP/1.1 client that can stop reading or hang up, to play a slow or leaving user."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


def raw_post(port: int, doc: Any, headers: bytes = b"", close: bool = True) -> bytes:
    body = json.dumps(doc).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + headers +
        (b"Connection: close\r\n" if close else b"") + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


async def hang_up_after(proxy: Any, doc: Any, events: int, headers: bytes = b"") -> RawClient:
    """Stream ``doc`` through the proxy and drop the connection after ``events`` SSE events."""
    port = proxy.service.port.getHost().port
    client = RawClient(raw_post(port, doc, headers))
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await eventually(lambda: client.received.count(b"data: ") >= events)
    client.transport.abortConnection()
    return client


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_the_upstream(start_proxy):
    proxy = await start_proxy()
    port = proxy.service.port.getHost().port
    total = 30 * 1024 * 1024
    client = RawClient(raw_post(port, dict(CHAT, model="big-30", stream=True)))
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await eventually(lambda: len(client.received) > 100_000)
    client.transport.pauseProducing()  # the user stops reading
    # Kernel socket buffers fill for a moment; then the upstream must stand still.
    stalled_at = -1
    for _ in range(20):
        await sleep(0.3)
        if proxy.upstream.big_written == stalled_at:
            break
        stalled_at = proxy.upstream.big_written
    await sleep(0.5)
    assert proxy.upstream.big_written == stalled_at, "upstream kept writing while the client read nothing"
    assert stalled_at < total / 3, "the proxy buffered the stream instead of pausing the upstream"
    assert proxy.upstream.big_pauses > 0
    client.transport.resumeProducing()
    await Deferred.fromCoroutine(_wait(client.closed, 30))
    assert client.received.count(b"x" * 900) == -(-total // len(fakeupstream.sse({"choices": [{"index": 0, "delta": {"content": "x" * 900}}]})))
    assert b"[DONE]" in client.received


async def _wait(d: Deferred[Any], timeout: float) -> Any:
    d.addTimeout(timeout, reactor)
    return await d


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_the_upstream_at_once(start_proxy):
    proxy = await start_proxy()
    await hang_up_after(proxy, dict(CHAT, stream=True), 2)
    assert await _wait(proxy.upstream.lost[0], 1.0) is True


@pytest_twisted.ensureDeferred
async def test_a_bug_on_the_relay_path_is_logged_and_answered_500(start_proxy, http, observe_errors, monkeypatch):
    proxy = await start_proxy()

    def broken(self, sub, call):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(_flight.Flight, "_begin", broken)  # runs when the upstream's headers arrive
    response, body = await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    assert response.code == 500 and json.loads(body)["error"]["code"] == "internal_error"
    assert [e["log_failure"].type for e in observe_errors] == [ZeroDivisionError]
    observe_errors.clear()  # expected: the fixture fails tests on logged errors
    monkeypatch.undo()
    response, body = await post_json(http, proxy.v1 + "/chat/completions", CHAT)  # and it keeps serving
    assert response.code == 200


# -- isolation and secrecy --


@pytest_twisted.ensureDeferred
async def test_upstream_cookies_never_reach_another_clients_request(start_proxy, http):
    proxy = await start_proxy()
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="set-cookie"))
    assert response.code == 200
    assert not response.headers.hasHeader(b"set-cookie")
    await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    assert proxy.upstream.received[-1].header("cookie") is None


@pytest_twisted.ensureDeferred
async def test_no_key_in_logs_or_database(start_proxy, http, tmp_path):
    lines: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        proxy = await start_proxy()
        await post_json(http, proxy.v1 + "/chat/completions", CHAT, {"authorization": f"Bearer {CLIENT_KEY}"})
        await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="openrouter/a/b"), {"authorization": f"Bearer {CLIENT_KEY}"})
        await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="fail-500"))
        status = await http.get(proxy.url + "/api/status")
        status_body = await status.content()
        await proxy.stop()
    finally:
        globalLogPublisher.removeObserver(observer)
    text = "\n".join(lines)
    assert "GreyFox starting" in text
    for secret in (PROXY_KEY, DEEPSEEK_KEY, CLIENT_KEY):
        assert secret not in text
        assert secret.encode() not in status_body
        for f in tmp_path.iterdir():
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f


@pytest_twisted.ensureDeferred
async def test_no_gzip_is_asked_for_one_sent_anyway_is_decoded_and_host_is_the_upstreams(start_proxy, http):
    proxy = await start_proxy()
    port = proxy.service.port.getHost().port
    client = RawClient(raw_post(port, dict(CHAT, model="gzip"), headers=b"Accept-Encoding: gzip\r\n"))
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await _wait(client.closed, 5)
    head, _, body = client.received.partition(b"\r\n\r\n")
    assert b"200 OK" in head and b"content-encoding" not in head.lower()
    assert b'"prompt_tokens": 13' in body  # plain JSON (chunk-framed), not gzip
    [seen] = proxy.upstream.received
    assert seen.header("host") == f"127.0.0.1:{proxy.upstream.port.getHost().port}"
    assert seen.header("accept-encoding") is None


@pytest_twisted.ensureDeferred
async def test_a_chunked_upload_over_the_limit_is_refused_with_413(start_proxy, http):
    proxy = await start_proxy(GREYFOX_MAX_BODY_MB="0.01")
    port = proxy.service.port.getHost().port
    chunk = b"x" * 4096
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10)) + b"0\r\n\r\n"
    client = RawClient(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await _wait(client.closed, 5)
    assert b" 413 " in client.received.split(b"\r\n", 1)[0]
    assert b"request_too_large" in client.received
    assert proxy.upstream.received == []
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    assert response.code == 200


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path, expect", [
    (b"/v1/chat/completions", b""),
    (b"/v1/messages", b"Expect: 100-continue\r\n"),
    (b"/api/quotas", b""),
])
async def test_a_body_declared_past_the_limit_is_refused_before_it_is_sent(start_proxy, http, path, expect):
    """A client declaring 2 GB gets its 413 at once: no 100 Continue, and nothing of the body is awaited."""
    proxy = await start_proxy()
    port = proxy.service.port.getHost().port
    method = b"PUT" if path.startswith(b"/api") else b"POST"
    client = RawClient(method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
                       expect + b"Content-Length: 2147483648\r\n\r\n{")  # and not another byte
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await _wait(client.closed, 5)  # answered, and the connection closed
    status_line = client.received.split(b"\r\n", 1)[0]
    assert b" 413 " in status_line, client.received
    assert b"100 Continue" not in client.received
    assert b"request_too_large" in client.received or b"invalid_request_error" in client.received
    assert proxy.upstream.received == []
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", CHAT)  # and the proxy keeps serving
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_an_instant_upstream_failure_is_a_502_not_a_hang(start_proxy, http, observe_errors):
    from twisted.python.failure import Failure
    from twisted.web.error import SchemeNotSupported

    proxy = await start_proxy()

    def request(*args: Any) -> Deferred[Any]:
        return fail(Failure(SchemeNotSupported("gopher")))  # failed already when it returns

    proxy.service.proxy.http.request = request
    d = Deferred.fromCoroutine(post_json(http, proxy.v1 + "/chat/completions", CHAT))
    response, body = await _wait(d, 5)
    assert response.code == 502 and json.loads(body)["error"]["code"] == "upstream_unreachable"
    assert len(observe_errors) == 1  # an unexpected error is logged with its traceback
    observe_errors.clear()


@pytest_twisted.ensureDeferred
async def test_shutdown_answers_requests_still_waiting_after_the_grace(start_proxy, http, monkeypatch, tmp_path):
    import sqlite3

    import greyfox.service as service_module

    monkeypatch.setattr(service_module, "SHUTDOWN_GRACE", 0.2)
    proxy = await start_proxy()
    d = Deferred.fromCoroutine(post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="hang")))
    await eventually(lambda: len(proxy.upstream.received) == 1)
    await proxy.stop()
    response, body = await _wait(d, 5)
    assert response.code == 503 and json.loads(body)["error"]["code"] == "shutting_down"
    assert await _wait(proxy.upstream.lost[0], 2) is True  # the upstream call was cancelled
    rows = sqlite3.connect(str(tmp_path / "greyfox.db")).execute("SELECT model, status FROM ledger").fetchall()
    assert rows == [("hang", 503)]  # and its row was written before the database closed


@pytest_twisted.ensureDeferred
async def test_finished_requests_leave_nothing_for_the_cycle_collector(start_proxy, http):
    """Each request's objects are freed when it ends, not by the cycle collector.

    Objects left in reference cycles are walked by the collector's young
    generations again and again under load, so a new cycle is a speed
    regression this catches.  A daily limit is set, so that the mid-stream
    limit check is wired too.
    """
    proxy = await start_proxy(GREYFOX_DAILY_TOKENS="1000000")
    per_request = {"Call", "Flight", "Subscriber", "Fanout", "BodyPump", "Reservation", "StreamMeter", "IncrementalCounter"}
    url = proxy.v1 + "/chat/completions"
    await post_json(http, url, CHAT)  # connections and caches warmed outside the count
    gc.collect()
    gc.disable()
    try:
        await post_json(http, url, dict(CHAT, messages=[{"role": "user", "content": "one"}]))
        await post_json(http, url, dict(CHAT, messages=[{"role": "user", "content": "two"}], stream=True))
        await post_json(http, url, dict(CHAT, model="fail-500"))
        await post_json(http, url, CHAT)  # a hit
        await post_json(http, url, {"messages": []})  # refused
        proxy.upstream.delay = 0.1
        together = dict(CHAT, messages=[{"role": "user", "content": "three"}])
        await DeferredList([Deferred.fromCoroutine(post_json(http, url, together)) for _ in range(3)])
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = sorted(type(o).__name__ for o in gc.garbage
                      if type(o).__module__.startswith("greyfox.") and type(o).__name__ in per_request)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
