"""``kind: HTTPRoute`` in the config loader: the typed result, and errors that name
document, field and problem; cross-references checked for static files only."""

from __future__ import annotations

import pytest

from meshlayer.config import (
    BackendRef,
    ConfigError,
    HeaderMatch,
    HTTPRoute,
    PathMatch,
    RouteMatch,
    RouteRetry,
    RouteRule,
    load_documents,
    load_file,
    parse_documents,
)

SERVICES = "".join(
    f"apiVersion: meshlayer/v1\nkind: Service\nmetadata: {{name: {n}}}\nspec: {{}}\n---\n"
    for n in ("catalog", "catalog-v1", "catalog-v2")
)
ROUTE = "apiVersion: meshlayer/v1\nkind: HTTPRoute\nmetadata: {name: canary}\nspec:\n"
DOC = "mesh.yaml#4 (HTTPRoute/canary)"
PARENT = "  parentRefs: [{name: catalog}]\n"


def _route(spec: str) -> HTTPRoute:
    cfg = load_documents(SERVICES + ROUTE + spec, "mesh.yaml")
    assert len(cfg.routes) == 1
    return cfg.routes[0]


def _error(spec: str, text: str = SERVICES + ROUTE, **kw: bool) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_documents(text + spec, "mesh.yaml", **kw)
    return info.value


def test_the_full_shape() -> None:
    route = _route(
        """\
  parentRefs: [{name: catalog, kind: Service}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /items}
      headers: [{name: X-Canary, value: "1", type: Exact}]
      method: GET
    - path: {type: Exact, value: /health}
    backendRefs:
    - {name: catalog-v1, weight: 90}
    - {name: catalog-v2, weight: 10, kind: Service}
    timeouts: {request: 2s}
    retry: {attempts: 1, codes: [503, 502]}
  - backendRefs: [{name: catalog-v1}]
"""
    )
    assert route == HTTPRoute(
        "canary",
        ("catalog",),
        (
            RouteRule(
                (
                    RouteMatch(
                        PathMatch("PathPrefix", "/items"), (HeaderMatch("x-canary", "1"),), "GET"
                    ),
                    RouteMatch(PathMatch("Exact", "/health")),
                ),
                (BackendRef("catalog-v1", 90), BackendRef("catalog-v2", 10)),
                2.0,
                RouteRetry(1, (503, 502)),
            ),
            RouteRule(backend_refs=(BackendRef("catalog-v1", 1),)),
        ),
    )


def test_defaults() -> None:
    route = _route(PARENT + "  rules:\n  - matches: [{}]\n  - {matches: []}\n")
    assert route.rules == (RouteRule(), RouteRule())
    assert route.rules[0].matches == (RouteMatch(PathMatch("PathPrefix", "/"), (), None),)
    assert _route(PARENT).rules == (RouteRule(),)  # no rules: everything to the parent
    partial = _route(PARENT + "  rules:\n  - retry: {codes: [504]}\n    timeouts: {}\n")
    assert partial.rules[0].retry == RouteRetry(None, (504,))
    assert partial.rules[0].request_timeout is None


def test_routes_are_in_the_config_and_its_view() -> None:
    cfg = load_documents(
        SERVICES + ROUTE + PARENT + "  rules: [{backendRefs: [{name: catalog-v2, weight: 3}]}]\n",
        "mesh.yaml",
    )
    view = cfg.to_dict()
    assert view["routes"] == [
        {
            "name": "canary",
            "parentRefs": [{"name": "catalog"}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}, "headers": []}],
                    "backendRefs": [{"name": "catalog-v2", "weight": 3}],
                }
            ],
        }
    ]
    assert load_documents(SERVICES, "m.yaml").routes == ()


def test_a_route_and_a_service_may_share_a_name_but_two_routes_may_not() -> None:
    text = SERVICES + ROUTE.replace("canary", "catalog") + PARENT
    assert [r.name for r in load_documents(text, "m.yaml").routes] == ["catalog"]
    err = _error("---\n" + ROUTE + PARENT, SERVICES + ROUTE + PARENT)
    assert (err.document, err.field) == ("mesh.yaml#5 (HTTPRoute/canary)", "metadata.name")
    assert err.problem == "duplicate HTTPRoute 'canary'"


def test_resource_version_is_accepted_on_every_kind() -> None:
    text = (
        SERVICES.replace("{name: catalog}", "{name: catalog, resourceVersion: 17}")
        + ROUTE.replace("{name: canary}", "{name: canary, resourceVersion: 0}")
        + PARENT
    )
    assert load_documents(text, "m.yaml").routes[0].name == "canary"
    for bad in ("-1", "'7'", "1.5", "true"):
        err = _error(
            PARENT,
            SERVICES + ROUTE.replace("canary}", f"canary, resourceVersion: {bad}}}"),
        )
        assert (err.document, err.field) == ("mesh.yaml#4", "metadata.resourceVersion")
        assert "must be an integer >= 0" in err.problem


@pytest.mark.parametrize(
    ("spec", "field", "problem"),
    [
        ("  rules: []\n", "spec.parentRefs", "must name at least one Service"),
        ("  parentRefs: []\n", "spec.parentRefs", "must name at least one Service"),
        ("  parentRefs: {name: catalog}\n", "spec.parentRefs", "must be a list"),
        ("  parentRefs: [catalog]\n", "spec.parentRefs[0]", "must be a mapping, got a string"),
        ("  parentRefs: [{}]\n", "spec.parentRefs[0].name", "is required"),
        ("  parentRefs: [{name: Catalog}]\n", "spec.parentRefs[0].name", "lowercase DNS name"),
        (
            "  parentRefs: [{name: catalog, kind: Gateway}]\n",
            "spec.parentRefs[0].kind",
            "must be Service, got 'Gateway'",
        ),
        ("  parentRefs: [{name: catalog, port: 80}]\n", "spec.parentRefs[0].port", "unknown field"),
        ("  parentRefs: [{name: catalog}, {name: catalog}]\n", "spec.parentRefs", "twice"),
        (PARENT + "  hostnames: [x]\n", "spec.hostnames", "unknown field"),
        (PARENT + "  rules: {}\n", "spec.rules", "must be a list, got a mapping"),
        (PARENT + "  rules: [{filters: []}]\n", "spec.rules[0].filters", "unknown field"),
        (
            PARENT + "  rules: [{}, {matches: [{path: {type: RegularExpression, value: /a}}]}]\n",
            "spec.rules[1].matches[0].path.type",
            "must be one of PathPrefix, Exact, got 'RegularExpression'",
        ),
        (
            PARENT + "  rules: [{matches: [{path: {value: items}}]}]\n",
            "spec.rules[0].matches[0].path.value",
            "must start with '/', got 'items'",
        ),
        (
            PARENT + "  rules: [{matches: [{path: {value: ''}}]}]\n",
            "spec.rules[0].matches[0].path.value",
            "non-empty string",
        ),
        (
            PARENT + "  rules: [{matches: [{path: {value: '/a//b'}}]}]\n",
            "spec.rules[0].matches[0].path.value",
            "must not contain '//'",
        ),
        (
            PARENT + "  rules: [{matches: [{path: {value: '/a/../b'}}]}]\n",
            "spec.rules[0].matches[0].path.value",
            "must not contain '/../'",
        ),
        (
            PARENT + "  rules: [{matches: [{path: {value: '/a?b=1'}}]}]\n",
            "spec.rules[0].matches[0].path.value",
            "must not contain '?'",
        ),
        (
            PARENT + "  rules: [{matches: [{path: {value: '/a b'}}]}]\n",
            "spec.rules[0].matches[0].path.value",
            "printable ASCII without spaces",
        ),
        (
            PARENT + "  rules: [{matches: [{path: {value: '/a/..'}}]}]\n",
            "spec.rules[0].matches[0].path.value",
            "must not end in",
        ),
        (
            PARENT + "  rules: [{matches: [{path: {value: /a, kind: x}}]}]\n",
            "spec.rules[0].matches[0].path.kind",
            "unknown field",
        ),
        (
            PARENT + "  rules: [{matches: [{method: get}]}]\n",
            "spec.rules[0].matches[0].method",
            "must be one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH, "
            "got 'get'",
        ),
        (
            PARENT + "  rules: [{matches: [{headers: [{name: x-a}]}]}]\n",
            "spec.rules[0].matches[0].headers[0].value",
            "must be a string",
        ),
        (
            PARENT + "  rules: [{matches: [{headers: [{name: x-a, value: 1}]}]}]\n",
            "spec.rules[0].matches[0].headers[0].value",
            "must be a string",
        ),
        (
            PARENT + "  rules: [{matches: [{headers: [{name: 'x a', value: '1'}]}]}]\n",
            "spec.rules[0].matches[0].headers[0].name",
            "must be an HTTP header name",
        ),
        (
            PARENT + '  rules: [{matches: [{headers: [{name: x-a, value: "a\\nb"}]}]}]\n',
            "spec.rules[0].matches[0].headers[0].value",
            "valid as a header value",
        ),
        (
            PARENT + "  rules: [{matches: [{headers: [{name: x-a, value: ' a'}]}]}]\n",
            "spec.rules[0].matches[0].headers[0].value",
            "whitespace",
        ),
        (
            PARENT + "  rules: [{matches: [{headers: [{name: x-a, value: a, type: Regex}]}]}]\n",
            "spec.rules[0].matches[0].headers[0].type",
            "must be Exact",
        ),
        (
            PARENT
            + "  rules: [{matches: [{headers: [{name: x-a, value: a}, {name: X-A, value: b}]}]}]\n",
            "spec.rules[0].matches[0].headers",
            "names a header twice",
        ),
        (
            PARENT + "  rules: [{matches: [{queryParams: []}]}]\n",
            "spec.rules[0].matches[0].queryParams",
            "unknown field",
        ),
        (
            PARENT + "  rules: [{backendRefs: [{name: catalog-v1, weight: -1}]}]\n",
            "spec.rules[0].backendRefs[0].weight",
            "must be an integer between 0 and 1000000, got -1",
        ),
        (
            PARENT + "  rules: [{backendRefs: [{name: catalog-v1, weight: 1000001}]}]\n",
            "spec.rules[0].backendRefs[0].weight",
            "between 0 and 1000000",
        ),
        (
            PARENT + "  rules: [{backendRefs: [{name: catalog-v1, weight: 0.5}]}]\n",
            "spec.rules[0].backendRefs[0].weight",
            "must be an integer",
        ),
        (
            PARENT + "  rules: [{backendRefs: [{name: catalog-v1, weight: 0}]}]\n",
            "spec.rules[0].backendRefs",
            "at least one backendRef needs a weight above 0",
        ),
        (
            PARENT + "  rules: [{backendRefs: [{name: catalog-v1}, {name: catalog-v1}]}]\n",
            "spec.rules[0].backendRefs",
            "names a service twice",
        ),
        (
            PARENT + "  rules: [{backendRefs: [{name: catalog-v1, port: 80}]}]\n",
            "spec.rules[0].backendRefs[0].port",
            "unknown field",
        ),
        (
            PARENT + "  rules: [{backendRefs: [{weight: 1}]}]\n",
            "spec.rules[0].backendRefs[0].name",
            "is required",
        ),
        (
            PARENT + "  rules: [{timeouts: {request: 0s}}]\n",
            "spec.rules[0].timeouts.request",
            "must be positive",
        ),
        (
            PARENT + "  rules: [{timeouts: {request: soon}}]\n",
            "spec.rules[0].timeouts.request",
            "must be a duration",
        ),
        (
            PARENT + "  rules: [{timeouts: {backendRequest: 1s}}]\n",
            "spec.rules[0].timeouts.backendRequest",
            "unknown field",
        ),
        (
            PARENT + "  rules: [{retry: {attempts: -1}}]\n",
            "spec.rules[0].retry.attempts",
            "must be an integer >= 0",
        ),
        (
            PARENT + "  rules: [{retry: {codes: [404]}}]\n",
            "spec.rules[0].retry.codes",
            "must be a list of 5xx statuses, got [404]",
        ),
        (
            PARENT + "  rules: [{retry: {codes: 503}}]\n",
            "spec.rules[0].retry.codes",
            "must be a list of 5xx statuses",
        ),
        (
            PARENT + "  rules: [{retry: {backoff: 1s}}]\n",
            "spec.rules[0].retry.backoff",
            "unknown field",
        ),
    ],
)
def test_spec_errors(spec: str, field: str, problem: str) -> None:
    err = _error(spec)
    assert err.document == DOC
    assert err.field == field
    assert problem in err.problem, err.problem
    assert str(err).startswith(f"{DOC}: {field}: ")


@pytest.mark.parametrize(
    ("spec", "field", "name"),
    [
        ("  parentRefs: [{name: catalog}, {name: orders}]\n", "spec.parentRefs[1].name", "orders"),
        (
            PARENT + "  rules: [{}, {backendRefs: [{name: catalog-v1}, {name: catalog-v3}]}]\n",
            "spec.rules[1].backendRefs[1].name",
            "catalog-v3",
        ),
    ],
)
def test_references_to_undefined_services(spec: str, field: str, name: str) -> None:
    err = _error(spec)
    assert (err.document, err.field) == (DOC, field)
    assert err.problem == f"no Service named {name!r}"
    # The control plane's registry may supply the service later: not an error there.
    cfg = load_documents(SERVICES + ROUTE + spec, "cp", strict_refs=False)
    assert cfg.routes[0].name == "canary"
    services, routes, classes, policies, _mesh, _rules = parse_documents([], "cp")
    assert (services, routes, classes, policies) == ([], [], [], [])


def test_a_reference_may_point_to_a_service_defined_later_in_the_file() -> None:
    text = ROUTE + PARENT + "---\n" + SERVICES
    assert load_documents(text, "m.yaml").routes[0].parent_refs == ("catalog",)


def test_load_file_checks_references(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "mesh.yaml"
    path.write_text(ROUTE + PARENT)
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert info.value.document == "mesh.yaml#1 (HTTPRoute/canary)"
    assert info.value.field == "spec.parentRefs[0].name"


def test_parse_documents_returns_services_and_routes() -> None:
    docs = [
        {"apiVersion": "meshlayer/v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {}},
        {
            "apiVersion": "meshlayer/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "r", "resourceVersion": 42},
            "spec": {"parentRefs": [{"name": "a"}], "rules": [{"backendRefs": [{"name": "b"}]}]},
        },
    ]
    parsed = parse_documents(docs, "cp v42", strict_refs=False)
    assert [s.name for s in parsed.services] == ["a"]
    assert parsed.routes[0].rules[0].backend_refs == (BackendRef("b", 1),)
    with pytest.raises(ConfigError) as info:
        parse_documents(docs, "cp v42")
    assert str(info.value) == (
        "cp v42#2 (HTTPRoute/r): spec.rules[0].backendRefs[0].name: no Service named 'b'"
    )
