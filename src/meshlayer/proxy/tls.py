"""The data plane's TLS: contexts, the material they hold, and peer verification.

Theory of operation. ``MeshTls`` holds the sidecar's current TLS material —
its certificate and key (from :mod:`meshlayer.proxy.identity`), the trust
bundle and trust domain (from the control plane's snapshots), the mesh's mTLS
mode — and builds one server and one client ``SSLContext`` from it each time
any of it changes. Every new handshake asks for the contexts in force at that
moment, so a renewal or a trust-anchor rotation applies to new connections at
once while established ones keep the context they started with (hot swap
without dropping anything). When the sidecar has no valid certificate
(``clear``: it expired before a renewal succeeded) there are no contexts:
inbound handshakes are refused and outbound connections to meshed endpoints
fail with :class:`NoIdentity` — the sidecar fails closed, never to plaintext.
Connections established before that carry no further exchange either
(:meth:`MeshTls.usable`): the pool closes a meshed connection instead of
reusing it, the inbound side closes one after its current exchange.

Both contexts are TLS 1.3 only and require the peer's certificate, checked by
OpenSSL against the trust bundle (chain, validity period). OpenSSL accepts a
CA certificate as a leaf and knows nothing of SPIFFE, so after the handshake
and before a byte of application data is read, :func:`verify_peer` parses the
peer's certificate (``cryptography``) and requires: not a CA, exactly one URI
SAN, a well-formed SPIFFE ID of our trust domain, and — outbound — exactly the
identity the registry gave the endpoint.

The key never touches a disk: ``SSLContext.load_cert_chain`` only reads
paths, so the PEM is handed over through an anonymous in-memory file
(``memfd_create``) that is closed as soon as it is loaded.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from meshlayer.memtls import load_chain

log = logging.getLogger("meshlayer.tls")

SPIFFE_RE = re.compile(r"^spiffe://([a-z0-9._-]+)/ns/([a-z0-9]([-a-z0-9]*[a-z0-9])?)/sa/(.+)$")
_SA_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
CONTROL_NAMESPACE = "meshlayer"
CONTROL_SERVICE = "control"


class PeerRejected(ConnectionError):
    """The peer completed a handshake but its certificate is not acceptable."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoIdentity(ConnectionError):
    """The sidecar has no valid certificate: meshed connections are refused."""

    reason = "no-identity"


def spiffe_id(trust_domain: str, service: str, namespace: str = "default") -> str:
    """``spiffe://<trust-domain>/ns/<namespace>/sa/<service>``."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service}"


def control_id(trust_domain: str) -> str:
    """The SPIFFE ID the control plane's mesh listener presents."""
    return spiffe_id(trust_domain, CONTROL_SERVICE, CONTROL_NAMESPACE)


def verify_peer(der: bytes | None, trust_domain: str, expected: str | None = None) -> str:
    """The peer's SPIFFE ID, after checking what OpenSSL does not.

    Raises:
        PeerRejected: no certificate, a CA certificate, not exactly one URI SAN,
            a malformed ID, another trust domain, or not ``expected``.
    """
    from cryptography import x509  # imported when a peer is checked, not at start
    from cryptography.x509.oid import ExtensionOID

    if not der:
        raise PeerRejected("no-certificate", "peer presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise PeerRejected("bad-certificate", f"cannot parse peer certificate: {exc}") from None
    try:
        bc = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
        if isinstance(bc, x509.BasicConstraints) and bc.ca:
            raise PeerRejected("ca-as-leaf", "peer certificate is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise PeerRejected("no-spiffe-id", f"peer certificate has {len(uris)} URI SANs, not 1")
    peer = str(uris[0])
    m = SPIFFE_RE.match(peer)
    if m is None or not _SA_RE.match(m.group(4)):
        raise PeerRejected("bad-spiffe-id", f"peer ID {peer!r} is not a SPIFFE workload ID")
    if m.group(1) != trust_domain:
        raise PeerRejected(
            "wrong-trust-domain", f"peer ID {peer!r} is not in trust domain {trust_domain!r}"
        )
    if expected is not None and peer != expected:
        raise PeerRejected("wrong-identity", f"peer is {peer!r}, expected {expected!r}")
    return peer


def peer_der(transport: Any) -> bytes | None:
    """The peer certificate (DER) of a TLS transport, None if there is none."""
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return None
    der: bytes | None = sslobj.getpeercert(binary_form=True)
    return der


def _base(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes, roots: list[str]) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata="\n".join(roots))
    load_chain(ctx, cert_pem, key_pem)


def server_context(cert_pem: bytes, key_pem: bytes, roots: list[str]) -> ssl.SSLContext:
    """Inbound: TLS 1.3 only, a client certificate from ``roots`` required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _base(ctx, cert_pem, key_pem, roots)
    ctx.options |= ssl.OP_NO_TICKET  # no resumption: every connection shows its certificate
    return ctx


def client_context(cert_pem: bytes, key_pem: bytes, roots: list[str]) -> ssl.SSLContext:
    """Outbound: TLS 1.3 only, our certificate, the server's from ``roots`` required.
    Names are checked as SPIFFE IDs after the handshake, not as host names."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    _base(ctx, cert_pem, key_pem, roots)
    return ctx


class TlsMetrics:
    """``meshlayer_tls_handshakes_total``, ``meshlayer_tls_handshake_failures_total``,
    ``meshlayer_cert_expiry_seconds``."""

    def __init__(self, registry: CollectorRegistry, expiry: Any) -> None:
        self.handshakes = Counter(
            "meshlayer_tls_handshakes",
            "mTLS handshakes completed with an accepted peer, by side (server: inbound)",
            ["side"],
            registry=registry,
        )
        self.failures = Counter(
            "meshlayer_tls_handshake_failures",
            "TLS handshakes that failed or whose peer was rejected, by side and reason",
            ["side", "reason"],
            registry=registry,
        )
        self.expiry = Gauge(
            "meshlayer_cert_expiry_seconds",
            "Seconds until the sidecar's certificate expires (negative: expired or none)",
            registry=registry,
        )
        self.expiry.set_function(expiry)


@dataclass(frozen=True)
class Material:
    """One consistent set of TLS material and the contexts built from it."""

    identity: str
    """Our SPIFFE ID."""
    not_after: float
    """Our certificate's end of validity (unix seconds)."""
    server: ssl.SSLContext
    client: ssl.SSLContext


class MeshTls:
    """The sidecar's TLS material in force; contexts are rebuilt on every change."""

    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        self.service = service
        self.trust_domain = ""
        self.roots: list[str] = []
        self.mode = "strict"
        """``strict`` or ``permissive`` (``kind: Mesh`` ``spec.mtls.mode``)."""
        self.current: Material | None = None
        self._cert: tuple[bytes, bytes, float] | None = None
        self.on_clear: Callable[[], None] | None = None
        """Called when the material is dropped (the sidecar closes meshed connections)."""
        self.metrics = TlsMetrics(registry, self.seconds_left)

    def seconds_left(self) -> float:
        cur = self.current
        return cur.not_after - time.time() if cur is not None else -1.0

    def usable(self) -> bool:
        """A certificate in force and not expired: meshed connections may carry
        traffic. False: every meshed connection closes after its current exchange."""
        cur = self.current
        return cur is not None and cur.not_after > time.time()

    # -- changes ---------------------------------------------------------------

    def set_certificate(
        self, cert_pem: bytes, key_pem: bytes, not_after: float, roots: list[str], domain: str
    ) -> None:
        """A new certificate (and the bundle the control plane sent with it)."""
        self._cert = (cert_pem, key_pem, not_after)
        self.trust_domain = domain
        if roots:
            self.roots = list(roots)
        self._rebuild()

    def set_trust(self, roots: list[str], domain: str) -> None:
        """A new trust bundle from a snapshot; rebuilt only when it changed."""
        if roots == self.roots and domain == self.trust_domain:
            return
        self.roots = list(roots)
        self.trust_domain = domain or self.trust_domain
        self._rebuild()

    def clear(self) -> None:
        """The certificate expired: no contexts any more (fail closed)."""
        self._cert = None
        self.current = None
        if self.on_clear is not None:
            self.on_clear()

    def _rebuild(self) -> None:
        if self._cert is None or not self.roots:
            return
        cert_pem, key_pem, not_after = self._cert
        try:
            server = server_context(cert_pem, key_pem, self.roots)
            client = client_context(cert_pem, key_pem, self.roots)
        except (ssl.SSLError, ValueError) as exc:
            log.error("cannot build TLS contexts (keeping the previous ones): %s", exc)
            return
        self.current = Material(
            spiffe_id(self.trust_domain, self.service), not_after, server, client
        )

    # -- handshakes ------------------------------------------------------------

    def server_ssl(self) -> ssl.SSLContext | None:
        cur = self.current
        if cur is None or cur.not_after <= time.time():
            return None
        return cur.server

    def client_ssl(self) -> ssl.SSLContext:
        """The client context for a new outbound connection. Raises NoIdentity."""
        cur = self.current
        if cur is None or cur.not_after <= time.time():
            self.metrics.failures.labels("client", "no-identity").inc()
            raise NoIdentity("this sidecar has no valid certificate (fails closed)")
        return cur.client

    def expected_server(self, identity: str, service: str) -> str:
        """The SPIFFE ID an endpoint must present: the registry's, else its service's."""
        return identity or spiffe_id(self.trust_domain, service)

    def check_server(self, transport: Any, expected: str) -> str:
        """Verify an outbound peer after the handshake. Raises PeerRejected."""
        try:
            peer = verify_peer(peer_der(transport), self.trust_domain, expected)
        except PeerRejected as exc:
            self.metrics.failures.labels("client", exc.reason).inc()
            log.warning("outbound TLS peer rejected: %s", exc)
            raise
        self.metrics.handshakes.labels("client").inc()
        return peer

    def check_client(self, transport: Any) -> str:
        """Verify an inbound peer after the handshake. Raises PeerRejected."""
        try:
            peer = verify_peer(peer_der(transport), self.trust_domain)
        except PeerRejected as exc:
            self.metrics.failures.labels("server", exc.reason).inc()
            log.info("inbound TLS peer rejected: %s", exc)
            raise
        self.metrics.handshakes.labels("server").inc()
        return peer

    def handshake_failed(self, side: str, exc: BaseException) -> None:
        reason = _reason(exc)
        self.metrics.failures.labels(side, reason).inc()
        log.info("%s TLS handshake failed (%s): %s", side, reason, exc)


def _reason(exc: BaseException) -> str:
    """A short, bounded label for a handshake failure."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = (exc.verify_message or "").lower()
        if "expired" in msg:
            return "expired"
        if "not yet valid" in msg:
            return "not-yet-valid"
        if "issuer" in msg or "self-signed" in msg or "self signed" in msg:
            return "unknown-ca"
        return "verify-failed"
    if isinstance(exc, ssl.SSLError):
        text = str(exc).lower()
        if "peer did not return a certificate" in text or "certificate required" in text:
            return "no-certificate"
        if "wrong version" in text or "http request" in text:
            return "not-tls"
        if "unknown ca" in text or "unknown_ca" in text:
            return "unknown-ca"
        return "tls-error"
    return "connection-error"
