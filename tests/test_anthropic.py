"""Claude Code and the Anthropic SDK through GreyFox: relayed, cached, capped and billed to the cent."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import anthropic
import genai_prices
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from greyfox._cachekey import cache_key
from greyfox._quota import conversation_fingerprint

from . import fakeupstream
from .conftest import ANTHROPIC_KEY, eventually, in_thread, post_json
from .test_ledger import rows
from .test_proxy import RawClient

MODEL = "claude-sonnet-4-5"
MESSAGE = {"model": MODEL, "max_tokens": 64, "system": "You are terse.",
           "messages": [{"role": "user", "content": "Say hello"}]}
U = fakeupstream.ANTHROPIC_USAGE
WORDS = {"user_id": "fake-words"}  # the fake streams 40 one-token words
PROMPT = U["input_tokens"] + U["cache_creation_input_tokens"] + U["cache_read_input_tokens"]


def sdk(proxy: Any, **kw: Any) -> anthropic.Anthropic:
    """The official SDK, pointed at GreyFox as Claude Code is with ANTHROPIC_BASE_URL."""
    return anthropic.Anthropic(base_url=proxy.url, api_key=kw.pop("api_key", "sk-ant-client"), **kw)


def database_dollars(usage: dict[str, int], model: str = MODEL) -> float:
    price = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=PROMPT, output_tokens=usage["output_tokens"],
                           cache_read_tokens=usage["cache_read_input_tokens"],
                           cache_write_tokens=usage["cache_creation_input_tokens"]),
        model, provider_id="anthropic", genai_request_timestamp=datetime.now(timezone.utc))
    return float(price.total_price)


def create(client: anthropic.Anthropic, **body: Any) -> tuple[dict[str, str], Any]:
    raw = client.messages.with_raw_response.create(**dict(MESSAGE, **body))
    return dict(raw.headers), raw.parse()


def stream_text(client: anthropic.Anthropic, **body: Any) -> tuple[str, Any]:
    with client.messages.stream(**dict(MESSAGE, **body)) as stream:
        text = "".join(stream.text_stream)
        return text, stream.get_final_message()


@pytest_twisted.ensureDeferred
async def test_a_message_is_relayed_with_our_key_then_replayed_and_billed_with_cache_details(start_proxy, http):
    proxy = await start_proxy()
    client = sdk(proxy)
    headers, message = await in_thread(create, client)
    assert message.content[0].text == fakeupstream.REPLY
    assert headers["x-greyfox-cache"] == "MISS"
    [sent] = proxy.upstream.received
    assert sent.path == "/anthropic/v1/messages"
    assert sent.header("x-api-key") == ANTHROPIC_KEY  # ours, never the client's
    assert sent.header("anthropic-version") == client.default_headers["anthropic-version"]  # the client's own
    assert sent.header("authorization") is None
    headers, again = await in_thread(create, client)
    assert headers["x-greyfox-cache"] == "HIT" and again.content[0].text == fakeupstream.REPLY
    assert again.usage.cache_read_input_tokens == U["cache_read_input_tokens"]  # the upstream's usage block, kept
    assert len(proxy.upstream.received) == 1
    hit, miss = await rows(http, proxy)
    await post_json(http, proxy.url + "/v1/messages", dict(MESSAGE, max_tokens=65))
    assert proxy.upstream.received[-1].header("anthropic-version") == "2023-06-01"  # when the client names none
    assert (miss["endpoint"], miss["upstream"], miss["model"]) == ("/v1/messages", "anthropic", MODEL)
    assert (miss["prompt_tokens"], miss["completion_tokens"]) == (PROMPT, U["output_tokens"])
    assert (miss["cached_tokens"], miss["cache_write_tokens"]) == (U["cache_read_input_tokens"], U["cache_creation_input_tokens"])
    assert miss["cost_source"] == "table"
    assert miss["cost_usd"] == pytest.approx(database_dollars(U), rel=1e-9)
    assert hit["cache"] == "HIT" and hit["cost_usd"] == 0 and hit["saved_usd"] == pytest.approx(miss["cost_usd"])


@pytest_twisted.ensureDeferred
async def test_a_stream_is_relayed_event_by_event_counted_and_replayed(start_proxy, http):
    proxy = await start_proxy()
    client = sdk(proxy)
    text, final = await in_thread(stream_text, client)
    assert text == fakeupstream.REPLY and final.usage.output_tokens == U["output_tokens"]
    text, _ = await in_thread(stream_text, client)
    assert text == fakeupstream.REPLY and len(proxy.upstream.received) == 1
    hit, miss = await rows(http, proxy)
    assert miss["stream"] and miss["usage_source"] == "upstream"
    assert (miss["prompt_tokens"], miss["completion_tokens"], miss["cache_write_tokens"]) == (
        PROMPT, U["output_tokens"], U["cache_creation_input_tokens"])
    assert miss["cost_usd"] == pytest.approx(database_dollars(U), rel=1e-9)
    assert hit["cache"] == "HIT"
    # the replay is the upstream's own event sequence, ping included
    port = proxy.service.port.getHost().port
    response, body = await post_json(http, f"http://127.0.0.1:{port}/v1/messages", dict(MESSAGE, stream=True))
    assert body == b"".join(fakeupstream.anthropic_events(MODEL))


@pytest_twisted.ensureDeferred
async def test_without_our_key_the_clients_key_passes_through(start_proxy, http):
    proxy = await start_proxy(ANTHROPIC_API_KEY="")
    await in_thread(create, sdk(proxy, api_key="sk-ant-alice"))
    await in_thread(create, sdk(proxy, api_key="sk-ant-bob"))
    # (the SDK sends its key as a bearer token: whichever header the client used goes as it came)
    sent = [r.header("x-api-key") or r.header("authorization") for r in proxy.upstream.received]
    assert sent == ["Bearer sk-ant-alice", "Bearer sk-ant-bob"]
    await post_json(http, proxy.url + "/v1/messages", dict(MESSAGE, max_tokens=9), {"x-api-key": "sk-ant-carol"})
    assert proxy.upstream.received[-1].header("x-api-key") == "sk-ant-carol"
    assert proxy.upstream.received[-1].header("authorization") is None


@pytest_twisted.ensureDeferred
async def test_a_quota_refusal_is_a_rate_limit_error_the_sdk_does_not_retry(start_proxy, http):
    proxy = await start_proxy(GREYFOX_DAILY_TOKENS="10")
    client = sdk(proxy, max_retries=3)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await in_thread(create, client)
    error = caught.value
    assert error.status_code == 429 and error.response.headers["x-should-retry"] == "false"
    assert error.body["type"] == "error" and error.body["error"]["type"] == "rate_limit_error"
    assert error.body["error"]["message"].startswith("daily_token_limit: ")
    assert len(await rows(http, proxy)) == 1  # not retried
    assert proxy.upstream.received == []


@pytest_twisted.ensureDeferred
async def test_replay_misses_and_bad_input_get_anthropic_shaped_errors(start_proxy, http):
    proxy = await start_proxy(GREYFOX_MODE="replay")
    with pytest.raises(anthropic.NotFoundError) as caught:
        await in_thread(create, sdk(proxy))
    message = caught.value.body["error"]["message"]
    assert caught.value.body["error"]["type"] == "not_found_error"
    key = cache_key("anthropic", "/messages", {k: v for k, v in MESSAGE.items()})
    assert message.startswith("cache_miss: ") and key in message
    url = proxy.url + "/v1/messages"
    response = await http.post(url, data=b"{oops", headers={b"content-type": [b"application/json"]})
    body = json.loads(await response.content())
    assert response.code == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert proxy.upstream.received == []


@pytest_twisted.ensureDeferred
async def test_a_client_token_may_come_as_x_api_key(start_proxy, http):
    proxy = await start_proxy(GREYFOX_CLIENT_TOKEN="gf-token")
    headers, _ = await in_thread(create, sdk(proxy, api_key="gf-token"))  # (as a bearer token)
    response, _ = await post_json(http, proxy.url + "/v1/messages", dict(MESSAGE, max_tokens=9), {"x-api-key": "gf-token"})
    assert response.code == 200
    assert [r.header("x-api-key") for r in proxy.upstream.received] == [ANTHROPIC_KEY, ANTHROPIC_KEY]
    assert all(r.header("authorization") is None for r in proxy.upstream.received)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await in_thread(create, sdk(proxy, api_key="wrong"))
    assert caught.value.body["error"]["type"] == "authentication_error"


@pytest_twisted.ensureDeferred
async def test_count_tokens_is_relayed_and_costs_nothing(start_proxy, http):
    proxy = await start_proxy(GREYFOX_DAILY_TOKENS="10")  # would refuse a message of this size
    client = sdk(proxy)
    body = {k: MESSAGE[k] for k in ("model", "system", "messages")}
    counted = await in_thread(lambda: client.messages.count_tokens(**body))
    assert counted.input_tokens == fakeupstream.COUNT_TOKENS
    [row] = await rows(http, proxy)
    assert row["endpoint"] == "/v1/messages/count_tokens" and row["total_tokens"] == 0


async def hang_up_after(proxy: Any, events: int) -> None:
    port = proxy.service.port.getHost().port
    body = json.dumps(dict(MESSAGE, metadata=WORDS, stream=True)).encode()
    client = RawClient(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await eventually(lambda: client.received.count(b"event: content_block_delta") >= events)
    client.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_a_client_that_hangs_up_mid_stream_is_billed_for_what_was_produced(start_proxy, http):
    proxy = await start_proxy()
    await hang_up_after(proxy, 3)
    assert await proxy.upstream.lost[0] is True  # the upstream call was cancelled
    await eventually(lambda: proxy.service.ledger.written >= 1)  # (after the tokenizers load, for the count)
    [row] = await rows(http, proxy)
    assert row["error"] == "client disconnected" and row["status"] == 499 and row["usage_source"] == "estimated"
    assert row["prompt_tokens"] == PROMPT  # from message_start
    assert 3 <= row["completion_tokens"] < len(fakeupstream.WORD_PIECES)
    assert row["cost_usd"] > 0


@pytest_twisted.ensureDeferred
async def test_a_stream_past_the_daily_limit_is_cut_off_with_an_anthropic_error_event(start_proxy, http):
    proxy = await start_proxy(GREYFOX_DAILY_TOKENS="30", GREYFOX_DEFAULT_MAX_TOKENS="1")
    await proxy.service.encodings.load()
    response, body = await post_json(http, proxy.url + "/v1/messages",
                                     dict(MESSAGE, metadata=WORDS, stream=True, max_tokens=1))
    events = body.split(b"\n\n")
    last = [e for e in events if e][-1]
    assert last.startswith(b"event: error\ndata: ")
    error = json.loads(last.split(b"data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    assert error["error"]["message"].startswith("daily_token_limit: ")
    assert b"message_stop" not in body
    [row] = await rows(http, proxy)
    assert row["error"] == "cut_off: daily_token_limit"


@pytest_twisted.ensureDeferred
async def test_identical_streams_in_flight_are_coalesced_into_one_upstream_call(start_proxy, http):
    proxy = await start_proxy()
    proxy.upstream.delay = 0.2
    url = proxy.url + "/v1/messages"
    body = dict(MESSAGE, stream=True)
    answers = await DeferredList([Deferred.fromCoroutine(post_json(http, url, body, {"anthropic-beta": "prompt-caching-2024-07-31"}))
                                  for _ in range(5)])
    assert [b for _, (r, b) in answers] == [b"".join(fakeupstream.anthropic_events(MODEL))] * 5
    assert sorted(r.headers.getRawHeaders(b"x-greyfox-cache")[0] for _, (r, _) in answers) == [b"HIT"] * 4 + [b"MISS"]
    [sent] = proxy.upstream.received
    assert sent.header("anthropic-beta") == "prompt-caching-2024-07-31"  # the client's, passed on


def test_the_loop_breaker_sees_the_system_prompt_and_first_user_message():
    base = conversation_fingerprint(MODEL, MESSAGE)
    longer = dict(MESSAGE, messages=MESSAGE["messages"] + [{"role": "assistant", "content": "Hi"},
                                                          {"role": "user", "content": "Again"}])
    assert conversation_fingerprint(MODEL, longer) == base  # a loop growing the same conversation
    assert conversation_fingerprint(MODEL, dict(MESSAGE, system="You are verbose.")) != base
