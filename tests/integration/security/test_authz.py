"""AuthorizationPolicy end to end: a real sidecar in front of a real app, policies
from a static config (and from the control plane), requests on the inbound port.

What reached the app is read from the app itself (``/stats`` lists every path it
received), so "denied" means the app got nothing, not just that the client saw a
403. Identity-based rules need mTLS between sidecars; the plaintext cases here
prove that a caller without a verified identity never matches a ``from`` entry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from tests.support.control import start_control
from tests.support.procs import Cluster, Sidecar, Upstream, raw, request, run_meshlayer

FRONTEND = "spiffe://meshlayer.local/ns/default/sa/frontend"
MESH = (
    "apiVersion: meshlayer/v1\nkind: Mesh\nmetadata: {name: default}\n"
    "spec: {mtls: {mode: permissive}, authorization: {default: %s, dryRun: %s}}\n"
)


def policy(name: str, spec: str) -> str:
    """An AuthorizationPolicy on ``catalog``; ``spec`` is YAML under spec (indented 2)."""
    return (
        f"apiVersion: meshlayer/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}}}\n"
        f"spec:\n  targetRef: {{name: catalog}}\n{spec}"
    )


def catalog(
    cluster: Cluster, *docs: str, default: str = "allow", dry: bool = False
) -> tuple[Sidecar, Upstream]:
    """The app ``catalog`` and its sidecar, with ``docs`` and a Mesh document."""
    app = cluster.upstream("catalog")
    mesh = MESH % (default, "true" if dry else "false")
    sc = cluster.sidecar("---\n".join([*docs, mesh]), service="catalog", app=app.address)
    return sc, app


def app_paths(app: Upstream) -> list[str]:
    return [p for p in app.stats()["paths"] if p != "/stats"]


def denied(resp: tuple[int, dict[str, str], bytes], policy_name: str) -> None:
    status, headers, body = resp
    assert status == 403, resp
    assert headers.get("x-meshlayer-error") == "denied", headers
    assert headers.get("x-meshlayer-policy") == policy_name, headers
    doc = json.loads(body)
    assert (doc["error"], doc["policy"]) == ("denied", policy_name), doc


def raw_status(port: int, target: bytes) -> tuple[int, bytes]:
    """Send a request line exactly as given (no client-side normalisation)."""
    data = raw(port, b"GET " + target + b" HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n")
    head, _, _body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head


READERS = policy(
    "readers",
    """\
  action: ALLOW
  rules:
  - to:
    - methods: [GET, HEAD]
    - methods: [POST]
      headers: [{name: x-tenant, value: acme}]
    - methods: [PUT]
      paths: [{exact: /items}, {prefix: /items/}]
""",
)
DENY_ADMIN = policy(
    "deny-admin", "  action: DENY\n  rules: [{to: [{paths: [{prefix: /admin}]}]}]\n"
)


def test_allow_and_deny_by_method_path_and_header(cluster: Cluster) -> None:
    sc, app = catalog(cluster, READERS, DENY_ADMIN)
    port = sc.inbound
    assert request(port, "GET", "/id", host="catalog")[2] == b"catalog"
    assert request(port, "HEAD", "/x", host="catalog")[0] == 200
    assert request(port, "POST", "/echo", "catalog", b"hi", {"X-Tenant": "acme"})[2] == b"hi"
    assert request(port, "PUT", "/items/7", "catalog", b"")[0] == 200
    assert request(port, "PUT", "/items", "catalog", b"")[0] == 200
    before = app_paths(app)

    denied(request(port, "DELETE", "/id", host="catalog"), "readers")  # method
    denied(request(port, "POST", "/echo", "catalog", b"x", {"x-tenant": "other"}), "readers")
    denied(request(port, "POST", "/echo", "catalog", b"x"), "readers")  # header missing
    denied(request(port, "PUT", "/itemsx", "catalog", b""), "readers")  # path
    denied(request(port, "GET", "/admin", host="catalog"), "deny-admin")  # DENY beats ALLOW
    denied(request(port, "GET", "/admin/users?x=1", host="catalog"), "deny-admin")
    assert app_paths(app) == before  # none of them reached the app
    assert request(port, "GET", "/administrator", host="catalog")[0] == 200  # whole segments

    assert sc.metric("meshlayer_authz_denied_total", policy="readers") == 4
    assert sc.metric("meshlayer_authz_denied_total", policy="deny-admin") == 2
    assert sc.metric("meshlayer_mesh_errors_total", direction="inbound", reason="denied") == 6


def test_path_spellings_do_not_slip_past_a_rule_on_admin(cluster: Cluster) -> None:
    sc, app = catalog(cluster, DENY_ADMIN)
    assert request(sc.inbound, "GET", "/id", host="catalog")[2] == b"catalog"
    before = app_paths(app)
    for target in (
        b"//admin",
        b"/a/../admin",
        b"/%61dmin",
        b"/admin/.",
        b"/%2e%2e/admin",
        b"/x/%2E%2e/admin/keys",
        b"///admin//keys",
    ):
        status, head = raw_status(sc.inbound, target)
        assert status == 403 and b"x-meshlayer-policy: deny-admin" in head, (target, head)
    for target in (b"/admin%2Fx", b"/admin%2fx", b"/admin%5Cx", b"/admin\\x"):
        status, head = raw_status(sc.inbound, target)
        assert status == 400, (target, head)
        assert b"x-meshlayer-error: bad-path" in head or b"x-meshlayer-error: bad-request" in head
    assert app_paths(app) == before  # the app received none of them
    # the app sees the normalised path, the one that was authorised
    status, _ = raw_status(sc.inbound, b"/x/..//%69d?q=%2F")
    assert status == 200
    assert app_paths(app)[-1] == "/id?q=%2F"


def test_mesh_default_deny(cluster: Cluster) -> None:
    sc, app = catalog(cluster, default="deny")
    denied(request(sc.inbound, "GET", "/id", host="catalog"), "default")
    assert app_paths(app) == []
    assert sc.metric("meshlayer_authz_denied_total", policy="default") == 1


def test_dry_run_passes_logs_and_counts(cluster: Cluster) -> None:
    dry = policy(
        "no-deletes",
        "  action: DENY\n  dryRun: true\n  rules: [{to: [{methods: [DELETE]}]}]\n",
    )
    sc, app = catalog(cluster, dry)
    assert request(sc.inbound, "DELETE", "/id", host="catalog")[2] == b"catalog"
    assert request(sc.inbound, "GET", "/id", host="catalog")[2] == b"catalog"
    assert app_paths(app) == ["/id", "/id"]
    assert sc.metric("meshlayer_authz_dry_run_denied_total", policy="no-deletes") == 1
    assert sc.metric("meshlayer_authz_denied_total") == 0
    deadline = time.monotonic() + 5
    while "dry-run: would deny DELETE /id" not in sc.proc.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "dry-run: would deny DELETE /id to catalog" in sc.proc.log()
    assert "(policy no-deletes)" in sc.proc.log()


def test_mesh_wide_dry_run_of_default_deny(cluster: Cluster) -> None:
    sc, _app = catalog(cluster, default="deny", dry=True)
    assert request(sc.inbound, "GET", "/id", host="catalog")[0] == 200
    assert sc.metric("meshlayer_authz_dry_run_denied_total", policy="default") == 1


def test_from_never_matches_a_caller_without_identity(cluster: Cluster) -> None:
    allow = policy(
        "frontend-only",
        f'  action: ALLOW\n  rules: [{{from: [{{identities: ["{FRONTEND}"]}}]}}]\n',
    )
    sc, app = catalog(cluster, allow)
    forged = {"x-meshlayer-peer-identity": FRONTEND, "x-forwarded-client-cert": f"URI={FRONTEND}"}
    denied(request(sc.inbound, "GET", "/id", "catalog", headers=forged), "frontend-only")
    assert app_paths(app) == []


def test_forged_identity_headers_are_stripped(cluster: Cluster) -> None:
    app = cluster.upstream("catalog")
    svc = (
        "apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: catalog}\nspec:\n"
        f'  endpoints: [{{address: "{app.address}", meshed: false}}]\n'
    )
    client = cluster.sidecar(svc, service="frontend")
    server = cluster.sidecar(svc, service="catalog", app=app.address)
    forged = {
        "X-Meshlayer-Peer-Identity": "spiffe://meshlayer.local/ns/default/sa/admin",
        "x-forwarded-client-cert": "By=spiffe://x;URI=spiffe://meshlayer.local/ns/default/sa/a",
        "x-keep": "1",
    }
    for port in (client.outbound, server.inbound):
        status, _, body = request(port, "GET", "/headers", "catalog", headers=forged)
        assert status == 200
        names = [k.lower() for k, _ in json.loads(body)["headers"]]
        assert "x-keep" in names
        assert "x-forwarded-client-cert" not in names
        # no copy of the client's; only the mesh may set one, from a verified certificate
        sent = [
            v for k, v in json.loads(body)["headers"] if k.lower() == "x-meshlayer-peer-identity"
        ]
        assert "spiffe://meshlayer.local/ns/default/sa/admin" not in sent


def test_policies_applied_through_the_control_plane(cluster: Cluster) -> None:
    ctl = start_control(cluster.tmp, f"sqlite:{cluster.tmp / 'control.db'}", procs=cluster.procs)
    app = cluster.upstream("catalog")
    sc = cluster.sidecar(
        None,
        service="catalog",
        app=app.address,
        control=ctl.url,
        extra=["--lease-ttl", "2", "--reconnect-max", "0.5"],
    )
    assert request(sc.inbound, "GET", "/admin", host="catalog")[0] == 200
    docs = cluster.write_config(DENY_ADMIN + "---\n" + MESH % ("allow", "false"), "authz.yaml")
    env_token = ["--admin-token", ctl.admin_token] if ctl.admin_token else []
    out = run_meshlayer(["apply", "-f", str(docs), "--control", ctl.url, *env_token])
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = request(sc.inbound, "GET", "/admin", host="catalog")[0]
        if status == 403:
            break
        time.sleep(0.1)
    denied(request(sc.inbound, "GET", "/admin/x", host="catalog"), "deny-admin")
    _, view = sc.admin_get("/config")
    assert json.loads(view)["authorizationPolicies"][0]["name"] == "deny-admin"
    got = run_meshlayer(
        ["get", "authorizationpolicy", "deny-admin", "-o", "json", "--control", ctl.url]
    )
    assert got.returncode == 0 and "deny-admin" in got.stdout, got.stdout + got.stderr
    bad = cluster.write_config(DENY_ADMIN.replace("/admin", "/a/../admin"), "bad.yaml")
    refused = run_meshlayer(["apply", "-f", str(bad), "--control", ctl.url, *env_token])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "(AuthorizationPolicy/deny-admin): spec.rules[0].to[0].paths[0].prefix" in (
        refused.stderr
    ), refused.stderr
    assert "normal form '/admin'" in refused.stderr
    table = run_meshlayer(["get", "all", "--control", ctl.url])
    assert "DENY to catalog; 1 rules" in table.stdout, table.stdout + table.stderr
    assert "mtls permissive; authorization default allow" in table.stdout, table.stdout


def _until(call: Callable[[], tuple[int, dict[str, str], bytes]], want: int) -> None:
    """Repeat ``call`` until it answers ``want`` (certificates and snapshots arrive)."""
    deadline = time.monotonic() + 20
    resp: tuple[int, dict[str, str], bytes] | Exception = (0, {}, b"")
    while time.monotonic() < deadline:
        try:
            resp = call()
            if resp[0] == want:
                return
        except OSError as exc:
            resp = exc
        time.sleep(0.1)
    raise AssertionError(f"never got {want}: {resp}")


def test_allow_and_deny_by_verified_source_identity(cluster: Cluster) -> None:
    ctl = start_control(cluster.tmp, f"sqlite:{cluster.tmp / 'control.db'}", procs=cluster.procs)
    docs = [
        policy(
            "from-frontend",
            "  action: ALLOW\n  rules:\n  - from: [{services: [frontend]}]\n"
            f'  - from: [{{identities: ["{FRONTEND.replace("frontend", "edge")}"]}}]\n'
            "    to: [{methods: [GET]}]\n",
        ),
    ]
    path = cluster.write_config("---\n".join(docs), "identity.yaml")
    out = run_meshlayer(
        ["apply", "-f", str(path), "--control", ctl.url, "--admin-token", str(ctl.admin_token)]
    )
    assert out.returncode == 0, out.stdout + out.stderr

    def token(service: str) -> str:
        status, data = ctl.api("POST", "/v1/tokens", {"service": service})
        assert status == 200, data
        return str(data["token"])

    fast = ["--lease-ttl", "3", "--reconnect-max", "0.5"]
    app = cluster.upstream("catalog")
    cluster.sidecar(
        None, "catalog", app.address, [*fast, "--token", token("catalog")], control=ctl.url
    )
    callers = {
        name: cluster.sidecar(None, name, extra=[*fast, "--token", token(name)], control=ctl.url)
        for name in ("frontend", "edge", "intruder")
    }
    forged = {"x-meshlayer-peer-identity": FRONTEND}

    front = callers["frontend"].outbound
    _until(lambda: request(front, "POST", "/headers", "catalog", b"", forged), 200)
    status, _, body = request(front, "GET", "/headers", "catalog", headers=forged)
    assert status == 200
    seen = [v for k, v in json.loads(body)["headers"] if k.lower() == "x-meshlayer-peer-identity"]
    assert seen == [FRONTEND]  # the verified one only

    edge = callers["edge"].outbound
    _until(lambda: request(edge, "GET", "/id", "catalog"), 200)  # by identity, GET only
    denied(request(edge, "DELETE", "/id", "catalog"), "from-frontend")

    intruder = callers["intruder"].outbound
    _until(lambda: request(intruder, "GET", "/id", "catalog"), 403)
    before = app_paths(app)
    # a forged identity header from another service changes nothing
    denied(request(intruder, "GET", "/id", "catalog", headers=forged), "from-frontend")
    assert app_paths(app) == before
