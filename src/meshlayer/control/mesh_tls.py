"""TLS for the control plane's mesh listener: its own certificate, the trust bundle.

Theory of operation
-------------------
The mesh listener speaks TLS 1.3 only and requires a client certificate that
verifies against the CA's current trust bundle. Its own certificate is a leaf
from the CA (``spiffe://<td>/ns/meshlayer/sa/control``) for a key made in this
process. Both change over time (rotation, expiry), but a listening socket
keeps the context it was started with, so the listening context only has an
SNI callback that hands every new handshake the *current* context
(``SSLObject.context = ...``); established connections are not touched.
:meth:`MeshTLS.maybe_rebuild` makes a new current context when the CA state
changed or the certificate is half way through its life.
"""

from __future__ import annotations

import logging
import ssl
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshlayer.control.ca import (
    CONTROL_NAMESPACE,
    CONTROL_SERVICE,
    CAState,
    CertificateAuthority,
    pem,
    spiffe_id,
)
from meshlayer.memtls import load_chain

log = logging.getLogger("meshlayer.control.tls")


def server_context(cert_pem: bytes, key_pem: bytes, roots: list[str]) -> ssl.SSLContext:
    """TLS 1.3 server context requiring a client certificate from ``roots``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata="\n".join(roots))
    load_chain(ctx, cert_pem, key_pem)
    return ctx


class MeshTLS:
    """The mesh listener's contexts, kept current with the CA."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.identity = spiffe_id(ca.trust_domain, CONTROL_SERVICE, CONTROL_NAMESPACE)
        self._current: ssl.SSLContext | None = None
        self.client: ssl.SSLContext | None = None
        """Client context with the same certificate (health probes of meshed sidecars)."""
        self._built_from: CAState | None = None
        self._renew_at = 0.0
        self.listening = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def rebuild(self) -> None:
        """A new certificate and context from the CA's current state."""
        state = self.ca.state
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self.ca.issue(key.public_key(), self.identity)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        ctx = server_context(pem(issued.cert).encode(), key_pem, state.bundle_pem())
        now = time.time()
        self._renew_at = now + (issued.expires - now) / 2
        self._current = ctx
        self._built_from = state
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.minimum_version = ssl.TLSVersion.TLSv1_3
        client.check_hostname = False  # the caller checks the SPIFFE ID
        client.load_verify_locations(cadata="\n".join(state.bundle_pem()))
        load_chain(client, pem(issued.cert).encode(), key_pem)
        self.client = client
        if self.listening.sni_callback is None:  # first build: the listening context
            self.listening = server_context(pem(issued.cert).encode(), key_pem, state.bundle_pem())
            self.listening.sni_callback = self._pick
        log.info(
            "mesh listener certificate %s from root %s.., valid %ds; bundle of %d roots",
            self.identity,
            issued.issuer[:12],
            int(issued.expires - now),
            len(state.roots),
        )

    def maybe_rebuild(self) -> bool:
        """Rebuild if the CA changed or the certificate is half used; whether it did."""
        state = self.ca.state
        if (
            self._built_from is None
            or state.raw != self._built_from.raw
            or time.time() >= self._renew_at
        ):
            self.rebuild()
            return True
        return False

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        if self._current is not None:
            sslobj.context = self._current
