"""Routing and header rules, without a reactor."""

from greyfox._config import Upstream
from greyfox._routing import forwarded_fields, resolve, returned_fields, upstream_authorization, upstream_url
from greyfox._routing import Route, as_fields

UPSTREAMS = {
    "openai": Upstream("openai", "https://api.openai.com/v1", "sk-o"),
    "deepseek": Upstream("deepseek", "https://api.deepseek.com/v1", "sk-d"),
    "openrouter": Upstream("openrouter", "https://openrouter.ai/api/v1"),
    "anthropic": Upstream("anthropic", "https://api.anthropic.com", "sk-ant", api="anthropic"),
    "custom": Upstream("custom", "https://claude.example", api="anthropic"),
}


def test_prefix_picks_the_upstream_and_is_removed():
    r = resolve("deepseek/deepseek-chat", UPSTREAMS, "openai")
    assert (r.upstream.name, r.model, r.prefixed) == ("deepseek", "deepseek-chat", True)
    r = resolve("openrouter/anthropic/claude-sonnet-4", UPSTREAMS, "openai")
    assert (r.upstream.name, r.model) == ("openrouter", "anthropic/claude-sonnet-4")


def test_unknown_prefix_and_plain_names_go_to_the_default():
    assert resolve("anthropic/claude", UPSTREAMS, "openrouter").model == "anthropic/claude"
    assert resolve("anthropic/claude", UPSTREAMS, "openrouter").upstream.name == "openrouter"
    assert resolve("gpt-4o", UPSTREAMS, "openai").upstream.name == "openai"
    assert resolve(None, UPSTREAMS, "openai").model is None
    assert resolve("deepseek/", UPSTREAMS, "openai").upstream.name == "openai"


def test_hop_by_hop_credentials_and_connection_named_headers_are_not_forwarded():
    out = dict(
        forwarded_fields(as_fields(
            [
                (b"Connection", [b"keep-alive, X-Secret-Hop"]),
                (b"X-Secret-Hop", [b"1"]),
                (b"Authorization", [b"Bearer client"]),
                (b"Cookie", [b"a=b"]),
                (b"Host", [b"localhost:8080"]),
                (b"Content-Length", [b"12"]),
                (b"Transfer-Encoding", [b"chunked"]),
                (b"Accept-Encoding", [b"br"]),
                (b"X-GreyFox-Cache", [b"bypass"]),
                (b"X-App-User-Id", [b"alice"]),
                (b"OpenAI-Organization", [b"org-1"]),
                (b"Content-Type", [b"application/json"]),
            ]
        ))
    )
    assert out == {b"OpenAI-Organization": [b"org-1"], b"Content-Type": [b"application/json"]}


def test_response_headers_drop_framing_and_cookies():
    out = dict(
        returned_fields(as_fields(
            [
                (b"Content-Length", [b"5"]),
                (b"Content-Encoding", [b"gzip"]),
                (b"Set-Cookie", [b"x=y"]),
                (b"x-request-id", [b"req_1"]),
                (b"openai-processing-ms", [b"12"]),
            ]
        ))
    )
    assert out == {b"x-request-id": [b"req_1"], b"openai-processing-ms": [b"12"]}


def test_authorization_rules():
    client = (b"Authorization", b"Bearer c")
    assert upstream_authorization(UPSTREAMS["openai"], client, False) == (b"Authorization", b"Bearer sk-o")
    assert upstream_authorization(UPSTREAMS["openrouter"], client, False) == client
    assert upstream_authorization(UPSTREAMS["openrouter"], (b"Authorization", b"Bearer gf"), True) is None
    assert upstream_authorization(UPSTREAMS["anthropic"], client, False) == (b"x-api-key", b"sk-ant")
    assert upstream_authorization(UPSTREAMS["custom"], (b"x-api-key", b"c"), False) == (b"x-api-key", b"c")


def test_a_prefix_routes_only_to_an_upstream_of_the_requests_api():
    assert resolve("custom/claude-x", UPSTREAMS, "anthropic", "anthropic") == Route(UPSTREAMS["custom"], "claude-x", True)
    assert resolve("claude-x", UPSTREAMS, "anthropic", "anthropic") == Route(UPSTREAMS["anthropic"], "claude-x")
    # an OpenRouter model name keeps its slash on chat completions, though "anthropic" is an upstream
    assert resolve("anthropic/claude-sonnet-4", UPSTREAMS, "openrouter") == Route(UPSTREAMS["openrouter"], "anthropic/claude-sonnet-4")
    assert resolve("deepseek/deepseek-chat", UPSTREAMS, "anthropic", "anthropic").upstream.name == "anthropic"


def test_an_anthropic_base_url_has_no_v1():
    assert upstream_url(UPSTREAMS["anthropic"], b"/messages") == b"https://api.anthropic.com/v1/messages"


def test_url_joins_base_path_and_query():
    assert upstream_url(UPSTREAMS["openrouter"], b"/chat/completions") == b"https://openrouter.ai/api/v1/chat/completions"
    assert upstream_url(UPSTREAMS["openai"], b"/models", b"limit=2") == b"https://api.openai.com/v1/models?limit=2"
