"""``meshlayer gateway``: classification at the edge, with real processes.

The upstream app answers every plain request with ``x-echo-priority``: the
``x-meshlayer-priority`` it received, so each test reads the class a request
got where it arrived.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.control import Control, start_control
from tests.support.procs import (
    Cluster,
    Proc,
    Sidecar,
    free_port,
    request,
    run_meshlayer,
    service_yaml,
    wait_for,
    wait_port,
)

CLIENT_CLAIM = {
    "x-meshlayer-priority": "critical",
    "baggage": "meshlayer-priority=critical, session=abc",
}
"""What an outside client sends to promote itself."""


def start_gateway(
    cluster: Cluster,
    config: str | Path | None = None,
    control: str | None = None,
    extra: list[str] | None = None,
    name: str = "gateway",
) -> Sidecar:
    """A ``meshlayer gateway`` process; its ``outbound`` is the --listen port."""
    if isinstance(config, str):
        config = cluster.write_config(config, f"gateway-{len(cluster.procs)}.yaml")
    listen, admin = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "meshlayer",
        "gateway",
        "--listen",
        f"127.0.0.1:{listen}",
        "--admin",
        f"127.0.0.1:{admin}",
        "--name",
        name,
    ]
    if config is not None:
        argv += ["--config", str(config)]
    if control is not None:
        argv += ["--control", control, "--state-dir", str(cluster.tmp / f"state-gw-{listen}")]
        argv += ["--lease-ttl", "3", "--reconnect-max", "0.5"]
    proc = Proc(f"gateway-{name}-{listen}", [*argv, *(extra or [])], cluster.tmp)
    cluster.procs.append(proc)
    gw = Sidecar(proc, listen, 0, admin)
    wait_port(admin, proc=proc)
    wait_for("gateway ready", lambda: gw.admin_get("/ready")[0] == 200)
    return gw


def rule(name: str, cls: str, match: dict[str, Any] | None = None, order: int = 100) -> str:
    spec: dict[str, Any] = {"priorityClass": cls, "order": order}
    if match is not None:
        spec["match"] = match
    doc = {
        "apiVersion": "meshlayer/v1",
        "kind": "ClassificationRule",
        "metadata": {"name": name},
        "spec": spec,
    }
    return "---\n" + json.dumps(doc) + "\n"


def got(port: int, path: str = "/", host: str = "catalog", **kw: Any) -> str:
    """The class the upstream saw for one request through the gateway."""
    status, headers, body = request(port, path=path, host=host, **kw)
    assert status == 200, (status, body)
    return headers.get("x-echo-priority", "")


def got_soon(port: int, path: str = "/") -> str | None:
    """As :func:`got`, for polling: None until the request gets through."""
    status, headers, _ = request(port, path=path, host="catalog")
    return headers.get("x-echo-priority") if status == 200 else None


def paths_seen(port: int) -> list[str]:
    """The request targets an upstream app received (its ``/stats``)."""
    status, _, body = request(port, path="/stats", host="127.0.0.1")
    assert status == 200
    return [p for p in json.loads(body)["paths"] if p != "/stats"]


RULES = (
    rule("by-identity", "critical", {"identities": ["spiffe://meshlayer.local/ns/x/sa/web"]}, 0)
    + rule(
        "bots",
        "batch",
        {"headers": [{"name": "user-agent", "type": "RegularExpression", "value": ".*bot.*"}]},
        1,
    )
    + rule("reports", "batch", {"queryParams": [{"name": "mode", "value": "batch"}]}, 2)
    + rule("far-ops", "batch", {"sourceCIDRs": ["10.0.0.0/8"], "paths": [{"value": "/ops"}]}, 3)
    + rule(
        "local-ops", "critical", {"sourceCIDRs": ["127.0.0.0/8"], "paths": [{"value": "/ops"}]}, 4
    )
    + rule("writes", "critical", {"methods": ["POST", "PUT"]}, 5)
    + rule("to-cart", "batch", {"services": ["cart"]}, 6)
    + rule(
        "api",
        "critical",
        {"paths": [{"value": "/api"}, {"type": "RegularExpression", "value": "/v[0-9]+/.*"}]},
        10,
    )
)


@pytest.fixture
def edge(cluster: Cluster) -> Sidecar:
    catalog = cluster.upstream("catalog")
    cart = cluster.upstream("cart")
    config = (
        service_yaml("catalog", [catalog.address])
        + "---\n"
        + service_yaml("cart", [cart.address], spec="priorityClass: critical")
        + RULES
    )
    return start_gateway(cluster, config)


@pytest.mark.parametrize(
    ("method", "path", "host", "headers", "want"),
    [
        ("GET", "/web", "catalog", {}, "default"),  # no rule: the service's default
        ("GET", "/api/items", "catalog", {}, "critical"),  # path prefix
        ("GET", "/apix", "catalog", {}, "default"),  # whole segments only
        ("GET", "/v2/items", "catalog", {}, "critical"),  # regular expression
        ("GET", "/api/../web", "catalog", {}, "default"),  # the normalised path
        ("GET", "/api", "catalog", {"user-agent": "Googlebot/2.1"}, "batch"),  # header, order
        ("GET", "/api?mode=batch", "catalog", {}, "batch"),  # query parameter
        ("GET", "/api?mode=live", "catalog", {}, "critical"),
        ("GET", "/ops/restart", "catalog", {}, "critical"),  # source address (127.0.0.1)
        ("POST", "/web", "catalog", {}, "critical"),  # method
        ("GET", "/web", "cart", {}, "batch"),  # destination service
    ],
)
def test_each_match_attribute_classifies(
    edge: Sidecar, method: str, path: str, host: str, headers: dict[str, str], want: str
) -> None:
    got_class = got(edge.outbound, path, host, method=method, headers={**CLIENT_CLAIM, **headers})
    assert got_class == want


def test_source_is_the_peer_never_x_forwarded_for(edge: Sidecar) -> None:
    """far-ops (10.0.0.0/8, batch) comes before local-ops (127.0.0.0/8, critical): a
    client on loopback that claims 10.1.1.1 in X-Forwarded-For still gets local-ops."""
    xff = {"x-forwarded-for": "10.1.1.1"}
    assert got(edge.outbound, "/ops/x", headers={**CLIENT_CLAIM, **xff}) == "critical"
    assert edge.metric("meshlayer_gateway_classified_total", rule="local-ops") == 1
    assert edge.metric("meshlayer_gateway_classified_total", rule="far-ops") == 0


@pytest.mark.parametrize(
    "attack", ["/crawl/../api/x", "/crawl/%2e%2e/api/x", "/crawl/.%2E/api/x", "//crawl/./../api/x"]
)
def test_the_path_classified_routed_and_forwarded_is_one(cluster: Cluster, attack: str) -> None:
    """A dot-segment path gets the class, the HTTPRoute and the upstream path of its
    normal form: a client cannot be classified by /api and reach /crawl, or the reverse."""
    catalog, api = cluster.upstream("catalog"), cluster.upstream("catalog-api")
    route = (
        "---\napiVersion: meshlayer/v1\nkind: HTTPRoute\nmetadata: {name: split}\nspec:\n"
        "  parentRefs: [{name: catalog}]\n  rules:\n"
        "  - matches: [{path: {type: PathPrefix, value: /api}}]\n"
        "    backendRefs: [{name: catalog-api}]\n"
        "  - backendRefs: [{name: catalog}]\n"
    )
    config = (
        service_yaml("catalog", [catalog.address])
        + "---\n"
        + service_yaml("catalog-api", [api.address])
        + route
        + rule("crawl", "batch", {"paths": [{"value": "/crawl"}]}, 1)
        + rule("api", "critical", {"paths": [{"value": "/api"}]}, 2)
    )
    gw = start_gateway(cluster, config)
    assert got(gw.outbound, attack, headers=CLIENT_CLAIM) == "critical"
    assert got(gw.outbound, "/crawl/x") == "batch"
    assert paths_seen(api.port) == ["/api/x"]  # routed by the normal form, and sent it
    assert paths_seen(catalog.port) == ["/crawl/x"]
    status, headers, _ = request(gw.outbound, path="/crawl/..%2fapi", host="catalog")
    assert (status, headers["x-meshlayer-error"]) == (400, "bad-path")


def test_client_class_is_replaced_never_trusted(cluster: Cluster, edge: Sidecar) -> None:
    """A client's header and baggage claim are rewritten to the class the rules give."""
    for claim in ("critical", "CRITICAL", "batch", "nonsense"):
        status, _, body = request(
            edge.outbound,
            path="/headers",
            host="catalog",
            headers={
                "x-meshlayer-priority": claim,
                "baggage": f"meshlayer-priority={claim};p=1, session=abc",
            },
        )
        assert status == 200, body
        seen = json.loads(body)["headers"]
        assert [v for k, v in seen if k == "x-meshlayer-priority"] == ["default"]
        assert [v for k, v in seen if k == "baggage"] == [
            "meshlayer-priority=default;p=1, session=abc"
        ]
    # a client without baggage: the gateway starts it, so apps that only forward baggage
    # (OpenTelemetry) carry the class too
    status, _, body = request(edge.outbound, path="/headers", host="cart")
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert [v for k, v in seen if k == "baggage"] == ["meshlayer-priority=batch"]
    # the identity rule never matches at a plaintext listener, even with forged headers:
    # the gateway leaves it out and says so
    forged = {"x-meshlayer-peer-identity": "spiffe://meshlayer.local/ns/x/sa/web"}
    assert got(edge.outbound, "/web", headers=forged) == "default"
    assert "by-identity matches identities" in edge.proc.log()
    assert edge.metric("meshlayer_gateway_classified_total", rule="none", priority="default") >= 5
    assert edge.metric("meshlayer_gateway_classified_total", rule="by-identity") == 0
    got(edge.outbound, "/api")
    assert edge.metric("meshlayer_gateway_classified_total", rule="api", priority="critical") == 1
    # the admin page shows the rules in the order they are tried
    _, body = edge.admin_get("/config")
    view = json.loads(body)
    assert [r["name"] for r in view["classificationRules"]][:3] == [
        "by-identity",
        "bots",
        "reports",
    ]
    assert view["sidecar"]["gateway"] == "gateway"
    _, metrics = edge.admin_get("/metrics")
    assert "gateway(app)" not in metrics  # a gateway has no app
    assert 'direction="inbound"' not in metrics  # ... so no inbound limit, queue or shedding


def test_gateway_does_not_route_to_itself(edge: Sidecar) -> None:
    status, headers, _ = request(edge.outbound, host="gateway")
    assert (status, headers["x-meshlayer-error"]) == (404, "no-route")


def test_gateway_sidecar_app_chain_carries_the_class(cluster: Cluster) -> None:
    """gateway -> catalog's sidecar (inbound) -> app: the app sees the gateway's class."""
    app = cluster.upstream("catalog-app")
    sc = cluster.sidecar(service_yaml("other", ["127.0.0.1:9"]), service="catalog", app=app.address)
    config = (
        service_yaml("catalog", [f"127.0.0.1:{sc.inbound}"], meshed=True)
        + rule("api", "critical", {"paths": [{"value": "/api"}]})
        + rule("crawl", "batch", {"headers": [{"name": "user-agent", "value": "crawler"}]}, 1)
    )
    gw = start_gateway(cluster, config)
    assert got(gw.outbound, "/api/1", headers=CLIENT_CLAIM) == "critical"
    claim = {"x-meshlayer-priority": "critical", "user-agent": "crawler"}
    assert got(gw.outbound, "/api/1", headers=claim) == "batch"
    assert got(gw.outbound, "/web", headers=CLIENT_CLAIM) == "default"
    status, _, body = request(gw.outbound, path="/headers", host="catalog")
    assert status == 200
    seen = dict(json.loads(body)["headers"])
    assert seen["x-meshlayer-priority"] == "default"
    # the sidecar knows who called, and saw every request with a class
    assert sc.metric("meshlayer_requests_total", direction="inbound", source="gateway") == 4
    assert gw.proc.stop() == 0  # SIGTERM: a clean stop
    assert sc.metric("meshlayer_priority_missing_total", direction="inbound") == 0


def test_bad_rules_exit_2_naming_the_field(cluster: Cluster) -> None:
    catalog = service_yaml("catalog", ["127.0.0.1:9"])
    cases = [
        (rule("r", "gold"), "(ClassificationRule/r): spec.priorityClass: names no PriorityClass"),
        (
            rule("r", "batch", {"paths": [{"type": "Regex", "value": "/x"}]}),
            "spec.match.paths[0].type: must be one of Exact, PathPrefix, RegularExpression",
        ),
        (
            rule("r", "batch", {"headers": [{"name": "x-meshlayer-priority", "value": "batch"}]}),
            "spec.match.headers[0].name",
        ),
        (rule("r", "batch", {"sourceCIDRs": ["10.0.0.0/33"]}), "spec.match.sourceCIDRs[0]"),
    ]
    for i, (doc, message) in enumerate(cases):
        path = cluster.write_config(catalog + doc, f"bad-{i}.yaml")
        out = run_meshlayer(
            ["gateway", "--config", str(path), "--listen", f"127.0.0.1:{free_port()}"]
        )
        assert out.returncode == 2, out
        assert "meshlayer gateway: invalid config" in out.stderr
        assert message in out.stderr, out.stderr
    out = run_meshlayer(["gateway", "--listen", "nowhere"])
    assert out.returncode == 2 and "--listen" in out.stderr, out.stderr
    out = run_meshlayer(["gateway", "--listen", "127.0.0.1:1"], unset=["MESHLAYER_CONTROL"])
    assert out.returncode == 2 and "--config" in out.stderr, out.stderr


def test_gateway_help() -> None:
    out = run_meshlayer(["gateway", "--help"])
    assert out.returncode == 0, out
    for flag in ("--listen", "--admin", "--name", "--config", "--control", "--join-token"):
        assert flag in out.stdout
    assert "0.0.0.0:8080" in out.stdout and "127.0.0.1:15091" in out.stdout
    assert "ClassificationRule" in out.stdout
    out = run_meshlayer(["--help"])
    assert "gateway" in out.stdout


@pytest.fixture
def ctl(cluster: Cluster) -> Control:
    return start_control(cluster.tmp, f"sqlite:{cluster.tmp / 'control.db'}", procs=cluster.procs)


def test_rules_from_the_control_plane_apply_without_restart(cluster: Cluster, ctl: Control) -> None:
    app = cluster.upstream("catalog")
    docs = cluster.write_config(service_yaml("catalog", [app.address]), "svc.yaml")
    env = {"MESHLAYER_ADMIN_TOKEN": ctl.admin_token or ""}
    apply = ["apply", "--control", ctl.url]
    assert run_meshlayer([*apply, "-f", str(docs)], env=env).returncode == 0
    gw = start_gateway(cluster, control=ctl.url)
    wait_for("the catalog service", lambda: got_soon(gw.outbound, "/api/x") == "default")

    api = cluster.write_config(rule("api", "critical", {"paths": [{"value": "/api"}]}), "r1.yaml")
    out = run_meshlayer([*apply, "-f", str(api)], env=env)
    assert out.returncode == 0, out.stderr
    wait_for("the rule", lambda: got(gw.outbound, "/api/x", headers=CLIENT_CLAIM) == "critical")
    assert got(gw.outbound, "/web", headers=CLIENT_CLAIM) == "default"

    # changed in place, then a second rule that comes first by order
    api = cluster.write_config(rule("api", "batch", {"paths": [{"value": "/api"}]}), "r2.yaml")
    assert run_meshlayer([*apply, "-f", str(api)], env=env).returncode == 0
    wait_for("the change", lambda: got(gw.outbound, "/api/x") == "batch")
    vip = cluster.write_config(
        rule("vip", "critical", {"queryParams": [{"name": "vip", "type": "Present"}]}, 1), "r3.yaml"
    )
    assert run_meshlayer([*apply, "-f", str(vip)], env=env).returncode == 0
    wait_for("the second rule", lambda: got(gw.outbound, "/api/x?vip") == "critical")

    listing = run_meshlayer(["get", "classificationrules", "--control", ctl.url], env=env)
    assert listing.returncode == 0, listing.stderr
    assert "vip" in listing.stdout and "-> critical, order 1" in listing.stdout

    # an invalid rule is refused whole, naming the field; the gateway keeps its rules
    bad = cluster.write_config(rule("vip", "critical", {"methods": ["get"]}), "bad.yaml")
    out = run_meshlayer([*apply, "-f", str(bad)], env=env)
    assert out.returncode == 2, out
    assert "spec.match.methods[0]" in out.stderr

    out = run_meshlayer(["delete", "classificationrule", "api", "--control", ctl.url], env=env)
    assert out.returncode == 0, out.stderr
    wait_for("the deletion", lambda: got(gw.outbound, "/api/x") == "default")
    assert got(gw.outbound, "/api/x?vip") == "critical"
    # the deleted rule's series went with it (renamed: the same); the others stay
    assert 'rule="api"' not in gw.admin_get("/metrics")[1]
    assert gw.metric("meshlayer_gateway_classified_total", rule="vip", priority="critical") >= 2
    assert "classification rules in force" in gw.proc.log()  # reloaded, never restarted
    assert gw.proc.popen.poll() is None


def test_gateway_with_identity_speaks_mtls_and_carries_the_class(cluster: Cluster) -> None:
    """A join token gives the gateway a certificate: mTLS to the catalog's sidecar, which
    tells its app who called (the gateway's SPIFFE ID) and the class the rules gave."""
    from tests.integration.security.mesh import spiffe, start_mesh, wait_identity

    mesh = start_mesh(cluster)
    app = cluster.upstream("catalog-app")
    mesh.sidecar("catalog", app.address)
    mesh.apply(
        {
            "apiVersion": "meshlayer/v1",
            "kind": "ClassificationRule",
            "metadata": {"name": "api"},
            "spec": {"priorityClass": "critical", "match": {"paths": [{"value": "/headers"}]}},
        }
    )
    gw = start_gateway(
        cluster, control=mesh.ctl.url, extra=[f"--join-token={mesh.token('gateway')}"]
    )
    wait_identity(gw, ("catalog",))
    status, _, body = request(gw.outbound, path="/headers", host="catalog", headers=CLIENT_CLAIM)
    assert status == 200, body
    seen = dict(json.loads(body)["headers"])
    assert seen["x-meshlayer-peer-identity"] == spiffe("gateway")
    assert seen["x-meshlayer-priority"] == "critical"
    assert got(gw.outbound, "/web", headers=CLIENT_CLAIM) == "default"
    # registered like a sidecar: the mesh check sees it at the current version
    env = {"MESHLAYER_ADMIN_TOKEN": mesh.ctl.admin_token or ""}
    out = run_meshlayer(["check", "--control", mesh.ctl.url], env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sidecar gateway-" in out.stdout
