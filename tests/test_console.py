"""The console in a real browser: headless Chromium driven by Playwright.

The browser and the blocking HTTP calls of the scenario run in one thread;
the proxy and the fake upstream keep serving on the reactor meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from typing import Any

import pytest
import pytest_twisted

from .conftest import in_thread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None

if (CHROMIUM is None or sync_playwright is None) and os.environ.get("CI"):
    raise RuntimeError("CI must run the browser tests: install Debian's chromium and the test extra (.ci/run does)")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None or sync_playwright is None,
                                                      reason="needs Debian's chromium and playwright (pip install '.[test]')")]


def call(url: str, body: Any = None, method: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """A blocking HTTP call (this runs in the browser's thread, not the reactor's)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read() or b"null")


def chat(i: int) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Say hello #{i}"}]}


class Browser:
    def __init__(self) -> None:
        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        self.page = self.browser.new_page(viewport={"width": 1280, "height": 1400})
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: d.accept())

    def open(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_selector("body[data-loaded='1']", timeout=10_000)

    def close(self) -> None:
        self.browser.close()
        self._pw.stop()


@pytest_twisted.ensureDeferred
async def test_console_shows_the_api_totals_edits_quotas_and_clears_the_cache(start_proxy):
    proxy = await start_proxy()
    v1, url = proxy.v1, proxy.url

    def scenario() -> None:
        for i in range(3):
            assert call(v1 + "/chat/completions", chat(i), headers={"X-App-User-Id": "alice"})[0] == 200
        assert call(v1 + "/chat/completions", chat(0), headers={"X-App-User-Id": "bob"})[1]["x-greyfox-cache"] == "HIT"
        b = Browser()
        try:
            b.open(url + "/")
            _, _, usage = call(url + "/api/usage?group=day")
            total = sum(r["total_tokens"] for r in usage["rows"])
            assert total > 0
            assert b.page.inner_text("#t-tokens") == f"{total:,}"
            assert b.page.inner_text("#t-requests") == str(sum(r["requests"] for r in usage["rows"]))
            assert b.page.inner_text("#ov-tokens") == f"{total:,}"
            b.page.wait_for_selector("#live-table tbody tr[data-row]")
            assert b.page.locator("#live-table tbody tr[data-row]").count() == 4
            assert "25.0% hits" in b.page.inner_text("#ov-hitrate")
            os.makedirs(ARTIFACTS, exist_ok=True)
            b.page.screenshot(path=os.path.join(ARTIFACTS, "console.png"), full_page=True)

            # A row opens its details.
            b.page.locator("#live-table tbody tr[data-row]").first.click()
            assert '"usage_source"' in b.page.inner_text("#d-body")
            b.page.keyboard.press("Escape")

            # Limit alice to 1 token a day: her next request is refused.
            b.page.fill("#qa-user", "alice")
            b.page.fill("#qa-daily", "1")
            b.page.click("#quota-add button")
            b.page.wait_for_selector("#quota-table tr[data-user='alice'] input[name='daily_tokens'][value='1']")
            status, headers, body = call(v1 + "/chat/completions", chat(9), headers={"X-App-User-Id": "alice"})
            assert status == 429 and body["error"]["code"] == "daily_token_limit"
            assert call(v1 + "/chat/completions", chat(9), headers={"X-App-User-Id": "bob"})[0] == 200

            # Clearing the cache makes the next identical request a MISS.
            assert call(v1 + "/chat/completions", chat(1), headers={"X-App-User-Id": "bob"})[1]["x-greyfox-cache"] == "HIT"
            b.page.click("#cache-clear-all")
            b.page.wait_for_function("document.querySelector('#toast').textContent.includes('cleared')")
            assert call(v1 + "/chat/completions", chat(1), headers={"X-App-User-Id": "bob"})[1]["x-greyfox-cache"] == "MISS"

            # Live requests update without a reload.
            b.page.wait_for_function("document.querySelectorAll('#live-table tbody tr[data-row]').length >= 8", timeout=10_000)

            # A stream still running shows in flight, with its tokens so far.
            import socket

            body = json.dumps(dict(chat(5), model="stall-after-2", stream=True)).encode()
            with socket.create_connection(("127.0.0.1", proxy.service.port.getHost().port)) as conn:
                conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"X-App-User-Id: carol\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                conn.recv(65536)
                b.page.wait_for_function(
                    "[...document.querySelectorAll('#inflight-table tbody td')].some(td => td.textContent === 'stall-after-2')",
                    timeout=10_000)
                assert "carol" in b.page.inner_text("#inflight-table tbody")
            b.page.wait_for_function("!!document.querySelector('#inflight-table tbody .empty')", timeout=10_000)
            assert b.errors == []
        finally:
            b.close()

    await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_console_asks_for_the_admin_token(start_proxy):
    proxy = await start_proxy(GREYFOX_ADMIN_TOKEN="gf-admin-secret")
    url = proxy.url

    def scenario() -> None:
        b = Browser()
        try:
            b.page.goto(url + "/")
            b.page.wait_for_selector("#login[open]")
            b.page.fill("#login-token", "wrong-token")
            b.page.click("#login-submit")
            b.page.wait_for_function("document.querySelector('#login-error').textContent.includes('refused')")
            assert b.page.is_visible("#login")
            b.page.fill("#login-token", "gf-admin-secret")
            b.page.click("#login-submit")
            b.page.wait_for_selector("body[data-loaded='1']", timeout=10_000)
            assert "mode record" in b.page.inner_text("#status")
            assert not b.page.is_visible("#login")
            # The browser's own 401s are expected here; nothing else may fail.
            assert [e for e in b.errors if "401" not in e] == []
        finally:
            b.close()

    await in_thread(scenario)
