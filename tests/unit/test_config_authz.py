"""``kind: AuthorizationPolicy`` and ``kind: Mesh`` in the config loader: the typed
result, ``to_dict``, and errors that name document, field and problem."""

from __future__ import annotations

import pytest

from meshlayer.config import ConfigError, load_documents
from meshlayer.config.model import (
    AuthorizationPolicy,
    HeaderMatch,
    MeshSettings,
    PolicyOperation,
    PolicyPath,
    PolicyRule,
    PolicySource,
)
from meshlayer.config.snapshot import config_from_snapshot

FRONTEND = "spiffe://meshlayer.local/ns/default/sa/frontend"
POLICY = "apiVersion: meshlayer/v1\nkind: AuthorizationPolicy\nmetadata: {name: readers}\nspec:\n"
DOC = "mesh.yaml#1 (AuthorizationPolicy/readers)"
FULL = f"""\
  targetRef: {{name: catalog}}
  action: ALLOW
  rules:
  - from: [{{identities: ["{FRONTEND}"]}}, {{services: [edge]}}]
    to:
    - methods: [GET, HEAD]
      paths: [{{exact: /items}}, {{prefix: /items/}}]
      headers: [{{name: X-Tenant, value: acme}}]
  - {{}}
"""


def _policy(spec: str) -> AuthorizationPolicy:
    cfg = load_documents(POLICY + spec, "mesh.yaml")
    assert len(cfg.policies) == 1
    return cfg.policies[0]


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_documents(text, "mesh.yaml")
    return info.value


def test_full_policy() -> None:
    p = _policy(FULL)
    assert p == AuthorizationPolicy(
        "readers",
        "catalog",
        "ALLOW",
        False,
        (
            PolicyRule(
                (PolicySource(identities=(FRONTEND,)), PolicySource(services=("edge",))),
                (
                    PolicyOperation(
                        ("GET", "HEAD"),
                        (PolicyPath("/items"), PolicyPath("/items/", prefix=True)),
                        (HeaderMatch("x-tenant", "acme"),),
                    ),
                ),
            ),
            PolicyRule(),
        ),
    )


def test_to_dict_shows_policies_and_mesh() -> None:
    text = POLICY + FULL + "---\napiVersion: meshlayer/v1\nkind: Mesh\nmetadata: {name: default}\n"
    text += "spec: {mtls: {mode: permissive}, authorization: {default: deny, dryRun: true}}\n"
    view = load_documents(text, "mesh.yaml").to_dict()
    assert view["mesh"] == {
        "mtls": {"mode": "permissive"},
        "authorization": {"default": "deny", "dryRun": True},
    }
    (policy,) = view["authorizationPolicies"]  # type: ignore[misc]
    assert policy["targetRef"] == {"name": "catalog"}
    assert policy["rules"][0]["to"][0]["paths"] == [{"exact": "/items"}, {"prefix": "/items/"}]
    assert policy["rules"][0]["from"][1] == {"services": ["edge"]}
    assert policy["rules"][1] == {}


def test_mesh_defaults_and_values() -> None:
    assert load_documents("", "x").mesh == MeshSettings("strict", "allow", False)
    mesh = "apiVersion: meshlayer/v1\nkind: Mesh\nmetadata: {name: default}\n"
    assert load_documents(mesh, "x").mesh == MeshSettings()
    cfg = load_documents(mesh + "spec: {authorization: {default: deny}}\n", "x")
    assert cfg.mesh == MeshSettings("strict", "deny", False)


def test_dry_run_and_deny() -> None:
    p = _policy("  targetRef: {name: catalog}\n  action: DENY\n  dryRun: true\n  rules: [{}]\n")
    assert (p.action, p.dry_run, p.rules) == ("DENY", True, (PolicyRule(),))


@pytest.mark.parametrize(
    ("spec", "field", "problem"),
    [
        ("  action: ALLOW\n  rules: [{}]\n", "spec.targetRef", "is required"),
        ("  targetRef: {name: Cat}\n  action: ALLOW\n  rules: [{}]\n", "spec.targetRef.name", ""),
        (
            "  targetRef: {name: c, kind: Pod}\n  action: ALLOW\n  rules: [{}]\n",
            "spec.targetRef.kind",
            "must be Service",
        ),
        ("  targetRef: {name: c}\n  action: allow\n  rules: [{}]\n", "spec.action", "ALLOW"),
        ("  targetRef: {name: c}\n  rules: [{}]\n", "spec.action", "is required"),
        ("  targetRef: {name: c}\n  action: DENY\n", "spec.rules", "at least one rule"),
        ("  targetRef: {name: c}\n  action: DENY\n  rules: [{}]\n  extra: 1\n", "spec.extra", ""),
        (
            "  targetRef: {name: c}\n  action: DENY\n  dryRun: sure\n  rules: [{}]\n",
            "spec.dryRun",
            "",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n"
            "  rules: [{from: [{identities: [frontend]}]}]\n",
            "spec.rules[0].from[0].identities[0]",
            "SPIFFE ID",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n"
            "  rules: [{from: [{identities: ['spiffe://td/ns/default/sa/x/y']}]}]\n",
            "spec.rules[0].from[0].identities[0]",
            "SPIFFE ID",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n  rules: [{from: [{services: [A]}]}]\n",
            "spec.rules[0].from[0].services[0]",
            "service name",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n  rules: [{from: [{}]}]\n",
            "spec.rules[0].from[0]",
            "identities or services",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n  rules: [{from: []}]\n",
            "spec.rules[0].from",
            "must not be empty",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n  rules: [{to: [{methods: [get]}]}]\n",
            "spec.rules[0].to[0].methods[0]",
            "must be one of",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n  rules: [{to: [{}]}]\n",
            "spec.rules[0].to[0]",
            "methods, paths or headers",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n"
            "  rules: [{to: [{paths: [{exact: admin}]}]}]\n",
            "spec.rules[0].to[0].paths[0].exact",
            "must start with '/'",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n  rules: [{to: [{paths: [{prefix: //a}]}]}]\n",
            "spec.rules[0].to[0].paths[0].prefix",
            "normal form '/a'",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n"
            "  rules: [{to: [{paths: [{prefix: /%61dmin}]}]}]\n",
            "spec.rules[0].to[0].paths[0].prefix",
            "normal form '/admin'",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n"
            "  rules: [{to: [{paths: [{prefix: /a%2Fb}]}]}]\n",
            "spec.rules[0].to[0].paths[0].prefix",
            "encoded slash",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n"
            "  rules: [{to: [{paths: [{exact: /a, prefix: /b}]}]}]\n",
            "spec.rules[0].to[0].paths[0]",
            "exactly one of exact or prefix",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n"
            "  rules: [{to: [{paths: [{exact: '/a?x=1'}]}]}]\n",
            "spec.rules[0].to[0].paths[0].exact",
            "without query",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n"
            "  rules: [{to: [{headers: [{name: x-meshlayer-peer-identity, value: v}]}]}]\n",
            "spec.rules[0].to[0].headers[0].name",
            "use 'from'",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n"
            "  rules: [{to: [{headers: [{name: x, value: ' v'}]}]}]\n",
            "spec.rules[0].to[0].headers[0].value",
            "whitespace",
        ),
        (
            "  targetRef: {name: c}\n  action: DENY\n  rules: [{to: [{methods: [GET]}], x: 1}]\n",
            "spec.rules[0].x",
            "unknown field",
        ),
    ],
)
def test_policy_errors(spec: str, field: str, problem: str) -> None:
    err = _error(POLICY + spec)
    assert err.document == DOC
    assert err.field == field
    assert problem in err.problem


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ("metadata: {name: mesh}\n", "metadata.name", "must be 'default'"),
        ("metadata: {name: default}\nspec: {mtls: {mode: mutual}}\n", "spec.mtls.mode", "strict"),
        (
            "metadata: {name: default}\nspec: {authorization: {default: maybe}}\n",
            "spec.authorization.default",
            "allow, deny",
        ),
        (
            "metadata: {name: default}\nspec: {authorization: {dryRun: 1}}\n",
            "spec.authorization.dryRun",
            "true or false",
        ),
        ("metadata: {name: default}\nspec: {tls: {}}\n", "spec.tls", "unknown field"),
    ],
)
def test_mesh_errors(text: str, field: str, problem: str) -> None:
    err = _error("apiVersion: meshlayer/v1\nkind: Mesh\n" + text)
    assert err.field == field
    assert problem in err.problem


def test_one_mesh_only() -> None:
    mesh = "apiVersion: meshlayer/v1\nkind: Mesh\nmetadata: {name: default}\n"
    err = _error(mesh + "---\n" + mesh)
    assert "duplicate Mesh" in err.problem


def test_snapshot_carries_policies_and_mesh() -> None:
    resources = [
        {
            "apiVersion": "meshlayer/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-admin"},
            "spec": {
                "targetRef": {"name": "catalog"},
                "action": "DENY",
                "rules": [{"to": [{"paths": [{"prefix": "/admin"}]}]}],
            },
        },
        {
            "apiVersion": "meshlayer/v1",
            "kind": "Mesh",
            "metadata": {"name": "default"},
            "spec": {"mtls": {"mode": "permissive"}},
        },
    ]
    cfg = config_from_snapshot({"version": 3, "resources": resources}, "cp")
    assert [p.name for p in cfg.policies] == ["deny-admin"]
    assert cfg.mesh.mtls_mode == "permissive"
