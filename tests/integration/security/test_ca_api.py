"""The control plane's CA, tokens, admin token and mesh (mTLS) listener, against real
`meshlayer control` processes: what is refused, what is issued, rotation phases."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import os
import socket
import ssl
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.support.control import ADMIN_TOKEN, Control, service_doc, start_control
from tests.support.etcd import unique_prefix
from tests.support.procs import Cluster, run_meshlayer, upstream_with

TD = "meshlayer.local"


def spiffe(service: str) -> str:
    return f"spiffe://{TD}/ns/default/sa/{service}"


def csr_pem(
    key: Any,
    uris: list[str],
    ca: bool = False,
    dns: list[str] | None = None,
) -> str:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns or []]
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")])
    )
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


class Workload:
    """A key, and the certificate the control plane gave it (files for ssl)."""

    def __init__(self, tmp: Path, service: str) -> None:
        self.service = service
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.dir = tmp / f"wl-{service}-{os.urandom(3).hex()}"
        self.dir.mkdir()
        self.answer: dict[str, Any] = {}

    def csr(self, service: str | None = None) -> str:
        return csr_pem(self.key, [spiffe(service or self.service)])

    def take(self, answer: dict[str, Any]) -> x509.Certificate:
        self.answer = answer
        (self.dir / "cert.pem").write_text(answer["certificate"])
        (self.dir / "roots.pem").write_text("".join(answer["roots"]))
        (self.dir / "key.pem").write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return x509.load_pem_x509_certificate(answer["certificate"].encode())

    def context(self, roots: list[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata="".join(roots or self.answer["roots"]))
        if (self.dir / "cert.pem").exists():
            ctx.load_cert_chain(self.dir / "cert.pem", self.dir / "key.pem")
        return ctx


def mtls(
    port: int, ctx: ssl.SSLContext, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    """One request to the mesh listener over TLS with ``ctx``."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, (json.loads(raw) if raw else None)


def refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True when the mesh listener will not serve this client (handshake or first read)."""
    try:
        mtls(port, ctx, "GET", "/v1/ca")
    except (ssl.SSLError, ConnectionError, OSError, http.client.HTTPException):
        return True
    return False


def issue(ctl: Control, wl: Workload, token: str | None = None) -> x509.Certificate:
    token = token or new_token(ctl, wl.service)
    status, out = ctl.api("POST", "/v1/certificates", {"csr": wl.csr()}, token=token)
    assert status == 200, out
    return wl.take(out)


def new_token(
    ctl: Control, service: str, ttl: float | None = None, single_use: bool = False
) -> str:
    body: dict[str, Any] = {"service": service}
    if ttl is not None:
        body["ttl"] = ttl
    if single_use:
        body["singleUse"] = True
    status, out = ctl.api("POST", "/v1/tokens", body)
    assert status == 200, out
    assert out["service"] == service and out["expires"] > time.time() - 1
    return str(out["token"])


def fingerprint(cert_pem: str) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.fixture
def ctl(cluster: Cluster) -> Control:
    """A control plane that refuses plaintext sidecars, 60 s certificates."""
    return start_control(
        cluster.tmp,
        f"sqlite:{cluster.tmp / 'control.db'}",
        ["--cert-ttl", "60s", "--keepalive", "0.5"],
        procs=cluster.procs,
        plaintext_sidecars=False,
    )


# -- admin token ------------------------------------------------------------------------


def test_writes_need_the_admin_token_and_nothing_is_applied(ctl: Control) -> None:
    before = ctl.api("GET", "/v1/resources")[1]["version"]
    writes = [
        ("POST", "/v1/apply", {"documents": [service_doc("catalog")]}),
        ("DELETE", "/v1/resources/services/catalog", None),
        ("POST", "/v1/tokens", {"service": "catalog"}),
        ("POST", "/v1/ca/rotate", {"phase": "add"}),
    ]
    for method, path, body in writes:
        status, out = ctl.api(method, path, body, token=None)
        assert status == 401, (path, out)
        assert out["error"] == "unauthorized" and "admin token" in out["message"]
        status, out = ctl.api(method, path, body, token="not-the-admin-token")
        assert status == 403, (path, out)
        assert out["error"] == "forbidden"
    assert ctl.api("GET", "/v1/resources") == (200, {"version": before, "items": []})
    assert len(ctl.api("GET", "/v1/ca")[1]["roots"]) == 1  # no rotation happened
    # reads stay open; the right token works
    assert ctl.api("GET", "/v1/resources/services", token=None)[0] == 200
    status, out = ctl.api("POST", "/v1/apply", {"documents": [service_doc("catalog")]})
    assert status == 200 and out["results"][0]["action"] == "created"


def _ml(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Any:
    unset = ["MESHLAYER_ADMIN_TOKEN", "MESHLAYER_CONTROL"]
    return run_meshlayer(args, 30, cwd, env=env, unset=unset)


def test_generated_admin_token_file_is_0600_and_the_cli_uses_it(cluster: Cluster) -> None:
    work = cluster.tmp / "work"
    (work / ".meshlayer").mkdir(parents=True)
    ctl = start_control(
        cluster.tmp,
        f"sqlite:{work / '.meshlayer' / 'control.db'}",
        procs=cluster.procs,
        env={"MESHLAYER_ADMIN_TOKEN": ""},
    )
    path = work / ".meshlayer" / "admin-token"
    token = path.read_text().strip()
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in ctl.log() and str(path) in ctl.log()
    assert ctl.api("POST", "/v1/tokens", {"service": "a"}, token=ADMIN_TOKEN)[0] == 403

    doc = work / "svc.yaml"
    doc.write_text("apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: web}\nspec: {}\n")
    res = _ml(["apply", "-f", str(doc), "--control", ctl.url], cwd=work)  # the file
    assert res.returncode == 0, res.stderr
    assert "service/web created" in res.stdout
    res = _ml(["delete", "service", "web", "--control", ctl.url], cwd=cluster.tmp)  # no file
    assert res.returncode == 1 and "unauthorized" in res.stderr, res.stderr
    res = _ml(
        ["delete", "service", "web", "--control", ctl.url, "--admin-token", "wrong"],
        cwd=work,
    )
    assert res.returncode == 1 and "forbidden" in res.stderr, res.stderr
    env = {"MESHLAYER_ADMIN_TOKEN": token}
    res = _ml(
        ["token", "create", "--service", "web", "--control", ctl.url], cwd=cluster.tmp, env=env
    )
    assert res.returncode == 0, res.stderr
    join = res.stdout.strip()
    wl = Workload(cluster.tmp, "web")
    status, out = ctl.api("POST", "/v1/certificates", {"csr": wl.csr()}, token=join)
    assert status == 200, out
    # a restart keeps the token in the file
    ctl.stop()
    again = start_control(
        cluster.tmp, ctl.store_url, procs=cluster.procs, env={"MESHLAYER_ADMIN_TOKEN": ""}
    )
    assert path.read_text().strip() == token
    assert again.api("POST", "/v1/tokens", {"service": "a"}, token=token)[0] == 200


# -- join tokens and certificates ---------------------------------------------------------


def test_join_token_buys_certificates_with_the_right_spiffe_id(ctl: Control) -> None:
    wl = Workload(ctl.tmp, "catalog")
    token = new_token(ctl, "catalog")
    status, out = ctl.api("POST", "/v1/certificates", {"csr": wl.csr()}, token=token)
    assert status == 200, out
    cert = wl.take(out)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe("catalog")]
    assert len(list(sans)) == 1
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert out["trustDomain"] == TD and out["identity"] == spiffe("catalog")
    assert out["mesh"] == f"127.0.0.1:{ctl.mtls_port}"
    lifetime = cert.not_valid_after_utc.timestamp() - time.time()
    assert 50 < lifetime <= 61 and abs(out["expires"] - cert.not_valid_after_utc.timestamp()) < 1
    ca = ctl.api("GET", "/v1/ca")[1]
    assert ca["trustDomain"] == TD and ca["generation"] == 1
    [root] = ca["roots"]
    assert root["signing"] and out["issuer"] == root["fingerprint"]
    assert [fingerprint(r) for r in out["roots"]] == [root["fingerprint"]]
    root_cert = x509.load_pem_x509_certificate(out["roots"][0].encode())
    cert.verify_directly_issued_by(root_cert)

    # reusable until it expires (a restarted sidecar proves itself again) ...
    status, again = ctl.api("POST", "/v1/certificates", {"csr": wl.csr()}, token=token)
    assert status == 200, again
    # ... unless single-use
    status, out = ctl.api("POST", "/v1/tokens", {"service": "catalog", "singleUse": True})
    assert status == 200 and out["singleUse"] is True, out
    once = str(out["token"])
    assert ctl.api("POST", "/v1/certificates", {"csr": wl.csr()}, token=once)[0] == 200
    status, again = ctl.api("POST", "/v1/certificates", {"csr": wl.csr()}, token=once)
    assert status == 401 and "already used" in again["message"]
    status, out = ctl.api("POST", "/v1/tokens", {"service": "catalog", "singleUse": "yes"})
    assert status == 400 and "singleUse" in out["message"]
    # unknown, none
    status, out = ctl.api("POST", "/v1/certificates", {"csr": wl.csr()}, token="x" * 43)
    assert status == 401 and "unknown" in out["message"]
    assert ctl.api("POST", "/v1/certificates", {"csr": wl.csr()}, token=None)[0] == 401
    # expired
    short = new_token(ctl, "catalog", ttl=0.5)
    time.sleep(0.7)
    status, out = ctl.api("POST", "/v1/certificates", {"csr": wl.csr()}, token=short)
    assert status == 401 and "expired" in out["message"]


def test_a_token_for_one_service_cannot_get_another_identity(ctl: Control) -> None:
    wl = Workload(ctl.tmp, "frontend")
    token = new_token(ctl, "frontend", single_use=True)
    for other in ("payments", "frontend-admin"):
        status, out = ctl.api("POST", "/v1/certificates", {"csr": wl.csr(other)}, token=token)
        assert status == 403, out
        assert spiffe("frontend") in out["message"]
    foreign_td = csr_pem(wl.key, ["spiffe://evil.example/ns/default/sa/frontend"])
    assert ctl.api("POST", "/v1/certificates", {"csr": foreign_td}, token=token)[0] == 403
    # the refusals did not use the token up
    assert ctl.api("POST", "/v1/certificates", {"csr": wl.csr()}, token=token)[0] == 200


def test_bad_csrs_are_refused_without_using_the_token(ctl: Control) -> None:
    token = new_token(ctl, "catalog", single_use=True)
    p256 = ec.generate_private_key(ec.SECP256R1())
    bad = {
        "two URI SANs": csr_pem(p256, [spiffe("catalog"), spiffe("catalog")]),
        "URI and DNS": csr_pem(p256, [spiffe("catalog")], dns=["catalog"]),
        "no SAN": csr_pem(p256, []),
        "CA requested": csr_pem(p256, [spiffe("catalog")], ca=True),
        "P-384": csr_pem(ec.generate_private_key(ec.SECP384R1()), [spiffe("catalog")]),
        "RSA 1024": csr_pem(
            rsa.generate_private_key(public_exponent=65537, key_size=1024), [spiffe("catalog")]
        ),
        "not PEM": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----",
    }
    for what, pem in bad.items():
        status, out = ctl.api("POST", "/v1/certificates", {"csr": pem}, token=token)
        assert status == 400, (what, out)
        assert out["error"] == "bad-csr" and out["message"].startswith("csr:"), (what, out)
    assert ctl.api("POST", "/v1/certificates", {"csr": "x"}, token=token)[0] == 400
    assert ctl.api("POST", "/v1/certificates", {"nope": 1}, token=token)[0] == 400
    rsa_ok = csr_pem(
        rsa.generate_private_key(public_exponent=65537, key_size=2048), [spiffe("catalog")]
    )
    assert ctl.api("POST", "/v1/certificates", {"csr": rsa_ok}, token=token)[0] == 200


# -- the mesh listener ------------------------------------------------------------------


def test_mesh_listener_refuses_no_cert_and_foreign_ca(ctl: Control) -> None:
    wl = Workload(ctl.tmp, "catalog")
    issue(ctl, wl)
    roots = wl.answer["roots"]
    # a client without a certificate
    anon = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anon.check_hostname = False
    anon.load_verify_locations(cadata="".join(roots))
    assert refused(ctl.mtls_port, anon)
    # a client whose certificate comes from another CA, same SPIFFE ID
    foreign = _self_signed_leaf(ctl.tmp, spiffe("catalog"))
    foreign.load_verify_locations(cadata="".join(roots))
    assert refused(ctl.mtls_port, foreign)
    # TLS 1.2 is refused even with a good certificate
    old = wl.context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    assert refused(ctl.mtls_port, old)
    # the real one works, and the server proves it is the control plane
    ctx = wl.context()
    with (
        socket.create_connection(("127.0.0.1", ctl.mtls_port), 5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        assert tls.version() == "TLSv1.3"
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    server = x509.load_der_x509_certificate(der)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TD}/ns/meshlayer/sa/control"
    ]
    assert mtls(ctl.mtls_port, ctx, "GET", "/v1/ca")[0] == 200


def _self_signed_leaf(tmp: Path, uri: str) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "foreign")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
        .sign(key, hashes.SHA256())
    )
    d = tmp / f"foreign-{os.urandom(3).hex()}"
    d.mkdir()
    (d / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_cert_chain(d / "c.pem", d / "k.pem")
    return ctx


def test_a_sidecar_identity_acts_only_for_its_own_service(ctl: Control) -> None:
    cat, rev = Workload(ctl.tmp, "catalog"), Workload(ctl.tmp, "reviews")
    issue(ctl, cat)
    issue(ctl, rev)
    c, r = cat.context(), rev.context()
    port = ctl.mtls_port
    reg = {"service": "catalog", "address": "127.0.0.1:20001", "sidecar": "cat-1", "ttl": 30}
    assert mtls(port, c, "POST", "/v1/registry", reg)[0] == 200
    # reviews may not register as catalog, nor take over catalog's sidecar id
    status, out = mtls(port, r, "POST", "/v1/registry", reg)
    assert status == 403 and "reviews" in out["message"], out
    hijack = {**reg, "service": "reviews"}
    assert mtls(port, r, "POST", "/v1/registry", hijack)[0] == 403
    assert mtls(port, r, "POST", "/v1/registry/cat-1/renew")[0] == 403
    assert mtls(port, r, "POST", "/v1/status/cat-1", {"version": 1})[0] == 403
    assert mtls(port, r, "DELETE", "/v1/registry/cat-1")[0] == 403
    # ... nor get catalog's certificate, nor call admin endpoints
    assert mtls(port, r, "POST", "/v1/certificates", {"csr": rev.csr("catalog")})[0] == 403
    assert mtls(port, r, "POST", "/v1/apply", {"documents": []})[0] == 403
    # catalog may do all of it for itself; renewal over mTLS
    assert mtls(port, c, "POST", "/v1/registry/cat-1/renew")[0] == 200
    assert mtls(port, c, "POST", "/v1/status/cat-1", {"version": 1})[0] == 204
    status, out = mtls(port, c, "POST", "/v1/certificates", {"csr": cat.csr()})
    assert status == 200 and out["identity"] == spiffe("catalog")
    regs = ctl.api("GET", "/v1/registry")[1]["endpoints"]
    assert [(e["sidecar"], e["service"]) for e in regs] == [("cat-1", "catalog")]
    # the plain listener refuses sidecar calls without --allow-plaintext-sidecars
    status, out = ctl.api("POST", "/v1/registry", {**reg, "sidecar": "x"}, token=None)
    assert status == 401 and "--token" in out["message"], out
    assert ctl.api("POST", "/v1/status/cat-1", {"version": 1}, token=None)[0] == 401
    assert ctl.api("GET", "/v1/watch?sidecar=x", token=None)[0] == 401


def test_watch_over_mtls_carries_trust_and_identities(ctl: Control) -> None:
    cat = Workload(ctl.tmp, "catalog")
    issue(ctl, cat)
    reg = {"service": "catalog", "address": "127.0.0.1:20001", "sidecar": "cat-1", "ttl": 30}
    assert mtls(ctl.mtls_port, cat.context(), "POST", "/v1/registry", reg)[0] == 200
    raw = socket.create_connection(("127.0.0.1", ctl.mtls_port), 5)
    tls = cat.context().wrap_socket(raw)
    try:
        tls.sendall(b"GET /v1/watch?sidecar=cat-1 HTTP/1.1\r\nHost: c\r\n\r\n")
        buf = b""
        deadline = time.monotonic() + 5
        while b"\n\n" not in buf.partition(b"data: ")[2] and time.monotonic() < deadline:
            buf += tls.recv(65536)
    finally:
        tls.close()
    assert buf.startswith(b"HTTP/1.1 200")
    data = json.loads(buf.partition(b"data: ")[2].partition(b"\n")[0])
    assert data["trust"]["domain"] == TD and data["trust"]["generation"] == 1
    assert data["trust"]["roots"] == cat.answer["roots"]
    assert data["endpoints"]["catalog"][0]["identity"] == spiffe("catalog")


# -- rotation -----------------------------------------------------------------------------


def test_rotation_phases_wait_for_the_sidecars(ctl: Control) -> None:
    wl = Workload(ctl.tmp, "catalog")
    first = issue(ctl, wl)
    old_fp = wl.answer["issuer"]
    port = ctl.mtls_port
    old_ctx = wl.context()
    reg = {"service": "catalog", "address": "127.0.0.1:20001", "sidecar": "cat-1", "ttl": 60}
    assert mtls(port, old_ctx, "POST", "/v1/registry", reg)[0] == 200

    status, out = ctl.api("POST", "/v1/ca/rotate", {"phase": "add"})
    assert status == 200, out
    assert len(out["roots"]) == 2 and out["signing"] == old_fp and out["generation"] == 1
    new_fp = out["roots"][1]
    ca = ctl.api("GET", "/v1/ca")[1]
    assert [(r["fingerprint"], r["signing"]) for r in ca["roots"]] == [
        (old_fp, True),
        (new_fp, False),
    ]
    assert ctl.api("POST", "/v1/ca/rotate", {"phase": "add"})[0] == 409  # one at a time
    # the sidecar gets the new bundle (from its watch stream; here from GET /v1/ca)
    old_ctx = wl.context(roots=[r["pem"] for r in ca["roots"]])
    assert ctl.api("POST", "/v1/ca/rotate", {"phase": "retire"})[0] == 409  # not switched
    # the sidecar has not applied the version with the new bundle: switch waits
    status, out = ctl.api("POST", "/v1/ca/rotate", {"phase": "switch"})
    assert status == 409 and out["waiting"] == ["cat-1"], out
    version = ctl.api("GET", "/v1/resources")[1]["version"]
    assert mtls(port, old_ctx, "POST", "/v1/status/cat-1", {"version": version})[0] == 204
    status, out = ctl.api("POST", "/v1/ca/rotate", {"phase": "switch"})
    assert status == 200, out
    assert out["signing"] == new_fp and out["generation"] == 2

    # new leaves come from the new root; the old certificate still works meanwhile
    status, renewed = mtls(port, old_ctx, "POST", "/v1/certificates", {"csr": wl.csr()})
    assert status == 200 and renewed["issuer"] == new_fp and renewed["generation"] == 2
    assert len(renewed["roots"]) == 2
    # retire waits until the live sidecar reports a certificate from the new root
    status, out = ctl.api("POST", "/v1/ca/rotate", {"phase": "retire"})
    assert status == 409 and out["waiting"] == ["cat-1"], out
    wl2 = Workload(ctl.tmp, "catalog")
    wl2.key = wl.key
    second = wl2.take(renewed)
    assert second.serial_number != first.serial_number
    new_ctx = wl2.context()
    report = {"version": version, "cert": {"issuer": new_fp, "notAfter": renewed["expires"]}}
    assert mtls(port, new_ctx, "POST", "/v1/status/cat-1", report)[0] == 204
    sidecars = ctl.api("GET", "/v1/status")[1]["sidecars"]
    assert sidecars[0]["cert"] == {"issuer": new_fp, "notAfter": renewed["expires"]}
    status, out = ctl.api("POST", "/v1/ca/rotate", {"phase": "retire"})
    assert status == 200 and out["roots"] == [new_fp], out
    assert ctl.api("POST", "/v1/ca/rotate", {"phase": "retire"})[0] == 409

    # within a couple of seconds the mesh listener trusts only the new root
    deadline = time.monotonic() + 5
    while not refused(port, wl.context(roots=renewed["roots"])):
        assert time.monotonic() < deadline, "old-root certificate still accepted after retire"
        time.sleep(0.2)
    assert mtls(port, new_ctx, "GET", "/v1/ca")[0] == 200


def test_retire_force_and_cli_rotate_all_in_one(ctl: Control) -> None:
    env = {"MESHLAYER_ADMIN_TOKEN": ADMIN_TOKEN}
    res = _ml(["ca", "rotate", "--control", ctl.url, "--wait", "10"], cwd=ctl.tmp, env=env)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ": done;" in ln]
    assert [ln.split(":")[0] for ln in lines] == ["add", "switch", "retire"], res.stdout
    ca = ctl.api("GET", "/v1/ca")[1]
    assert ca["generation"] == 2 and len(ca["roots"]) == 1
    res = _ml(["ca", "show", "--control", ctl.url], cwd=ctl.tmp)
    assert res.returncode == 0 and ca["roots"][0]["fingerprint"] in res.stdout
    # a live sidecar with an old certificate blocks the CLI's retire until --wait, then --force
    wl = Workload(ctl.tmp, "catalog")
    issue(ctl, wl)
    reg = {"service": "catalog", "address": "127.0.0.1:20001", "sidecar": "cat-1", "ttl": 60}
    assert mtls(ctl.mtls_port, wl.context(), "POST", "/v1/registry", reg)[0] == 200
    for phase in ("add", "switch"):
        assert ctl.api("POST", "/v1/ca/rotate", {"phase": phase, "force": True})[0] == 200
    args = ["ca", "rotate", "--phase", "retire", "--control", ctl.url, "--wait", "0.5"]
    res = _ml(args, cwd=ctl.tmp, env=env)
    assert res.returncode == 1 and "cat-1" in res.stdout + res.stderr, res
    res = _ml([*args, "--force"], cwd=ctl.tmp, env=env)
    assert res.returncode == 0, res.stderr


# -- one CA for several control processes -------------------------------------------------


@pytest.fixture(params=["sqlite", "etcd"])
def shared_store(request: pytest.FixtureRequest, cluster: Cluster) -> str:
    if request.param == "sqlite":
        return f"sqlite:{cluster.tmp / 'shared.db'}"
    etcd = request.getfixturevalue("etcd_cluster")
    return str(etcd.url + unique_prefix("ca"))


def test_two_control_processes_share_one_ca(cluster: Cluster, shared_store: str) -> None:
    store = shared_store
    a = start_control(cluster.tmp, store, procs=cluster.procs, plaintext_sidecars=False)
    b = start_control(cluster.tmp, store, procs=cluster.procs, plaintext_sidecars=False)
    assert a.api("GET", "/v1/ca")[1] == b.api("GET", "/v1/ca")[1]
    # a token made on A buys a certificate on B, which A's mesh listener accepts
    wl = Workload(cluster.tmp, "catalog")
    status, out = a.api("POST", "/v1/tokens", {"service": "catalog", "singleUse": True})
    assert status == 200, out
    token = str(out["token"])
    issue(b, wl, token)
    assert a.api("POST", "/v1/certificates", {"csr": wl.csr()}, token=token)[0] == 401  # used
    assert mtls(a.mtls_port, wl.context(), "GET", "/v1/ca")[0] == 200
    assert mtls(b.mtls_port, wl.context(), "GET", "/v1/ca")[0] == 200
    # a rotation step on B is seen by A
    assert b.api("POST", "/v1/ca/rotate", {"phase": "add"})[0] == 200
    assert len(a.api("GET", "/v1/ca")[1]["roots"]) == 2
    assert a.api("GET", "/v1/ca")[1] == b.api("GET", "/v1/ca")[1]


# -- health probes of meshed sidecars ------------------------------------------------------


def test_health_probes_reach_meshed_sidecars_over_mtls(cluster: Cluster) -> None:
    ctl = start_control(
        cluster.tmp,
        f"sqlite:{cluster.tmp / 'control.db'}",
        procs=cluster.procs,
        plaintext_sidecars=False,
    )
    check = {"path": "/health", "interval": "100ms", "unhealthyThreshold": 2}
    doc = service_doc("web", {"healthCheck": check})
    assert ctl.api("POST", "/v1/apply", {"documents": [doc]})[0] == 200
    flag = cluster.tmp / "web-sick"
    app = upstream_with(cluster, "web-a", "--health-file", str(flag))
    token = new_token(ctl, "web")
    cluster.sidecar(
        None,
        service="web",
        app=app.address,
        control=ctl.url,
        extra=["--lease-ttl", "2", "--reconnect-max", "0.5", "--token", token],
    )

    def healthy() -> list[bool]:
        regs = ctl.api("GET", "/v1/registry")[1]["endpoints"]
        return [e["healthy"] for e in regs if e["service"] == "web"]

    def wait(want: list[bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while healthy() != want:
            assert time.monotonic() < deadline, (healthy(), ctl.log()[-2000:])
            time.sleep(0.1)

    wait([True])
    time.sleep(0.5)  # a few probes: they pass (a plaintext probe would fail the handshake)
    assert healthy() == [True] and "unhealthy" not in ctl.log()
    flag.write_text("sick")
    wait([False])
    flag.unlink()
    wait([True])
