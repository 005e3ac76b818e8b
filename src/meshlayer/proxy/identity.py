"""The sidecar's identity client: key, CSR, certificate, renewal, failing closed.

Theory of operation (see ``docs/security.md``):

* **Bootstrap.** The sidecar reads the trust domain (``GET /v1/ca`` on the
  API listener), generates an ECDSA P-256 key in memory, and sends a CSR for
  ``spiffe://<td>/ns/default/sa/<service>`` to ``POST /v1/certificates`` with
  its join token (``Authorization: Bearer``). The answer carries the
  certificate, the trust bundle and the address of the control plane's
  **mesh listener**, which the sidecar uses for everything after that, over
  mTLS with the new certificate.
* **Renewal** runs at 70% of the lifetime ± 10% (jitter spreads a fleet's
  renewals), over the mesh listener, authenticated by the current
  certificate, with a fresh key each time. It also runs at once when a
  snapshot's ``trust.generation`` rises (a new signing root). A failed
  renewal is retried with backoff until the certificate expires.
* **Failing closed.** When the certificate expires with no renewal, the TLS
  material is dropped (:meth:`MeshTls.clear`): inbound handshakes fail and
  outbound requests to meshed endpoints get 503 ``no-identity``. The sidecar
  keeps trying — over the API listener with the join token, since an expired
  certificate no longer opens the mesh listener — and recovers when it gets
  a certificate again.

The private key is never written to disk and never sent anywhere; only the
CSR (public key and ID) leaves the process.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshlayer.proxy.control_http import ControlUnreachable, TlsTarget, request
from meshlayer.proxy.tls import MeshTls, control_id, spiffe_id

log = logging.getLogger("meshlayer.identity")

RENEW_AT = 0.7
"""Renew at this fraction of the lifetime ..."""
JITTER = 0.1
"""... plus or minus this fraction."""


@dataclass(frozen=True)
class Certificate:
    """The certificate in force and what is reported about it."""

    pem: bytes
    not_before: float
    not_after: float
    issuer: str
    """SHA-256 fingerprint (hex) of the root that signed it ("" if not in the bundle)."""


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, lower-case hex (as ``GET /v1/ca`` lists roots)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def issuer_fingerprint(leaf: x509.Certificate, roots: list[str]) -> str:
    """The fingerprint of the root among ``roots`` that signed ``leaf``; "" if none."""
    for pem in roots:
        try:
            root = x509.load_pem_x509_certificate(pem.encode())
            if root.subject == leaf.issuer:
                leaf.verify_directly_issued_by(root)
                return fingerprint(root)
        except (ValueError, TypeError, InvalidSignature):  # not this one
            continue
    return ""


def make_csr(service: str, trust_domain: str) -> tuple[bytes, bytes]:
    """A new P-256 key (PEM, PKCS#8) and a CSR (PEM) for the service's SPIFFE ID."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id(trust_domain, service))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def renew_delay(not_before: float, not_after: float, now: float) -> float:
    """Seconds from ``now`` until renewal: 70% of the lifetime ± 10%, jittered."""
    life = max(0.0, not_after - not_before)
    at = not_before + life * (RENEW_AT + JITTER * (2 * random.random() - 1))
    return max(0.0, at - now)


def _parse_addr(value: object) -> tuple[str, int] | None:
    if not isinstance(value, str) or ":" not in value:
        return None
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    return (host, int(port)) if port.isdigit() else None


class IdentityClient:
    """Obtains and renews the sidecar's certificate; feeds :class:`MeshTls`."""

    def __init__(
        self,
        service: str,
        token: str,
        tls: MeshTls,
        request_timeout: float = 5.0,
    ) -> None:
        self.service = service
        self.token = token
        self.tls = tls
        self.request_timeout = request_timeout
        self.cert: Certificate | None = None
        self.mesh: tuple[str, int] | None = None
        """The control plane's mesh listener (from the certificate answer)."""
        self.generation = -1
        """Highest ``trust.generation`` seen."""
        self.renewals = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self.api: tuple[str, int] | None = None
        self.on_change: Callable[[], None] | None = None
        """Called after each new certificate (the control client reports it)."""

    # -- what the control client uses ------------------------------------------

    @property
    def valid(self) -> bool:
        return self.cert is not None and self.cert.not_after > time.time()

    def control_tls(self) -> TlsTarget:
        """How to reach the mesh listener. Raises ControlUnreachable without a cert."""
        ctx = self.tls.current
        if not self.valid or ctx is None or self.mesh is None:
            raise ControlUnreachable("no valid certificate for the mesh listener")
        return TlsTarget(ctx.client, self.tls.trust_domain, control_id(self.tls.trust_domain))

    def status(self) -> dict[str, Any] | None:
        """``cert`` in the status acks: issuer fingerprint and notAfter (unix)."""
        c = self.cert
        if c is None:
            return None
        return {"issuer": c.issuer, "notAfter": int(c.not_after)}

    def view(self) -> dict[str, Any]:
        c = self.cert
        return {
            "identity": spiffe_id(self.tls.trust_domain, self.service) if c else None,
            "notAfter": int(c.not_after) if c else None,
            "issuer": c.issuer if c else None,
            "renewals": self.renewals,
            "generation": self.generation,
            "mesh": "{}:{}".format(*self.mesh) if self.mesh else None,
            "mode": self.tls.mode,
        }

    def on_snapshot(self, data: dict[str, Any]) -> None:
        """Take the snapshot's trust bundle; renew at once when the generation rose."""
        trust = data.get("trust")
        if not isinstance(trust, dict):
            return
        roots = trust.get("roots")
        domain = trust.get("domain")
        if isinstance(roots, list) and roots and all(isinstance(r, str) for r in roots):
            self.tls.set_trust(roots, domain if isinstance(domain, str) else "")
        gen = trust.get("generation")
        if isinstance(gen, int) and not isinstance(gen, bool):
            if self.generation >= 0 and gen > self.generation:
                log.info("trust generation %d -> %d: renewing now", self.generation, gen)
                self._wake.set()
            self.generation = max(self.generation, gen)

    # -- lifecycle -------------------------------------------------------------

    async def ensure(self, api: tuple[str, int]) -> None:
        """Have a valid certificate; bootstrap with the join token when there is none.
        Raises ControlUnreachable."""
        moved = self.api is not None and api != self.api
        self.api = api
        if self.valid:
            if moved:  # another control process (failover): find its mesh listener
                await self._locate(api)
            return
        async with self._lock:
            if not self.valid:
                await self._issue(api, None)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._renew_loop(), name="identity-renew"
            )

    async def _locate(self, api: tuple[str, int]) -> None:
        """Take the mesh listener a control process names in ``GET /v1/ca`` (``mesh``),
        when it names one; otherwise keep the one we have."""
        resp = await request(api, "GET", "/v1/ca", timeout=self.request_timeout)
        info = resp.json() if resp.status == 200 else None
        mesh = _parse_addr(info.get("mesh")) if isinstance(info, dict) else None
        if mesh is not None and mesh != self.mesh:
            log.info("control process %s:%d has its mesh listener at %s:%d", *api, *mesh)
            self.mesh = mesh

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass

    async def _renew_loop(self) -> None:
        backoff = 0.2
        while True:
            c = self.cert
            delay = renew_delay(c.not_before, c.not_after, time.time()) if c else backoff
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                async with self._lock:
                    if self.valid and self.mesh is not None:
                        await self._issue(self.mesh, self.control_tls())
                    elif self.api is not None:  # expired: only the join token is left
                        await self._issue(self.api, None)
                backoff = 0.2
            except ControlUnreachable as exc:
                left = self.cert.not_after - time.time() if self.cert else 0.0
                # before expiry: retry often enough to make it; after: no hurry
                backoff = min(5.0, backoff * 2, max(0.1, left / 4) if left > 0 else 5.0)
                log.warning(
                    "certificate renewal failed (%s); retrying in %.1fs, %.1fs before expiry",
                    exc,
                    backoff,
                    left,
                )
                self._wake.clear()
                await asyncio.sleep(backoff)
                self._wake.set()  # retry now, not at the next 70% mark
            except Exception:
                log.exception("certificate renewal failed")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _issue(self, addr: tuple[str, int], tls: TlsTarget | None) -> None:
        """One CSR round trip. ``tls`` None: the API listener with the join token."""
        headers: dict[str, str] = {}
        if tls is None:
            if not self.token:
                raise ControlUnreachable("no join token (--token) to obtain a certificate")
            headers["authorization"] = f"Bearer {self.token}"
        domain = self.tls.trust_domain
        if not domain:
            resp = await request(addr, "GET", "/v1/ca", timeout=self.request_timeout)
            info = resp.json()
            if resp.status != 200 or not isinstance(info, dict):
                raise ControlUnreachable(f"GET /v1/ca answered {resp.status}")
            domain = str(info.get("trustDomain") or "")
            if not domain:
                raise ControlUnreachable("GET /v1/ca named no trust domain")
        key_pem, csr_pem = make_csr(self.service, domain)
        resp = await request(
            addr,
            "POST",
            "/v1/certificates",
            {"csr": csr_pem.decode()},
            timeout=self.request_timeout,
            headers=headers,
            tls=tls,
        )
        answer = resp.json()
        if resp.status != 200 or not isinstance(answer, dict):
            msg = answer.get("message") if isinstance(answer, dict) else answer
            raise ControlUnreachable(f"certificate request answered {resp.status}: {msg}")
        self._install(answer, key_pem)

    def _install(self, answer: dict[str, Any], key_pem: bytes) -> None:
        try:
            leaf_pem = str(answer["certificate"]).encode()
            leaf = x509.load_pem_x509_certificate(leaf_pem)
            chain = [str(p) for p in answer.get("chain") or []]
            roots = [str(p) for p in answer.get("roots") or []]
            domain = str(answer.get("trustDomain") or self.tls.trust_domain)
        except (KeyError, ValueError, TypeError) as exc:
            raise ControlUnreachable(f"bad certificate answer: {exc}") from None
        not_before = leaf.not_valid_before_utc.timestamp()
        not_after = leaf.not_valid_after_utc.timestamp()
        full = b"".join(p.strip().encode() + b"\n" for p in [leaf_pem.decode(), *chain])
        mesh = _parse_addr(answer.get("mesh"))
        if mesh is not None:
            self.mesh = mesh
        self.tls.set_certificate(full, key_pem, not_after, roots, domain)
        issuer = issuer_fingerprint(leaf, self.tls.roots)
        first = self.cert is None
        self.cert = Certificate(leaf_pem, not_before, not_after, issuer)
        if not first:
            self.renewals += 1
        log.info(
            "%s certificate for %s, valid for %.0fs (issuer %s)",
            "got" if first else "renewed",
            spiffe_id(domain, self.service),
            not_after - time.time(),
            issuer[:16] or "unknown",
        )
        if self.on_change is not None:
            self.on_change()
        self._arm_expiry()

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        assert self.cert is not None
        left = max(0.0, self.cert.not_after - time.time()) + 0.005
        self._expiry = asyncio.get_running_loop().call_later(left, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        if self.cert is None:
            return
        if self.cert.not_after > time.time():  # the timer fired early: wait the rest
            self._arm_expiry()
            return
        log.error("certificate expired before renewal: failing closed (no mTLS, no plaintext)")
        self.tls.clear()
        self._wake.set()
