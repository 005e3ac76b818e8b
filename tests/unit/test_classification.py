"""``kind: ClassificationRule``: parsing and strict errors, and the compiled classifier.

The classifier runs on real exchanges: a real listener and client connection
(no transport), and request heads from the real parser.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from meshlayer.baggage import stamp_class
from meshlayer.config import ConfigError, Service, load_documents
from meshlayer.config.classification import (
    FORBIDDEN_HEADERS,
    MAX_REGEX_INPUT,
    ClassificationRule,
    FieldCondition,
    PathCondition,
    rule_dict,
    sorted_rules,
)
from meshlayer.config.load import KINDS, parse_documents
from meshlayer.config.priority import merge_defaults
from meshlayer.control.http import HTTPError
from meshlayer.control.resources import canonical_kind, parse_apply
from meshlayer.proxy.classes import ClassTable
from meshlayer.proxy.classify import NO_RULE, Classifier, gateway_path
from meshlayer.proxy.codec import RequestHead
from meshlayer.proxy.codec.request import RequestParser
from meshlayer.proxy.errors import MeshError
from meshlayer.proxy.exchange import WATCHED, Exchange
from meshlayer.proxy.metrics import Metrics
from meshlayer.proxy.runtime import ServiceRuntime, split_target
from meshlayer.proxy.server import DownstreamConnection, Listener

SERVICE = "apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: catalog}\nspec: {}\n"


def rule_doc(name: str, spec: object) -> dict[str, Any]:
    return {
        "apiVersion": "meshlayer/v1",
        "kind": "ClassificationRule",
        "metadata": {"name": name},
        "spec": spec,
    }


def load(*rules: dict[str, Any], strict: bool = True) -> list[ClassificationRule]:
    text = SERVICE + "---\n" + yaml.safe_dump_all(rules)
    return list(load_documents(text, "mesh.yaml", strict_refs=strict).classification_rules)


# -- parsing -------------------------------------------------------------------------


FULL = {
    "priorityClass": "critical",
    "order": 10,
    "match": {
        "paths": [
            {"type": "PathPrefix", "value": "/api"},
            {"type": "Exact", "value": "/login"},
            {"type": "RegularExpression", "value": "/v[0-9]+/.*"},
        ],
        "methods": ["GET", "HEAD"],
        "headers": [
            {"name": "User-Agent", "type": "RegularExpression", "value": ".*bot.*"},
            {"name": "x-tenant", "value": "gold"},
            {"name": "x-beta", "type": "Present"},
        ],
        "queryParams": [{"name": "mode", "value": "batch"}],
        "sourceCIDRs": ["127.0.0.0/8", "::1/128"],
        "identities": ["spiffe://meshlayer.local/ns/default/sa/web"],
        "services": ["catalog"],
    },
}


def test_full_rule_parses() -> None:
    (rule,) = load(rule_doc("interactive", FULL))
    assert rule.name == "interactive"
    assert rule.priority_class == "critical"
    assert rule.order == 10
    m = rule.match
    assert m.paths[0] == PathCondition("PathPrefix", "/api")
    assert m.methods == ("GET", "HEAD")
    assert m.headers[0] == FieldCondition("user-agent", "RegularExpression", ".*bot.*")
    assert m.headers[2] == FieldCondition("x-beta", "Present", "")
    assert m.query_params == (FieldCondition("mode", "Exact", "batch"),)
    assert m.source_cidrs == ("127.0.0.0/8", "::1/128")
    assert m.services == ("catalog",)
    # the admin view speaks the document's language, and says the same again
    view = rule_dict(rule)
    assert view["priorityClass"] == "critical"
    again = load(rule_doc("interactive", {k: v for k, v in view.items() if k != "name"}))
    assert again == [rule]


def test_defaults_and_order() -> None:
    rules = load(
        rule_doc("b", {"priorityClass": "batch"}),
        rule_doc("a", {"priorityClass": "batch"}),
        rule_doc("z", {"priorityClass": "critical", "order": 1}),
    )
    assert rules[0].order == 100 and rules[0].match.paths == ()
    assert [r.name for r in sorted_rules(rules)] == ["z", "a", "b"]


@pytest.mark.parametrize(
    ("spec", "field", "snippet"),
    [
        ({}, "spec.priorityClass", "is required"),
        ({"priorityClass": "Gold"}, "spec.priorityClass", "PriorityClass name"),
        ({"priorityClass": "gold"}, "spec.priorityClass", "names no PriorityClass: 'gold'"),
        ({"priorityClass": "batch", "order": -1}, "spec.order", "between 0 and"),
        ({"priorityClass": "batch", "order": "1"}, "spec.order", "integer"),
        ({"priorityClass": "batch", "weight": 1}, "spec.weight", "unknown field"),
        ({"priorityClass": "batch", "match": {"path": []}}, "spec.match.path", "unknown field"),
        ({"priorityClass": "batch", "match": {"paths": []}}, "spec.match.paths", "not be empty"),
        (
            {"priorityClass": "batch", "match": {"paths": [{"type": "Prefix", "value": "/"}]}},
            "spec.match.paths[0].type",
            "Exact, PathPrefix, RegularExpression",
        ),
        (
            {"priorityClass": "batch", "match": {"paths": [{"value": "api"}]}},
            "spec.match.paths[0].value",
            "must start with '/'",
        ),
        (
            {"priorityClass": "batch", "match": {"paths": [{"value": "/a/../b"}]}},
            "spec.match.paths[0].value",
            "normal form '/b'",
        ),
        (
            {"priorityClass": "batch", "match": {"paths": [{"value": "/a?b=1"}]}},
            "spec.match.paths[0].value",
            "without query",
        ),
        (
            {
                "priorityClass": "batch",
                "match": {"paths": [{"type": "RegularExpression", "value": "/[a-"}]},
            },
            "spec.match.paths[0].value",
            "not a valid regular expression",
        ),
        (
            {"priorityClass": "batch", "match": {"methods": ["get"]}},
            "spec.match.methods[0]",
            "must be one of GET",
        ),
        (  # the parser refuses CONNECT (405) before any rule is tried: a dead rule
            {"priorityClass": "batch", "match": {"methods": ["CONNECT"]}},
            "spec.match.methods[0]",
            "must be one of GET",
        ),
        (
            {"priorityClass": "batch", "match": {"headers": [{"name": "a b", "value": "x"}]}},
            "spec.match.headers[0].name",
            "HTTP header name",
        ),
        (
            {
                "priorityClass": "batch",
                "match": {"headers": [{"name": "X-Meshlayer-Priority", "value": "critical"}]},
            },
            "spec.match.headers[0].name",
            "forge",
        ),
        (
            {
                "priorityClass": "batch",
                "match": {"headers": [{"name": "x-meshlayer-peer-identity", "type": "Present"}]},
            },
            "spec.match.headers[0].name",
            "forge",
        ),
        *(
            (
                {"priorityClass": "batch", "match": {"headers": [{"name": n, "type": "Present"}]}},
                "spec.match.headers[0].name",
                "forge",
            )
            for n in ("baggage", "X-Forwarded-For", "x-meshlayer-source")
        ),
        (
            {"priorityClass": "batch", "match": {"headers": [{"name": "a"}]}},
            "spec.match.headers[0].value",
            "must be a string",
        ),
        (  # a parser strips the edges of a field value: this could never match
            {"priorityClass": "batch", "match": {"headers": [{"name": "a", "value": " gold"}]}},
            "spec.match.headers[0].value",
            "must not start or end with whitespace",
        ),
        (
            {
                "priorityClass": "batch",
                "match": {"headers": [{"name": "a", "type": "RegularExpression", "value": "é+"}]},
            },
            "spec.match.headers[0].value",
            "must be ASCII",
        ),
        (
            {
                "priorityClass": "batch",
                "match": {"headers": [{"name": "a", "type": "Present", "value": "x"}]},
            },
            "spec.match.headers[0].value",
            "left out with type Present",
        ),
        (
            {
                "priorityClass": "batch",
                "match": {"headers": [{"name": "a", "type": "Prefix", "value": "x"}]},
            },
            "spec.match.headers[0].type",
            "Exact, RegularExpression, Present",
        ),
        (
            {
                "priorityClass": "batch",
                "match": {"headers": [{"name": "a", "value": "1"}, {"name": "A", "value": "2"}]},
            },
            "spec.match.headers",
            "twice",
        ),
        (
            {
                "priorityClass": "batch",
                "match": {
                    "queryParams": [{"name": "q", "type": "RegularExpression", "value": "("}]
                },
            },
            "spec.match.queryParams[0].value",
            "not a valid regular expression",
        ),
        (
            {"priorityClass": "batch", "match": {"sourceCIDRs": ["10.0.0.1/8"]}},
            "spec.match.sourceCIDRs[0]",
            "host bits set",
        ),
        (
            {"priorityClass": "batch", "match": {"sourceCIDRs": ["nowhere"]}},
            "spec.match.sourceCIDRs[0]",
            "must be a network",
        ),
        (
            {"priorityClass": "batch", "match": {"identities": ["web"]}},
            "spec.match.identities[0]",
            "SPIFFE ID",
        ),
        (  # as strict as AuthorizationPolicy: the IDs the mesh's CA issues
            {"priorityClass": "batch", "match": {"identities": ["spiffe://td/anything"]}},
            "spec.match.identities[0]",
            "spiffe://<trust-domain>/ns/<namespace>/sa/<service>",
        ),
        (
            {"priorityClass": "batch", "match": {"services": ["Catalog"]}},
            "spec.match.services[0]",
            "service name",
        ),
        (
            {"priorityClass": "batch", "match": {"services": ["cart"]}},
            "spec.match.services[0]",
            "no Service named 'cart'",
        ),
    ],
)
def test_errors_name_the_field(spec: dict[str, Any], field: str, snippet: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(rule_doc("r", spec))
    err = info.value
    assert err.document == "mesh.yaml#2 (ClassificationRule/r)"
    assert err.field == field, err
    assert snippet in err.problem, err


def test_documents_define_classes_for_rules() -> None:
    gold = {
        "apiVersion": "meshlayer/v1",
        "kind": "PriorityClass",
        "metadata": {"name": "gold"},
        "spec": {"rank": 80},
    }
    (rule,) = load(gold, rule_doc("r", {"priorityClass": "gold"}))
    assert rule.priority_class == "gold"


def test_control_plane_documents_may_name_classes_applied_apart() -> None:
    """A store may hold the class (or service) in another apply: not an error there."""
    spec = {"priorityClass": "gold", "match": {"services": ["cart"]}}
    (rule,) = load(rule_doc("r", spec), strict=False)
    assert rule.priority_class == "gold"
    assert parse_documents([rule_doc("r", spec)], "doc", strict_refs=False).classification_rules
    assert "ClassificationRule" in KINDS
    assert canonical_kind("classificationrules") == "ClassificationRule"
    assert len(parse_apply({"documents": [rule_doc("r", spec)]})) == 1
    with pytest.raises(HTTPError) as info:
        parse_apply({"documents": [rule_doc("r", {"priorityClass": "batch", "oder": 1})]})
    assert info.value.status == 400
    assert "spec.oder" in str(info.value)


# -- the classifier ----------------------------------------------------------------


def exchange(
    target: str = "/",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    peer: str = "203.0.113.9",
    identity: str | None = None,
) -> Exchange:
    """A real exchange on a real (unconnected) client connection of a listener."""
    listener = Listener(
        "outbound",
        "gateway",
        Metrics(),
        route=lambda ex: ServiceRuntime(Service("catalog")),
        source_label=lambda v: "gateway",
        destination_label=lambda ex: "catalog",
        header_timeout=5.0,
        idle_timeout=5.0,
    )
    down = DownstreamConnection(listener)
    down.peer_ip = peer.encode()
    down.peer_identity = identity
    fields = "".join(f"{k}: {v}\r\n" for k, v in {"host": "catalog", **(headers or {})}.items())
    raw = f"{method} {target} HTTP/1.1\r\n{fields}\r\n".encode("latin-1")
    heads = [e for e in RequestParser(watch=WATCHED).feed(raw) if isinstance(e, RequestHead)]
    assert len(heads) == 1
    ex = Exchange(down, heads[0])
    ex.authority, ex.path = split_target(heads[0].target)
    ex.path = gateway_path(ex.path)  # as Exchange.start does on a gateway, before routing
    return ex


CLASSES = ClassTable(merge_defaults([]))


def classify(match: dict[str, Any], ex: Exchange, service: str = "catalog") -> str:
    """The class one rule (to ``critical``) gives; ``default`` when it does not match."""
    rules = load(rule_doc("r", {"priorityClass": "critical", "match": match}), strict=False)
    rule, state = Classifier(rules, CLASSES).decide(ex, service, "default")
    assert (rule == "r") == (state.name == "critical")
    return state.name


@pytest.mark.parametrize(
    ("paths", "target", "hit"),
    [
        ([{"value": "/api"}], "/api", True),
        ([{"value": "/api"}], "/api/items?x=1", True),
        ([{"value": "/api/"}], "/api/items", True),
        ([{"value": "/api"}], "/apis", False),
        ([{"value": "/"}], "/anything", True),
        ([{"type": "Exact", "value": "/login"}], "/login?next=/", True),
        ([{"type": "Exact", "value": "/login"}], "/login/", False),
        ([{"type": "RegularExpression", "value": "/v[0-9]+/items"}], "/v2/items", True),
        ([{"type": "RegularExpression", "value": "/v[0-9]+"}], "/v2/items", False),  # whole path
        ([{"value": "/batch"}, {"value": "/api"}], "/api/x", True),  # any of the list
        # the normalised path: /api/../batch is /batch, and not /api
        ([{"value": "/api"}], "/api/../batch", False),
        ([{"value": "/api"}], "//api/./x", True),
        ([{"value": "/api"}], "/%61pi/x", True),
        ([{"value": "/api"}], "http://catalog/api/x", True),  # absolute-form
    ],
)
def test_paths(paths: list[dict[str, str]], target: str, hit: bool) -> None:
    assert classify({"paths": paths}, exchange(target)) == ("critical" if hit else "default")


@pytest.mark.parametrize(
    ("target", "normal"),
    [
        (b"/crawl/../api/x", b"/api/x"),
        (b"/crawl/%2e%2e/api?q=/../x", b"/api?q=/../x"),  # the query travels as sent
        (b"/crawl/.%2E/api", b"/api"),
        (b"//api/./x", b"/api/x"),
        (b"/api", b"/api"),
    ],
)
def test_the_gateway_path_is_the_normal_form(target: bytes, normal: bytes) -> None:
    assert gateway_path(target) == normal


@pytest.mark.parametrize("target", [b"/api%2fx", b"/api%5Cx", b"/a\\b", b"/a%zz"])
def test_unsafe_path_is_refused_like_authorization_does(target: bytes) -> None:
    """Refused whatever the rules: the gateway normalises every path before routing."""
    with pytest.raises(MeshError) as info:
        gateway_path(target)
    assert (info.value.status, info.value.reason) == (400, "bad-path")


def test_methods() -> None:
    m = {"methods": ["POST", "PUT"]}
    assert classify(m, exchange(method="POST")) == "critical"
    assert classify(m, exchange(method="PUT")) == "critical"
    assert classify(m, exchange(method="GET")) == "default"


@pytest.mark.parametrize(
    ("cond", "headers", "hit"),
    [
        ({"name": "x-tenant", "value": "gold"}, {"X-Tenant": "gold"}, True),
        ({"name": "X-Tenant", "value": "gold"}, {"x-tenant": "gold"}, True),
        ({"name": "x-tenant", "value": "gold"}, {"x-tenant": "Gold"}, False),
        ({"name": "x-tenant", "value": "gold"}, {}, False),
        (
            {"name": "user-agent", "type": "RegularExpression", "value": ".*bot.*"},
            {"User-Agent": "Googlebot/2.1"},
            True,
        ),
        (
            {"name": "user-agent", "type": "RegularExpression", "value": "bot"},
            {"User-Agent": "Googlebot/2.1"},
            False,
        ),
        ({"name": "x-beta", "type": "Present"}, {"x-beta": ""}, True),
        ({"name": "x-beta", "type": "Present"}, {"x-other": "1"}, False),
    ],
)
def test_headers(cond: dict[str, str], headers: dict[str, str], hit: bool) -> None:
    got = classify({"headers": [cond]}, exchange(headers=headers))
    assert got == ("critical" if hit else "default")


def test_all_header_conditions_must_hold() -> None:
    m = {"headers": [{"name": "a", "value": "1"}, {"name": "b", "type": "Present"}]}
    assert classify(m, exchange(headers={"a": "1", "b": "x"})) == "critical"
    assert classify(m, exchange(headers={"a": "1"})) == "default"


def test_forbidden_headers_are_the_fields_the_mesh_rewrites() -> None:
    """Every field the exchange rewrites on a hop but the request id and the forwarded
    proto: at the edge the client wrote them, so a rule on one lets it pick its class."""
    rewritten = {n.decode() for n in WATCHED} - {"x-request-id", "x-forwarded-proto"}
    assert rewritten == FORBIDDEN_HEADERS


def test_regular_expressions_never_see_more_than_the_cap() -> None:
    m = {"headers": [{"name": "user-agent", "type": "RegularExpression", "value": ".*bot.*"}]}
    fits = "bot" + "x" * (MAX_REGEX_INPUT - 3)
    assert classify(m, exchange(headers={"user-agent": fits})) == "critical"
    assert classify(m, exchange(headers={"user-agent": fits + "x"})) == "default"
    q = {"queryParams": [{"name": "q", "type": "RegularExpression", "value": "a*"}]}
    assert classify(q, exchange("/?q=" + "a" * MAX_REGEX_INPUT)) == "critical"
    assert classify(q, exchange("/?q=" + "a" * (MAX_REGEX_INPUT + 1))) == "default"


@pytest.mark.parametrize(
    ("cond", "target", "hit"),
    [
        ({"name": "mode", "value": "batch"}, "/?mode=batch", True),
        ({"name": "mode", "value": "batch"}, "/?a=1&mode=batch&b", True),
        ({"name": "mode", "value": "batch"}, "/?mode=interactive", False),
        ({"name": "mode", "value": "batch"}, "/", False),
        ({"name": "mode", "value": "a b"}, "/?mode=a%20b", True),  # percent-decoded
        ({"name": "mode", "value": "a b"}, "/?mode=a+b", True),
        ({"name": "mode", "value": "batch"}, "/?mo%64e=batch", True),  # an escaped name
        ({"name": "mode", "value": "batch"}, "/?x=mode", False),  # the name, but as a value
        ({"name": "mode", "value": "batch"}, "/?mode=x&mode=batch", True),  # any value
        ({"name": "a b", "type": "Present"}, "/?a+b=1", True),
        ({"name": "debug", "type": "Present"}, "/?debug", True),
        ({"name": "page", "type": "RegularExpression", "value": "[0-9]+"}, "/?page=12", True),
        ({"name": "page", "type": "RegularExpression", "value": "[0-9]+"}, "/?page=1x", False),
    ],
)
def test_query_params(cond: dict[str, str], target: str, hit: bool) -> None:
    got = classify({"queryParams": [cond]}, exchange(target))
    assert got == ("critical" if hit else "default")


@pytest.mark.parametrize(
    ("cidrs", "peer", "hit"),
    [
        (["10.0.0.0/8"], "10.1.2.3", True),
        (["10.0.0.0/8"], "11.1.2.3", False),
        (["10.0.0.0/8", "192.168.0.0/16"], "192.168.7.7", True),
        (["10.0.0.0/8"], "::ffff:10.1.2.3", True),  # a dual-stack listener's IPv4 peer
        (["2001:db8::/32"], "2001:db8::1", True),
        (["2001:db8::/32"], "10.1.2.3", False),
        (["10.0.0.0/8"], "unknown", False),
    ],
)
def test_source_cidrs(cidrs: list[str], peer: str, hit: bool) -> None:
    got = classify({"sourceCIDRs": cidrs}, exchange(peer=peer))
    assert got == ("critical" if hit else "default")


def test_source_is_the_peer_never_x_forwarded_for() -> None:
    ex = exchange(peer="203.0.113.9", headers={"x-forwarded-for": "10.0.0.1"})
    assert classify({"sourceCIDRs": ["10.0.0.0/8"]}, ex) == "default"


def test_the_peer_is_parsed_once_per_address() -> None:
    rules = load(
        rule_doc("r", {"priorityClass": "critical", "match": {"sourceCIDRs": ["10.0.0.0/8"]}})
    )
    c = Classifier(rules, CLASSES)
    for peer, want in (("10.0.0.1", "critical"), ("11.0.0.1", "default"), ("10.0.0.1", "critical")):
        assert c.decide(exchange(peer=peer), "catalog", "default")[1].name == want
    assert c._peers == {b"10.0.0.1": (4, 0x0A000001), b"11.0.0.1": (4, 0x0B000001)}


def test_identities_need_a_verified_certificate() -> None:
    web = "spiffe://meshlayer.local/ns/default/sa/web"
    m = {"identities": [web]}
    assert classify(m, exchange(identity=web)) == "critical"
    assert classify(m, exchange(identity="spiffe://meshlayer.local/ns/default/sa/x")) == "default"
    assert classify(m, exchange(identity=None)) == "default"  # plaintext: never
    forged = exchange(headers={"x-meshlayer-peer-identity": web, "x-forwarded-client-cert": web})
    assert classify(m, forged) == "default"


def test_identity_rules_are_left_out_on_a_plaintext_listener(
    caplog: pytest.LogCaptureFixture,
) -> None:
    web = "spiffe://meshlayer.local/ns/default/sa/web"
    rules = load(
        rule_doc("by-id", {"priorityClass": "critical", "match": {"identities": [web]}}),
        rule_doc("rest", {"priorityClass": "batch"}),
    )
    assert [r.name for r in Classifier(rules, CLASSES).rules] == ["by-id", "rest"]
    plain = Classifier(rules, CLASSES, mtls=False)
    assert [r.name for r in plain.rules] == ["rest"]
    assert "by-id matches identities" in caplog.text
    assert plain.decide(exchange(identity=web), "catalog", "default")[0] == "rest"


def test_services_after_routing() -> None:
    m = {"services": ["catalog", "cart"]}
    assert classify(m, exchange(), service="cart") == "critical"
    assert classify(m, exchange(), service="payment") == "default"


def test_every_condition_of_a_rule_must_hold() -> None:
    m = {"methods": ["GET"], "paths": [{"value": "/api"}], "sourceCIDRs": ["10.0.0.0/8"]}
    assert classify(m, exchange("/api", peer="10.0.0.1")) == "critical"
    assert classify(m, exchange("/api", peer="11.0.0.1")) == "default"
    assert classify(m, exchange("/web", peer="10.0.0.1")) == "default"
    assert classify(m, exchange("/api", method="POST", peer="10.0.0.1")) == "default"
    assert classify({}, exchange("/anything")) == "critical"  # no conditions: every request


def test_first_rule_by_order_then_name_wins_else_the_service_default() -> None:
    rules = load(
        rule_doc("b-api", {"priorityClass": "critical", "match": {"paths": [{"value": "/api"}]}}),
        rule_doc("a-api", {"priorityClass": "default", "match": {"paths": [{"value": "/api"}]}}),
        rule_doc(
            "bots",
            {
                "priorityClass": "batch",
                "order": 5,
                "match": {"headers": [{"name": "user-agent", "type": "Present"}]},
            },
        ),
    )
    c = Classifier(rules, CLASSES)
    assert [r.name for r in c.rules] == ["bots", "a-api", "b-api"]
    assert c.decide(exchange("/api", headers={"user-agent": "x"}), "catalog", "default") == (
        "bots",
        CLASSES.by_name["batch"],
    )
    assert c.decide(exchange("/api"), "catalog", "default")[0] == "a-api"
    assert c.decide(exchange("/web"), "catalog", "batch") == (NO_RULE, CLASSES.by_name["batch"])
    # a default that names no class (a control plane's store may lack it): `default`
    assert c.decide(exchange("/web"), "catalog", "gold") == (NO_RULE, CLASSES.by_name["default"])


def test_plans_keep_the_rules_a_method_and_service_leave() -> None:
    """Per (method, service): the rules that can still match, cut after the first one
    without other conditions; a method no rule names shares one plan."""
    rules = load(
        rule_doc(
            "writes", {"priorityClass": "critical", "order": 1, "match": {"methods": ["POST"]}}
        ),
        rule_doc(
            "api",
            {"priorityClass": "critical", "order": 2, "match": {"paths": [{"value": "/api"}]}},
        ),
        rule_doc(
            "to-cart", {"priorityClass": "batch", "order": 3, "match": {"services": ["cart"]}}
        ),
        rule_doc(
            "bots",
            {
                "priorityClass": "batch",
                "order": 4,
                "match": {"headers": [{"name": "ua", "type": "Present"}]},
            },
        ),
        strict=False,
    )
    c = Classifier(rules, CLASSES)
    assert c.decide(exchange("/web", method="POST"), "catalog", "default")[0] == "writes"
    assert c.decide(exchange("/api"), "cart", "default")[0] == "api"
    assert c.decide(exchange("/web", headers={"ua": "x"}), "cart", "default")[0] == "to-cart"
    assert c.decide(exchange("/web", headers={"ua": "x"}), "catalog", "default")[0] == "bots"
    assert c.decide(exchange("/web", method="PATCH"), "catalog", "default")[0] == NO_RULE
    plans = {k: [r.name for r in p.rules] for k, p in c._plans.items()}
    assert plans == {
        (b"POST", "catalog"): ["writes"],
        (b"", "cart"): ["api", "to-cart"],
        (b"", "catalog"): ["api", "bots"],
    }
    assert c._plans[(b"", "catalog")].header_names == {b"ua"}


def test_rule_naming_an_unknown_class_classifies_as_default() -> None:
    (rule,) = load(rule_doc("r", {"priorityClass": "gold"}), strict=False)
    assert Classifier([rule], CLASSES).decide(exchange(), "catalog", "batch") == (
        "r",
        CLASSES.by_name["default"],
    )


def test_the_hook_counts_each_decision() -> None:
    registry = CollectorRegistry()
    counter = Counter("meshlayer_gateway_classified", "t", ["rule", "priority"], registry=registry)
    rules = load(
        rule_doc("api", {"priorityClass": "critical", "match": {"paths": [{"value": "/api"}]}})
    )
    c = Classifier(rules, CLASSES, counter)
    batchy = ServiceRuntime(Service("catalog", priority_class="batch"))
    assert c(exchange("/api/1"), batchy, batchy.service).name == "critical"
    assert c(exchange("/api/2"), batchy, batchy.service).name == "critical"
    assert c(exchange("/web"), batchy, batchy.service).name == "batch"

    def value(rule: str, prio: str) -> float | None:
        return registry.get_sample_value(
            "meshlayer_gateway_classified_total", {"rule": rule, "priority": prio}
        )

    assert value("api", "critical") == 2
    assert value("none", "batch") == 1
    assert value("none", "default") is None
    assert c.series() == {("api", "critical"), ("none", "batch")}


@pytest.mark.parametrize(
    ("value", "out"),
    [
        (b"meshlayer-priority=critical", b"meshlayer-priority=batch"),
        (b"a=1, meshlayer-priority=critical;p=2,b=3", b"a=1,meshlayer-priority=batch;p=2,b=3"),
        (b"meshlayer-priority =critical", b"meshlayer-priority=batch"),
        (b"a=1,b=2", b"a=1,b=2,meshlayer-priority=batch"),  # started when absent
        (None, b"meshlayer-priority=batch"),
        (b"xmeshlayer-priority=critical", b"xmeshlayer-priority=critical,meshlayer-priority=batch"),
    ],
)
def test_stamp_class_in_baggage(value: bytes | None, out: bytes) -> None:
    assert stamp_class(value, b"batch") == out
    assert CLASSES.read({b"baggage": out}) is CLASSES.by_name["batch"]
