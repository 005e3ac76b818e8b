"""The matching primitives routing, authorization and classification share, and that the
three stages agree on them (a prefix with a trailing ``/``, header names and values)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlayer.config import load_documents
from meshlayer.proxy.authz import compile_policies
from meshlayer.proxy.classes import ClassTable
from meshlayer.proxy.classify import Classifier
from meshlayer.proxy.match import header_map, segment_prefix, under
from meshlayer.proxy.routes import compile_routes
from tests.unit.test_classification import exchange

SEGMENT = st.text(alphabet="ab/", max_size=8)


@pytest.mark.parametrize(
    ("path", "prefix", "hit"),
    [
        (b"/api", b"/api", True),
        (b"/api/", b"/api", True),
        (b"/api/x", b"/api", True),
        (b"/apix", b"/api", False),
        (b"/ap", b"/api", False),
        (b"/api", b"/api/", True),  # a trailing "/" is ignored
        (b"/anything", b"/", True),  # the prefix "/" covers every path
        (b"/", b"/", True),
    ],
)
def test_under_whole_segments(path: bytes, prefix: bytes, hit: bool) -> None:
    assert under(path, segment_prefix(prefix)) is hit


@given(SEGMENT, SEGMENT)
def test_under_is_equality_or_a_deeper_segment(tail: str, prefix: str) -> None:
    path = ("/" + tail).encode()
    p = segment_prefix(("/" + prefix).encode())
    assert under(path, p) == (path == p or path.startswith(p + b"/"))


def test_header_map_lowercases_names_and_strips_values() -> None:
    headers = [(b"X-Tenant", b" acme\t"), (b"x-tenant", b"b"), (b"Accept", b"*/*")]
    assert header_map(headers) == {b"x-tenant": [b"acme", b"b"], b"accept": [b"*/*"]}


def test_the_three_stages_agree_on_a_prefix_with_a_trailing_slash() -> None:
    """Routed to /items/ by an HTTPRoute, authorised by an AuthorizationPolicy on /items/
    and classified by a rule on /items/: the same paths, every time."""
    cfg = load_documents(
        "apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: catalog}\nspec: {}\n---\n"
        "apiVersion: meshlayer/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n"
        "  parentRefs: [{name: catalog}]\n"
        "  rules: [{matches: [{path: {type: PathPrefix, value: /items/}}]}]\n---\n"
        "apiVersion: meshlayer/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n"
        "  targetRef: {name: catalog}\n  action: ALLOW\n"
        "  rules: [{to: [{paths: [{prefix: /items/}]}]}]\n---\n"
        "apiVersion: meshlayer/v1\nkind: ClassificationRule\nmetadata: {name: c}\nspec:\n"
        "  priorityClass: critical\n  match: {paths: [{value: /items/}]}\n",
        "t.yaml",
    )
    routes = compile_routes(cfg.routes, cfg.services, lambda name: name)["catalog"]
    authz = compile_policies(cfg.policies, cfg.mesh)["catalog"]
    classes = ClassTable(cfg.priority_classes)
    rules = Classifier(cfg.classification_rules, classes)
    for path, hit in (("/items", True), ("/items/", True), ("/items/1", True), ("/itemsx", False)):
        routed = routes.match(b"GET", path.encode(), []) is not None
        allowed = authz.check(b"GET", path.encode(), [], None)[0] is None
        classified = rules.decide(exchange(path), "catalog", "default")[0] == "c"
        assert (routed, allowed, classified) == (hit, hit, hit), path
