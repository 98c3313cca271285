"""GreyFox's own work per request, in one process with no sockets: the steadiest figure there is.

A client connection and a pooled upstream connection run on
``StringTransport``s; each request is fed to the server protocol, the
upstream's canned answer to the upstream connection, and the response is
read back.  What remains is GreyFox's Python (parsing, admission, cache key,
relay, ledger row, cache entry), with no kernel, no reactor loop and no
other process.

* ``relay``: every request body is unique, so each is a cache miss that is
  relayed, metered and stored (a body repeated between repetitions would be
  a hit: an early version of this harness did that, and misled);
* ``hit``: the same request again and again, answered from memory.

Timings on a shared machine drift; the instruction count does not.  Under
valgrind it gives the same figure run after run, so two versions can be
compared without ABBA turns::

    python bench/inprocess.py relay 2000              # microseconds a request
    valgrind --tool=cachegrind --cache-sim=no python bench/inprocess.py relay 200
    valgrind --tool=cachegrind --cache-sim=no python bench/inprocess.py relay 1200
    # instructions a request: (second total - first total) / 1000

The tokenizers are loaded (as with a token limit set) and the collector set
as the service sets it; the database and its thread are not exercised (rows
are queued, batches never written).
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # greyfox, and bench/upstream.py

from twisted.internet import reactor  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from greyfox._config import load_settings  # noqa: E402
from greyfox._tokens import load_encodings  # noqa: E402
from greyfox._upstream import _Connection  # noqa: E402
from greyfox.service import GreyFoxService  # noqa: E402
from upstream import JSON_RESPONSE as RESPONSE  # noqa: E402  (the benchmark upstream's own answer)

UPSTREAM = ("127.0.0.1", 9)  # never connected to: the pooled connection is a StringTransport


def request(n: int) -> bytes:
    body = b'{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"bench %d"}]}' % n
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-App-User-Id: bench\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class Harness:
    """One service, one client connection, one pooled upstream connection."""

    def __init__(self) -> None:
        workdir = tempfile.mkdtemp()
        settings = load_settings(
            {"listen": "tcp:0:interface=127.0.0.1", "db": os.path.join(workdir, "g.db")},
            {"OPENAI_BASE_URL": "http://%s:%d/v1" % UPSTREAM, "OPENAI_API_KEY": "sk-bench",
             "GREYFOX_DAILY_TOKENS": "100000000000"},
        )
        self.service = GreyFoxService(settings, reactor)
        self.service.encodings._loaded = load_encodings(os.path.join(workdir, "tiktoken"))
        origin = (b"http", UPSTREAM[0].encode(), UPSTREAM[1])
        self.upstream_transport = StringTransport()
        self.upstream = _Connection(self.service.http, origin)
        self.upstream.makeConnection(self.upstream_transport)
        self.upstream.idle_since = reactor.seconds()
        self.service.http._idle[origin] = [self.upstream]
        self.client_transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        self.client = self.service.server.buildProtocol(None)
        self.client.makeConnection(self.client_transport)
        self.next = 0

    def relay(self) -> None:
        """One cache miss, relayed."""
        self.next += 1
        self.client.dataReceived(request(self.next))
        self.upstream.dataReceived(RESPONSE)
        reactor._insertNewDelayedCalls()  # (timers made and cancelled: as the reactor would tidy them)

    def hit(self) -> None:
        """The first request again: answered from the cache."""
        self.client.dataReceived(request(0))

    def response(self) -> bytes:
        out = self.client_transport.value()
        self.client_transport.clear()
        self.upstream_transport.clear()
        return out


def main() -> int:
    kind = sys.argv[1] if len(sys.argv) > 1 else "relay"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    h = Harness()
    h.client.dataReceived(request(0))  # the first one stores the answer the hits use
    h.upstream.dataReceived(RESPONSE)
    first = h.response()
    assert b" 200 " in first.split(b"\r\n", 1)[0], first[:300]
    # As the running service has it: start-up objects frozen, no automatic full passes.
    gc.collect()
    gc.freeze()
    gc.set_threshold(gc.get_threshold()[0], gc.get_threshold()[1], 1 << 30)
    step = h.relay if kind == "relay" else h.hit
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(n):
            step()
            if i % 500 == 0:
                h.response()
        best = min(best, (time.perf_counter() - t0) / n)
    last = h.response()
    assert (b"X-GreyFox-Cache: MISS" if kind == "relay" else b"X-GreyFox-Cache: HIT") in last, last[-400:]
    assert last.count(b"HTTP/1.1 200 ") == last.count(b"HTTP/1.1 ") > 0, last[-400:]  # every one answered
    print(f"{kind}: {best * 1e6:.1f} µs a request (best of {reps} x {n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
