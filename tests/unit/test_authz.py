"""The authorization stage: policies compiled per service and evaluated as Istio does
(DENY first, then ALLOW, then the mesh default), with dry-run as a shadow decision."""

from __future__ import annotations

import posixpath
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from meshlayer.config import load_documents
from meshlayer.config.model import MeshConfig
from meshlayer.proxy.authz import AuthzStage, ServiceAuthz, compile_policies
from meshlayer.proxy.codec import RequestHead
from meshlayer.proxy.errors import MeshError, render

TD = "spiffe://meshlayer.local/ns/default/sa/"
FRONTEND, EDGE, OTHER = TD + "frontend", TD + "edge", TD + "other"


def _config(*policies: str, mesh: str = "") -> MeshConfig:
    docs = [
        "apiVersion: meshlayer/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: p{i}}}\nspec:\n  targetRef: {{name: catalog}}\n{p}"
        for i, p in enumerate(policies)
    ]
    if mesh:
        docs.append(
            f"apiVersion: meshlayer/v1\nkind: Mesh\nmetadata: {{name: default}}\nspec: {mesh}\n"
        )
    return load_documents("---\n".join(docs), "t.yaml")


def _table(*policies: str, mesh: str = "") -> ServiceAuthz | None:
    cfg = _config(*policies, mesh=mesh)
    return compile_policies(cfg.policies, cfg.mesh, ("catalog",)).get("catalog")


def _check(
    table: ServiceAuthz | None,
    method: str = "GET",
    path: str = "/",
    identity: str | None = FRONTEND,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[str | None, str | None]:
    assert table is not None
    return table.check(method.encode(), path.encode(), headers or [], identity)


def test_nothing_to_check_by_default() -> None:
    assert _table() is None
    cfg = _config()
    assert compile_policies(cfg.policies, cfg.mesh, ("catalog", "edge")) == {}


def test_allow_by_identity_and_service() -> None:
    t = _table(
        "  action: ALLOW\n  rules:\n"
        f'  - from: [{{identities: ["{FRONTEND}"]}}, {{services: [edge]}}]\n'
    )
    assert _check(t, identity=FRONTEND) == (None, None)
    assert _check(t, identity=EDGE) == (None, None)
    assert _check(t, identity=OTHER) == ("p0", None)
    assert _check(t, identity=None) == ("p0", None)  # plaintext never matches `from`
    # a service name matches only namespace default
    assert _check(t, identity="spiffe://meshlayer.local/ns/prod/sa/edge") == ("p0", None)


def test_allow_by_method_path_header() -> None:
    t = _table(
        "  action: ALLOW\n  rules:\n  - to:\n    - methods: [GET]\n"
        "      paths: [{exact: /items}, {prefix: /items/}, {prefix: /admin}]\n"
        "      headers: [{name: X-Tenant, value: acme}]\n"
    )
    acme = [(b"X-TENANT", b" acme ")]
    assert _check(t, path="/items", headers=acme) == (None, None)
    assert _check(t, path="/items/3?x=1", headers=acme) == (None, None)
    assert _check(t, path="/admin/x", headers=acme) == (None, None)
    assert _check(t, path="/admin", headers=acme) == (None, None)
    assert _check(t, path="/administrator", headers=acme) == ("p0", None)  # whole segments
    assert _check(t, path="/itemsx", headers=acme) == ("p0", None)
    assert _check(t, path="/items", method="POST", headers=acme) == ("p0", None)
    assert _check(t, path="/items") == ("p0", None)
    assert _check(t, path="/items", headers=[(b"x-tenant", b"other")]) == ("p0", None)


def test_deny_wins_over_allow() -> None:
    t = _table(
        "  action: ALLOW\n  rules: [{}]\n",
        "  action: DENY\n  rules: [{to: [{paths: [{prefix: /admin}]}]}]\n",
    )
    assert _check(t, path="/items") == (None, None)
    assert _check(t, path="/admin/users") == ("p1", None)


def test_several_allow_policies_any_matches() -> None:
    t = _table(
        "  action: ALLOW\n  rules: [{to: [{methods: [GET]}]}]\n",
        "  action: ALLOW\n  rules: [{to: [{methods: [POST]}]}]\n",
    )
    assert _check(t, method="GET") == (None, None)
    assert _check(t, method="POST") == (None, None)
    assert _check(t, method="DELETE") == ("p0,p1", None)


def test_rule_ands_from_and_to() -> None:
    t = _table(
        f'  action: DENY\n  rules: [{{from: [{{identities: ["{OTHER}"]}}], '
        "to: [{methods: [DELETE]}]}]\n"
    )
    assert _check(t, method="DELETE", identity=OTHER) == ("p0", None)
    assert _check(t, method="DELETE", identity=FRONTEND) == (None, None)
    assert _check(t, method="GET", identity=OTHER) == (None, None)


def test_mesh_default_deny() -> None:
    t = _table(mesh="{authorization: {default: deny}}")
    assert _check(t) == ("default", None)
    t = _table(
        "  action: DENY\n  rules: [{to: [{methods: [PUT]}]}]\n",
        mesh="{authorization: {default: deny}}",
    )
    assert _check(t, method="GET") == ("default", None)
    assert _check(t, method="PUT") == ("p0", None)
    # an ALLOW policy decides before the default
    t = _table(
        "  action: ALLOW\n  rules: [{to: [{methods: [GET]}]}]\n",
        mesh="{authorization: {default: deny}}",
    )
    assert _check(t, method="GET") == (None, None)


def test_dry_run_policy_counts_but_allows() -> None:
    t = _table("  action: DENY\n  dryRun: true\n  rules: [{to: [{paths: [{prefix: /admin}]}]}]\n")
    assert _check(t, path="/admin") == (None, "p0")
    assert _check(t, path="/items") == (None, None)
    # with an enforced policy beside it, the enforced one still denies
    t = _table(
        "  action: DENY\n  dryRun: true\n  rules: [{to: [{paths: [{prefix: /admin}]}]}]\n",
        "  action: DENY\n  rules: [{to: [{methods: [DELETE]}]}]\n",
    )
    assert _check(t, method="DELETE", path="/admin") == ("p1", None)
    assert _check(t, method="GET", path="/admin") == (None, "p0")


def test_dry_run_allow_policy() -> None:
    t = _table("  action: ALLOW\n  dryRun: true\n  rules: [{to: [{methods: [GET]}]}]\n")
    assert _check(t, method="GET") == (None, None)
    assert _check(t, method="POST") == (None, "p0")


def test_mesh_wide_dry_run() -> None:
    mesh = "{authorization: {default: deny, dryRun: true}}"
    t = _table(mesh=mesh)
    assert _check(t) == (None, "default")
    t = _table("  action: DENY\n  rules: [{to: [{methods: [PUT]}]}]\n", mesh=mesh)
    assert _check(t, method="PUT") == (None, "p0")


def _exchange(target: bytes, identity: str | None, headers: list[tuple[bytes, bytes]]) -> Any:
    head = RequestHead(b"GET", target, b"1.1", headers, True, 0, 0, b"", b"catalog", None, False)
    return SimpleNamespace(head=head, path=target, down=SimpleNamespace(peer_identity=identity))


def test_stage_normalises_denies_and_counts() -> None:
    registry = CollectorRegistry()
    stage = AuthzStage("catalog", registry)
    table = stage.update(
        _config(
            "  action: DENY\n  rules: [{to: [{paths: [{prefix: /admin}]}]}]\n",
            "  action: DENY\n  dryRun: true\n  rules: [{to: [{paths: [{exact: /audit}]}]}]\n",
        )
    )
    assert table is not None and stage.table is table
    ex = _exchange(b"//x/../%61dmin?q=1", FRONTEND, [])
    with pytest.raises(MeshError) as info:
        table.authorize(ex)
    err = info.value
    assert (err.status, err.reason, err.policy) == (403, "denied", "p0")
    assert ex.path == b"/admin?q=1"
    assert registry.get_sample_value("meshlayer_authz_denied_total", {"policy": "p0"}) == 1

    ex = _exchange(b"/a/%2e%2E/audit", None, [])
    table.authorize(ex)  # dry-run: passes, counted
    assert ex.path == b"/audit"
    assert registry.get_sample_value("meshlayer_authz_dry_run_denied_total", {"policy": "p1"}) == 1

    with pytest.raises(MeshError) as info:
        table.authorize(_exchange(b"/admin%2Fx", FRONTEND, []))
    assert (info.value.status, info.value.reason) == (400, "bad-path")

    assert stage.update(_config()) is None  # policies removed: nothing to check
    assert stage.table is None


def test_stage_ignores_other_services() -> None:
    stage = AuthzStage("reviews", CollectorRegistry())
    assert stage.update(_config("  action: DENY\n  rules: [{}]\n")) is None


def test_denial_renders_policy() -> None:
    raw = render(403, "denied", "denied by p0", "catalog", False, b"", 0, "p0")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"x-meshlayer-error: denied" in head
    assert b"x-meshlayer-policy: p0" in head
    assert b'"policy":"p0"' in body


_piece = st.sampled_from(
    [
        "admin",
        "%61dmin",
        "%61%64%6D%69%6E",
        "adm%69n",
        "a",
        "x",
        ".",
        "..",
        "%2e",
        "%2E%2e",
        ".%2e",
        "",
        "%2F",
        "%2fadmin",
        "%5C",
        "keys",
        "%25",
        "%2561dmin",
        "ADMIN",
    ]
)


@given(st.lists(_piece, min_size=1, max_size=7))
def test_no_spelling_that_a_server_reads_as_admin_slips_past(pieces: list[str]) -> None:
    """Whatever a server that fully percent-decodes and resolves dot segments would
    read as /admin or below, the stage refuses (400) or denies (403)."""
    target = ("/" + "/".join(pieces)).encode()
    server_view = posixpath.normpath("/" + unquote(target.decode()).replace("\\", "/"))
    server_view = "/" + server_view.lstrip("/")
    under_admin = server_view == "/admin" or server_view.startswith("/admin/")
    table = _table("  action: DENY\n  rules: [{to: [{paths: [{prefix: /admin}]}]}]\n")
    assert table is not None
    ex = _exchange(target, None, [])
    try:
        table.authorize(ex)
    except MeshError as err:
        assert err.status in (400, 403)
        return
    assert not under_admin, (target, ex.path, server_view)
