"""The two-hop mTLS targets of bench/overhead.py: meshlayer and nginx, side by side.

* ``mesh-mtls`` -- client → sidecar A (outbound, routes ``Host: upstream``) → mTLS
  → sidecar B (inbound) → upstream. Both sidecars get their certificates from a
  real ``meshlayer control`` (join tokens, 24 h certificates); A dials B's
  registered inbound address over TLS 1.3 with its certificate and checks B's
  SPIFFE ID; B verifies A's. The sidecars' connection is pooled and kept alive.
* ``nginx-tls`` -- client → nginx A (proxy) → TLS 1.3 with a client certificate
  (``proxy_ssl_certificate``, ``proxy_ssl_verify on``, upstream keep-alive) →
  nginx B (``ssl_verify_client on``) → upstream. Certificates from a root made
  here with ``cryptography``.

Both proxies of a pair are pinned to the proxy CPU (1 worker each); the control
plane sits on the load CPU and idles. CPU µs/request and RSS of these rows are
the sum over both proxies of the pair: the cost of one mTLS hop, both ends.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import time
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import overhead as ov

MTLS_TARGETS = ("mesh-mtls", "nginx-tls")

NGINX_TLS_CLIENT = """\
    upstream peer {{
        server 127.0.0.1:{peer};
        keepalive 128;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass https://peer;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate {dir}/a.pem;
            proxy_ssl_certificate_key {dir}/a-key.pem;
            proxy_ssl_trusted_certificate {dir}/root.pem;
            proxy_ssl_verify on;
            proxy_ssl_name upstream;
            proxy_ssl_session_reuse on;
        }}
    }}
"""

NGINX_TLS_SERVER = """\
    upstream app {{
        server 127.0.0.1:{upstream};
        keepalive 128;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_protocols TLSv1.3;
        ssl_certificate {dir}/b.pem;
        ssl_certificate_key {dir}/b-key.pem;
        ssl_client_certificate {dir}/root.pem;
        ssl_verify_client on;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_certs(folder: Path) -> None:
    """root.pem, a.pem/a-key.pem (client), b.pem/b-key.pem (server, DNS ``upstream``)."""
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    (folder / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    for name, service in (("a", "client"), ("b", "upstream")):
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(f"spiffe://bench.local/ns/default/sa/{service}"),
            x509.DNSName(service),
        ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(root_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(root_key, hashes.SHA256())
        )
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}-key.pem").write_bytes(_key_pem(key))


def _post(url: str, body: dict[str, Any], token: str) -> dict[str, Any]:
    req = urllib.request.Request(
        url,
        json.dumps(body).encode(),
        {"content-type": "application/json", "authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def _wait_healthy(proc: ov.Proc, port: int) -> None:
    ov.wait_http_200(proc, port, "localhost", "/healthz")


def start_mtls_target(env: ov.Env, target: str, port: int) -> ov.Running:
    """Start one of ``MTLS_TARGETS`` listening (plain HTTP) on ``port``."""
    if target == "nginx-tls":
        folder = env.workdir
        if not (folder / "root.pem").exists():
            write_certs(folder)
        peer = ov.free_port()
        server = ov.start_nginx(
            env,
            "nginx-tls-b",
            NGINX_TLS_SERVER.format(port=peer, upstream=env.upstream_port, dir=folder),
            env.proxy_cpu,
        )
        client = ov.start_nginx(
            env,
            "nginx-tls-a",
            NGINX_TLS_CLIENT.format(port=port, peer=peer, dir=folder),
            env.proxy_cpu,
        )
        running = ov.Running(target, port, client, extra=[server])
    elif target == "mesh-mtls":
        assert env.python is not None
        state = env.workdir / f"mtls-{secrets.token_hex(3)}"
        state.mkdir()
        admin_token = secrets.token_urlsafe(16)
        os.environ["MESHLAYER_ADMIN_TOKEN"] = admin_token  # our children only
        api, mesh = ov.free_port(), ov.free_port()
        cmd = [
            env.python, "-m", "meshlayer", "control",
            "--listen", f"127.0.0.1:{api}",
            "--listen-mtls", f"127.0.0.1:{mesh}",
            "--store", f"sqlite:///{state / 'control.db'}",
            "--log-level", "warning",
        ]  # fmt: skip
        control = ov.spawn("mtls-control", env.pin(env.load_cpu, cmd), env.workdir)
        procs = [control]
        try:
            _wait_healthy(control, api)
            url = f"http://127.0.0.1:{api}"

            def sidecar(service: str, app: str, outbound: int) -> ov.Proc:
                token = _post(f"{url}/v1/tokens", {"service": service}, admin_token)["token"]
                admin = ov.free_port()
                cmd = [
                    env.python, "-m", "meshlayer", "sidecar",
                    "--service", service,
                    "--app", app,
                    "--inbound", f"127.0.0.1:{ov.free_port()}",
                    "--outbound", f"127.0.0.1:{outbound}",
                    "--admin", f"127.0.0.1:{admin}",
                    "--control", url,
                    f"--token={token}",
                    "--state-dir", str(state / service),
                    "--grace", "1",
                    "--log-level", "warning",
                ]  # fmt: skip
                proc = ov.spawn(f"mtls-{service}", env.pin(env.proxy_cpu, cmd), env.workdir)
                procs.append(proc)
                ov.wait_http_200(proc, admin, "localhost", "/ready")
                return proc

            b = sidecar(ov.SERVICE_HOST, f"127.0.0.1:{env.upstream_port}", ov.free_port())
            a = sidecar("client", f"127.0.0.1:{ov.free_port()}", port)
        except BaseException:
            for p in procs:
                p.stop()
            raise
        running = ov.Running(target, port, a, extra=[b], aux=[control])
    else:
        raise ValueError(target)
    try:
        ov.wait_http_200(running.proc, port, ov.SERVICE_HOST)
    except BaseException:
        stop_all(running)
        raise
    time.sleep(0.2)
    return running


def stop_all(running: ov.Running) -> None:
    for p in [running.proc, *running.extra, *running.aux]:
        if p is not None:
            p.stop()
