"""The treq client GreyFox calls upstreams with: TLS checked, nothing carried between requests."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site
from treq import content

from greyfox._upstream import UpstreamClient


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


class Models(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"tls":true}'


@pytest_twisted.ensureDeferred
async def test_https_upstreams_are_verified() -> None:
    """HTTPS works on a plain install, and a certificate the trust store does not vouch for is refused."""
    from twisted.internet.ssl import Certificate, PrivateCertificate

    ca_pem, server_pem = make_ca_and_server_cert("localhost")
    port = reactor.listenSSL(0, Site(Models()), PrivateCertificate.loadPEM(server_pem).options(), interface="127.0.0.1")
    url = b"https://localhost:%d/v1/models" % port.getHost().port
    trusting = UpstreamClient(reactor, 2, trust_root=Certificate.loadPEM(ca_pem))
    platform = UpstreamClient(reactor, 2)
    try:
        response = await trusting.request("GET", url, Headers(), None)
        assert response.code == 200 and await content(response) == b'{"tls":true}'
        with pytest.raises(ResponseNeverReceived) as refused:
            await platform.request("GET", url, Headers(), None)
        assert "certificate verify failed" in str(refused.value.reasons[0].value)
    finally:
        await trusting.close()
        await platform.close()
        await port.stopListening()


@pytest.mark.parametrize("raised, logged", [("decoder", 0), ("bug", 1)])
def test_a_body_protocol_that_raises_fails_the_body(observe_errors, raised, logged):
    """treq's gzip decoder raises ResponseFailed on a bad body (the upstream's
    fault, quiet); anything else raised there is a relay bug, logged."""
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseDone, ResponseFailed

    from greyfox._upstream import _Guard

    ends: list[Failure] = []

    class Body(Protocol):
        def dataReceived(self, data: bytes) -> None:
            raise ResponseFailed([Failure(ValueError("not gzip"))]) if raised == "decoder" else KeyError("bug")

        def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
            ends.append(reason)

    transport = StringTransport()
    guard = _Guard(Body())
    guard.makeConnection(transport)
    guard.dataReceived(b"x")
    guard.connectionLost(Failure(ResponseDone()))
    [end] = ends
    assert end.check(ResponseFailed) and transport.producerState == "stopped"
    assert len(observe_errors) == logged
    observe_errors.clear()
