"""Helpers for the mTLS tests: a test-owned root CA, a control plane using it,
join tokens, sidecars with identities, raw TLS clients with crafted certificates.

The tests hand the control plane their own root (``--ca-cert/--ca-key``), so
they can sign bad certificates (expired, wrong trust domain, CA as leaf) with
the mesh's real CA, and a second root for "foreign CA".
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import secrets
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.control import ADMIN_TOKEN, Control, start_control
from tests.support.procs import Cluster, Sidecar, free_port

TD = "meshlayer.local"
ADMIN = ADMIN_TOKEN


def spiffe(service: str, td: str = TD) -> str:
    return f"spiffe://{td}/ns/default/sa/{service}"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class RootCA:
    """A root CA made in the test, and leaves it signs."""

    def __init__(self, name: str = "test root") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {secrets.token_hex(3)}")]
        )
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
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
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, folder: Path) -> tuple[Path, Path]:
        cert, key = folder / "ca.pem", folder / "ca-key.pem"
        cert.write_bytes(self.pem)
        key.write_bytes(_pem_key(self.key))
        return cert, key

    def leaf(
        self,
        uri: str,
        start: float = -60.0,
        end: float = 3600.0,
        ca: bool = False,
    ) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM), valid from now+start to now+end seconds."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(seconds=start))
            .not_valid_after(now + dt.timedelta(seconds=end))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
            )
        )
        if not ca:
            b = b.add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        cert = b.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    admin: bool = False,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """One JSON call to the control plane's API listener."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"content-type": "application/json"}
    if admin:
        headers["authorization"] = f"Bearer {ADMIN}"
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, (json.loads(raw) if raw else None)


class Mesh:
    """A control plane with the test's root, and sidecars with tokens."""

    def __init__(self, cluster: Cluster, ca: RootCA, ctl: Control, mtls_port: int) -> None:
        self.cluster = cluster
        self.ca = ca
        self.ctl = ctl
        self.mtls_port = mtls_port

    def token(self, service: str) -> str:
        status, data = call(self.ctl.port, "POST", "/v1/tokens", {"service": service}, admin=True)
        assert status == 200, data
        return str(data["token"])

    def apply(self, doc: dict[str, Any]) -> None:
        status, data = call(self.ctl.port, "POST", "/v1/apply", {"documents": [doc]}, admin=True)
        assert status == 200, data

    def sidecar(
        self, service: str, app: str, extra: list[str] | None = None, token: bool = True
    ) -> Sidecar:
        flags = ["--lease-ttl", "3", "--reconnect-max", "0.5", *(extra or [])]
        if token:
            flags += [f"--token={self.token(service)}"]
        return self.cluster.sidecar(
            None, service=service, app=app, control=self.ctl.url, extra=flags
        )


def start_mesh(cluster: Cluster, cert_ttl: str = "1h", extra: list[str] | None = None) -> Mesh:
    """A control plane (SQLite) with a test-owned root; sidecars need certificates."""
    ca = RootCA("mesh root")
    cert, key = ca.write(cluster.tmp)
    mtls = free_port()
    ctl = start_control(
        cluster.tmp,
        f"sqlite:///{cluster.tmp / 'control.db'}",
        [
            "--listen-mtls",
            f"127.0.0.1:{mtls}",
            "--cert-ttl",
            cert_ttl,
            "--ca-cert",
            str(cert),
            "--ca-key",
            str(key),
            *(extra or []),
        ],
        procs=cluster.procs,
        plaintext_sidecars=False,
    )
    return Mesh(cluster, ca, ctl, mtls)


def sidecar_view(sc: Sidecar) -> dict[str, Any]:
    _, body = sc.admin_get("/config")
    return dict(json.loads(body))


def wait_identity(
    sc: Sidecar, services: tuple[str, ...] = (), timeout: float = 15.0
) -> dict[str, Any]:
    """Wait until the sidecar has a certificate and a snapshot naming ``services``
    with endpoints; its identity view."""
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            view = sidecar_view(sc)
        except OSError:
            time.sleep(0.05)
            continue
        ident = (view.get("control") or {}).get("identity") or {}
        svcs = view.get("services", {})
        if ident.get("notAfter") and all(svcs.get(s, {}).get("endpoints") for s in services):
            return dict(ident)
        time.sleep(0.05)
    raise TimeoutError(f"sidecar got no identity/config in {timeout}s: {view}\n{sc.proc.log()}")


def tls_attempt(
    port: int,
    tmp: Path,
    roots: bytes,
    cert: tuple[bytes, bytes] | None,
    payload: bytes = b"GET /id HTTP/1.1\r\nhost: x\r\n\r\n",
    timeout: float = 5.0,
    until_close: bool = False,
) -> bytes:
    """A TLS 1.3 client with ``cert`` (None: none) sends ``payload``; what came back
    (b"" when the handshake or the connection failed): the response head, or
    everything until the server closes (``until_close``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=roots.decode())
    if cert is not None:
        name = secrets.token_hex(4)
        cp, kp = tmp / f"c-{name}.pem", tmp / f"k-{name}.pem"
        cp.write_bytes(cert[0])
        kp.write_bytes(cert[1])
        ctx.load_cert_chain(str(cp), str(kp))
    out = b""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
            ctx.wrap_socket(raw) as s,
        ):
            s.sendall(payload)
            while True:
                data = s.recv(65536)
                if not data:
                    break
                out += data
                if b"\r\n\r\n" in out and not until_close:
                    break
    except (ssl.SSLError, OSError):
        pass
    return out


class Relay:
    """A TCP relay that records the first bytes each connection sends upstream."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.first: list[bytes] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        first = True
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record and first:
                    self.first.append(data[:16])
                    first = False
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()
