"""The mesh's certificate authority: roots in the store, leaf certificates from CSRs.

Theory of operation
-------------------
The CA's whole state is one store blob (``ca``), JSON holding every root
(certificate and key, PEM), which root signs, and a ``generation``. Each
change is a compare-and-set on that blob that also raises the mesh version,
so several control processes over one store share one CA, and the watch
streams push the new trust bundle at once. The first process to start
creates the root (or stores the one given with ``--ca-cert/--ca-key``);
the others lose the compare-and-set and load the winner's.

Rotation has three steps, each safe on its own, so no handshake fails:

1. ``add``: a new root joins the bundle; signing does not change yet. Every
   sidecar learns the new bundle from its watch stream.
2. ``switch``: once every live sidecar has applied a snapshot carrying the
   new bundle (refused before, unless forced), the new root signs and the
   ``generation`` rises; sidecars renew at once on a new generation. Leaves
   from either root verify against a bundle holding both.
3. ``retire``: roots other than the signing one leave the bundle; refused
   while a live sidecar still reports a certificate from one of them
   (unless forced).

The caller (the server) checks the preconditions; this module only changes
the state. A leaf is never valid beyond its issuing root.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlayer.control.store import Store, Unavailable

BLOB = "ca"
ROOT_LIFETIME = 10 * 365 * 86400.0
DEFAULT_CERT_TTL = 86400.0
NAMESPACE = "default"
CONTROL_NAMESPACE = "meshlayer"
CONTROL_SERVICE = "control"
_CAS_RETRIES = 8

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CAError(Exception):
    """A refused CA operation; ``status`` and ``reason`` become the HTTP answer."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def spiffe_id(trust_domain: str, service: str, namespace: str = NAMESPACE) -> str:
    """``spiffe://<trust-domain>/ns/<namespace>/sa/<service>``."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service}"


def parse_spiffe_id(uri: str) -> tuple[str, str, str] | None:
    """(trust domain, namespace, service) of a workload SPIFFE ID, or None."""
    if not uri.startswith("spiffe://"):
        return None
    domain, _, path = uri[len("spiffe://") :].partition("/")
    parts = path.split("/")
    if not domain or len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        return None
    if not parts[1] or not parts[3]:
        return None
    return domain, parts[1], parts[3]


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lower-case hex: how roots are named."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """The URI SANs (empty when there is no SAN extension)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def is_ca(cert: x509.Certificate) -> bool:
    """True when the certificate says CA:TRUE."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Root:
    """One trust anchor and its key."""

    cert: x509.Certificate
    key: CAKey

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @property
    def not_after(self) -> float:
        return self.cert.not_valid_after_utc.timestamp()


def new_root(trust_domain: str, lifetime: float = ROOT_LIFETIME) -> Root:
    """A self-signed P-256 root: CA:TRUE, pathlen 0, a distinct subject per root."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlayer"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"meshlayer root {trust_domain} {secrets.token_hex(4)}"
            ),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(seconds=lifetime))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return Root(cert, key)


def load_root(cert_pem: bytes, key_pem: bytes) -> Root:
    """A user-supplied root; ValueError naming what is wrong with it."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ValueError(f"--ca-cert: not a PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--ca-key: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("--ca-key: must be an EC or RSA key")
    if not is_ca(cert):
        raise ValueError("--ca-cert: is not a CA certificate (basicConstraints CA:TRUE)")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ValueError("--ca-key: does not match --ca-cert")
    if cert.not_valid_after_utc <= _now():
        raise ValueError("--ca-cert: has expired")
    return Root(cert, key)


@dataclass(frozen=True, slots=True)
class CAState:
    """Roots (the trust bundle, oldest first), the signing root, the generation."""

    roots: tuple[Root, ...]
    signing: str
    """Fingerprint of the root that signs new leaves."""
    generation: int = 1
    """Rises each time the signing root changes."""
    raw: bytes = field(default=b"", compare=False)
    """The stored blob this state was read from (the compare-and-set token)."""

    @property
    def signer(self) -> Root:
        for root in self.roots:
            if root.fingerprint == self.signing:
                return root
        raise Unavailable("CA state names a signing root that is not in the bundle")

    def bundle_pem(self) -> list[str]:
        return [pem(r.cert) for r in self.roots]

    def to_bytes(self) -> bytes:
        roots = []
        for r in self.roots:
            key = r.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            roots.append({"cert": pem(r.cert), "key": key.decode("ascii")})
        doc = {"roots": roots, "signing": self.signing, "generation": self.generation}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CAState:
        doc = json.loads(raw)
        roots = []
        for r in doc["roots"]:
            key = serialization.load_pem_private_key(r["key"].encode(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
            roots.append(Root(x509.load_pem_x509_certificate(r["cert"].encode()), key))
        return cls(tuple(roots), str(doc["signing"]), int(doc["generation"]), raw)

    def describe(self, trust_domain: str) -> dict[str, Any]:
        """``GET /v1/ca``'s answer."""
        return {
            "trustDomain": trust_domain,
            "generation": self.generation,
            "roots": [
                {
                    "fingerprint": r.fingerprint,
                    "notAfter": int(r.not_after),
                    "signing": r.fingerprint == self.signing,
                    "subject": r.cert.subject.rfc4514_string(),
                    "pem": pem(r.cert),
                }
                for r in self.roots
            ],
        }


@dataclass(frozen=True, slots=True)
class Issued:
    """A signed leaf and what to tell the sidecar about it."""

    cert: x509.Certificate
    issuer: str
    """Fingerprint of the root that signed it."""

    @property
    def expires(self) -> float:
        return self.cert.not_valid_after_utc.timestamp()


def check_csr(csr_pem: bytes | str) -> tuple[x509.CertificateSigningRequest, str]:
    """Parse and validate a CSR; (csr, its one SPIFFE ID). CAError 400 when it is
    malformed, badly signed, has a weak key, other than one URI SAN, or asks for CA."""
    raw = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(raw)
    except ValueError as exc:
        raise CAError(400, "bad-csr", f"csr: not a PEM certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise CAError(400, "bad-csr", "csr: the signature does not verify")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise CAError(400, "bad-csr", f"csr: EC key on {key.curve.name}; use P-256")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CAError(400, "bad-csr", f"csr: RSA key of {key.key_size} bits; at least 2048")
    else:
        raise CAError(400, "bad-csr", "csr: key must be EC P-256 or RSA >= 2048")
    try:
        bc = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise CAError(400, "bad-csr", "csr: requests a CA certificate (CA:TRUE)")
    except x509.ExtensionNotFound:
        pass
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CAError(400, "bad-csr", "csr: needs one URI SAN (the SPIFFE ID)") from None
    names = list(san)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(names) != 1 or len(uris) != 1:
        raise CAError(
            400, "bad-csr", f"csr: must have exactly one SAN, a URI; has {len(names)} names"
        )
    return csr, uris[0]


class CertificateAuthority:
    """The CA of one control process, backed by the store's ``ca`` blob."""

    def __init__(
        self,
        store: Store,
        trust_domain: str = "meshlayer.local",
        cert_ttl: float = DEFAULT_CERT_TTL,
        supplied: Root | None = None,
    ) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self.cert_ttl = cert_ttl
        self.supplied = supplied
        self._state: CAState | None = None

    @property
    def state(self) -> CAState:
        """The state as last read (``load`` or ``refresh`` first)."""
        if self._state is None:
            raise Unavailable("the CA is not loaded")
        return self._state

    async def load(self) -> tuple[CAState, bool]:
        """Read the CA, creating it if the store has none; (state, created here)."""
        for _ in range(_CAS_RETRIES):
            raw = await self.store.get_blob(BLOB)
            if raw is not None:
                self._state = CAState.from_bytes(raw)
                return self._state, False
            root = self.supplied or new_root(self.trust_domain)
            state = CAState((root,), root.fingerprint, 1)
            data = state.to_bytes()
            if await self.store.put_blob(BLOB, data, None):
                self._state = CAState.from_bytes(data)
                return self._state, True
        raise Unavailable("could not create the CA: the store kept changing")

    async def refresh(self) -> CAState:
        """Re-read the blob (another control process may have rotated)."""
        raw = await self.store.get_blob(BLOB)
        if raw is None:
            return (await self.load())[0]
        if self._state is None or raw != self._state.raw:
            self._state = CAState.from_bytes(raw)
        return self._state

    async def _change(self, step: Any) -> CAState:
        """Apply ``step(state) -> state`` with compare-and-set, retrying on races."""
        for _ in range(_CAS_RETRIES):
            current = await self.refresh()
            new: CAState = step(current)
            data = new.to_bytes()
            if await self.store.put_blob(BLOB, data, current.raw, bump=True):
                self._state = CAState.from_bytes(data)
                return self._state
        raise Unavailable("CA change kept racing other control processes; retry")

    async def add_root(self, root: Root | None = None) -> CAState:
        """Rotation step 1: a new root joins the bundle (signing unchanged).
        CAError 409 if a root that does not sign is already in the bundle."""
        fresh = root or new_root(self.trust_domain)

        def step(s: CAState) -> CAState:
            if len(s.roots) > 1:
                raise CAError(
                    409,
                    "rotation-in-progress",
                    "a second root is already in the bundle; switch and retire first",
                )
            return CAState((*s.roots, fresh), s.signing, s.generation)

        return await self._change(step)

    async def switch(self) -> CAState:
        """Rotation step 2: the newest root signs; the generation rises."""

        def step(s: CAState) -> CAState:
            newest = s.roots[-1]
            if newest.fingerprint == s.signing:
                raise CAError(409, "nothing-to-switch", "the newest root already signs; add first")
            return CAState(s.roots, newest.fingerprint, s.generation + 1)

        return await self._change(step)

    async def retire(self) -> CAState:
        """Rotation step 3: every root but the signing one leaves the bundle."""

        def step(s: CAState) -> CAState:
            if len(s.roots) == 1:
                raise CAError(409, "nothing-to-retire", "the bundle holds only the signing root")
            if s.roots[-1].fingerprint != s.signing:
                raise CAError(409, "not-switched", "switch to the new root before retiring")
            return CAState((s.signer,), s.signing, s.generation)

        return await self._change(step)

    def sign(
        self,
        csr: x509.CertificateSigningRequest,
        identity: str,
        ttl: float | None = None,
    ) -> Issued:
        """A leaf for a CSR already checked with :func:`check_csr`."""
        return self.issue(csr.public_key(), identity, ttl)  # type: ignore[arg-type]

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        identity: str,
        ttl: float | None = None,
    ) -> Issued:
        """A leaf for ``public_key`` with ``identity`` as its one URI SAN, signed by
        the signing root: CA:FALSE, digitalSignature, server+client auth."""
        root = self.state.signer
        ttl = self.cert_ttl if ttl is None else ttl
        now = _now()
        not_after = min(now + dt.timedelta(seconds=ttl), root.cert.not_valid_after_utc)
        backdate = dt.timedelta(seconds=min(60.0, ttl / 10))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlayer")]))
            .issuer_name(root.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - backdate)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(root.key, hashes.SHA256())
        )
        return Issued(cert, root.fingerprint)

    def issuer_of(self, cert: x509.Certificate) -> str | None:
        """Fingerprint of the bundle root that signed ``cert``, or None."""
        for root in self.state.roots:
            if root.cert.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(root.cert)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return root.fingerprint
        return None
