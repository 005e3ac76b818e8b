"""The routing stage: match precedence, path segments, headers, methods, weights."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlayer.config import MeshConfig, Service, load_documents
from meshlayer.proxy.errors import MeshError
from meshlayer.proxy.routes import ServiceRoutes, WeightedChoice, compile_routes
from meshlayer.proxy.runtime import Router

SERVICES = "".join(
    f"---\napiVersion: meshlayer/v1\nkind: Service\nmetadata: {{name: {n}}}\nspec: {{}}\n"
    for n in ("catalog", "a", "b", "c", "d", "e")
)


def _config(*routes: str) -> MeshConfig:
    docs = "".join(
        f"---\napiVersion: meshlayer/v1\nkind: HTTPRoute\nmetadata: {{name: r{i}}}\n"
        f"spec:\n  parentRefs: [{{name: catalog}}]\n{body}"
        for i, body in enumerate(routes)
    )
    return load_documents(SERVICES + docs, "routes.yaml")


def _table(*routes: str) -> ServiceRoutes[str]:
    cfg = _config(*routes)
    return compile_routes(cfg.routes, cfg.services, lambda name: name)["catalog"]


def _to(
    table: ServiceRoutes[str],
    path: str,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> str | None:
    """The backend a request goes to, or None for 404."""
    try:
        backend, _conf = table.select(method.encode(), path.encode(), headers or [])
    except MeshError as err:
        assert err.status == 404 and err.reason == "no-route"
        return None
    return backend


def _rule(backend: str, match: str = "") -> str:
    """A rule (YAML under ``rules:``) sending ``match`` to one backend."""
    matches = f"    matches:\n{match}" if match else ""
    return f"  - backendRefs: [{{name: {backend}}}]\n{matches}"


# -- paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/items", "a"),
        ("/items/", "a"),
        ("/items/1", "a"),
        ("/items/1/2?x=/", "a"),
        ("/items?q=1", "a"),
        ("/itemsx", None),
        ("/item", None),
        ("/", None),
        ("/other/items", None),
    ],
)
def test_prefix_matches_whole_segments(path: str, expected: str | None) -> None:
    table = _table("  rules:\n" + _rule("a", "    - path: {type: PathPrefix, value: /items}\n"))
    assert _to(table, path) == expected


_SEGMENT = st.text(alphabet="ab.-", min_size=1, max_size=3).filter(lambda s: s not in (".", ".."))


@given(
    prefix=st.lists(_SEGMENT, min_size=1, max_size=3),
    path=st.lists(st.text(alphabet="ab.-", max_size=3), max_size=4),
    slash=st.booleans(),
)
def test_prefix_match_is_segment_by_segment(
    prefix: list[str], path: list[str], slash: bool
) -> None:
    value = "/" + "/".join(prefix) + ("/" if slash else "")
    target = "/" + "/".join(path)
    table = _TABLES.get(value) or _TABLES.setdefault(
        value, _table("  rules:\n" + _rule("a", f"    - path: {{value: '{value}'}}\n"))
    )
    expected = target.split("/")[1:][: len(prefix)] == prefix
    assert (_to(table, target) == "a") == expected, (value, target)


_TABLES: dict[str, ServiceRoutes[str]] = {}


def test_trailing_slash_of_a_prefix_is_ignored() -> None:
    table = _table("  rules:\n" + _rule("a", "    - path: {value: /items/}\n"))
    assert _to(table, "/items") == "a"
    assert _to(table, "/items/9") == "a"
    assert _to(table, "/itemsx") is None


def test_root_prefix_and_no_matches_match_everything() -> None:
    root = _table("  rules:\n" + _rule("a", "    - path: {value: /}\n"))
    none = _table("  rules:\n" + _rule("a"))
    empty = _table("  rules:\n  - {matches: [], backendRefs: [{name: a}]}\n")
    for table in (root, none, empty):
        for path in ("/", "/x", "/x/y?z", "*"):
            assert _to(table, path) == "a", (table, path)


def test_exact_matches_only_the_path() -> None:
    table = _table("  rules:\n" + _rule("a", "    - path: {type: Exact, value: /items}\n"))
    assert _to(table, "/items") == "a"
    assert _to(table, "/items?page=2") == "a"  # the query is not part of the path
    assert _to(table, "/items/") is None
    assert _to(table, "/items/1") is None


def test_absolute_path_segments_are_compared_as_sent() -> None:
    table = _table("  rules:\n" + _rule("a", "    - path: {value: /Items}\n"))
    assert _to(table, "/Items/1") == "a"
    assert _to(table, "/items/1") is None  # case-sensitive, as in the Gateway API


# -- precedence ----------------------------------------------------------------------


def test_exact_beats_any_prefix_and_longer_prefix_beats_shorter() -> None:
    table = _table(
        "  rules:\n"
        + _rule("a", "    - path: {value: /}\n")
        + _rule("b", "    - path: {value: /items}\n")
        + _rule("c", "    - path: {value: /items/special}\n")
        + _rule("d", "    - path: {type: Exact, value: /items/special/x}\n")
    )
    assert _to(table, "/") == "a"
    assert _to(table, "/itemsz") == "a"
    assert _to(table, "/items/1") == "b"
    assert _to(table, "/items/special") == "c"
    assert _to(table, "/items/special/x") == "d"
    assert _to(table, "/items/special/x/y") == "c"


def test_method_then_header_count_then_order() -> None:
    table = _table(
        "  rules:\n"
        + _rule("a", "    - path: {value: /items}\n")
        + _rule("b", "    - path: {value: /items}\n      headers: [{name: x-v, value: '2'}]\n")
        + _rule(
            "c",
            "    - path: {value: /items}\n"
            "      headers: [{name: x-v, value: '2'}, {name: x-w, value: '1'}]\n",
        )
        + _rule("d", "    - path: {value: /items}\n      method: POST\n")
        + _rule("e", "    - path: {value: /items}\n      method: POST\n")  # shadowed by d
    )
    assert _to(table, "/items") == "a"
    assert _to(table, "/items", headers=[(b"X-V", b"2")]) == "b"
    assert _to(table, "/items", headers=[(b"x-w", b"1"), (b"x-v", b"2")]) == "c"
    assert _to(table, "/items", "POST", headers=[(b"x-w", b"1"), (b"x-v", b"2")]) == "d"
    assert _to(table, "/items", "PUT") == "a"


def test_a_longer_prefix_wins_over_a_method_match() -> None:
    table = _table(
        "  rules:\n"
        + _rule("a", "    - path: {value: /items}\n      method: GET\n")
        + _rule("b", "    - path: {value: /items/new}\n")
    )
    assert _to(table, "/items/new", "GET") == "b"
    assert _to(table, "/items/old", "GET") == "a"


def test_ties_across_routes_go_by_route_name_then_rule_order() -> None:
    # r0 and r1 both send /items; r0 sorts first whatever the document order.
    cfg = load_documents(
        SERVICES + "---\napiVersion: meshlayer/v1\nkind: HTTPRoute\nmetadata: {name: zz}\n"
        "spec:\n  parentRefs: [{name: catalog}]\n  rules:\n"
        + _rule("b")
        + _rule("c")
        + "---\napiVersion: meshlayer/v1\nkind: HTTPRoute\nmetadata: {name: aa}\n"
        "spec:\n  parentRefs: [{name: catalog}]\n  rules:\n" + _rule("a"),
        "m.yaml",
    )
    table = compile_routes(cfg.routes, cfg.services, lambda n: n)["catalog"]
    assert _to(table, "/x") == "a"
    assert [e.where for e in table.entries] == [
        "aa.rules[0].matches[0]",
        "zz.rules[0].matches[0]",
        "zz.rules[1].matches[0]",
    ]


def test_matches_of_a_rule_are_ored_and_parts_of_a_match_anded() -> None:
    table = _table(
        "  rules:\n"
        + _rule(
            "a",
            "    - {path: {value: /a}, method: GET}\n"
            "    - {path: {value: /b}, headers: [{name: x-k, value: v}]}\n",
        )
    )
    assert _to(table, "/a/1") == "a"
    assert _to(table, "/a/1", "POST") is None
    assert _to(table, "/b", "POST", [(b"x-k", b"v")]) == "a"
    assert _to(table, "/b", "POST", [(b"x-k", b"w")]) is None
    assert _to(table, "/b") is None


# -- headers and methods --------------------------------------------------------------


def test_header_values_match_exactly_and_names_case_insensitively() -> None:
    table = _table("  rules:\n" + _rule("a", "    - headers: [{name: X-Canary, value: 'yes'}]\n"))
    assert _to(table, "/", headers=[(b"x-canary", b"yes")]) == "a"
    assert _to(table, "/", headers=[(b"X-CANARY", b"yes")]) == "a"
    assert _to(table, "/", headers=[(b"x-canary", b"Yes")]) is None
    assert _to(table, "/", headers=[(b"x-canary", b"yes, no")]) is None
    assert _to(table, "/", headers=[(b"x-canary", b"no"), (b"x-canary", b"yes")]) == "a"
    assert _to(table, "/", headers=[(b"x-other", b"yes")]) is None
    assert _to(table, "/") is None


def test_method_must_equal() -> None:
    table = _table("  rules:\n" + _rule("a", "    - method: DELETE\n"))
    assert _to(table, "/", "DELETE") == "a"
    assert _to(table, "/", "GET") is None


# -- backends and policy -------------------------------------------------------------


def test_no_backend_refs_means_the_parent_and_no_rules_route_everything_to_it() -> None:
    assert _to(_table("  rules:\n  - matches: [{path: {value: /x}}]\n"), "/x/1") == "catalog"
    assert _to(_table(""), "/anything") == "catalog"


def test_overrides_apply_to_the_chosen_backend_config() -> None:
    table = _table(
        "  rules:\n"
        "  - backendRefs: [{name: a}]\n"
        "    timeouts: {request: 250ms}\n"
        "    retry: {attempts: 4, codes: [502]}\n"
        "  - backendRefs: [{name: b}]\n"
        "    matches: [{path: {value: /plain}}]\n"
    )
    backend, conf = table.select(b"GET", b"/x", [])
    assert backend == "a"
    assert conf.name == "a"
    assert conf.timeouts.request == 0.25
    assert conf.timeouts.connect == Service("a").timeouts.connect
    assert (conf.retries.attempts, conf.retries.on_status) == (4, (502,))
    assert conf.retries.budget_percent == Service("a").retries.budget_percent
    backend, conf = table.select(b"GET", b"/plain", [])
    assert backend == "b" and conf == Service("b")


def test_retry_override_keeps_what_it_does_not_name() -> None:
    table = _table("  rules:\n  - retry: {codes: [502, 504]}\n")
    _, conf = table.select(b"GET", b"/", [])
    assert conf.retries.on_status == (502, 504)
    assert conf.retries.attempts == Service("catalog").retries.attempts
    assert conf.timeouts == Service("catalog").timeouts


def test_weighted_split_is_exact_over_a_cycle_and_skips_weight_zero() -> None:
    table = _table(
        "  rules:\n  - backendRefs: [{name: a, weight: 90}, {name: b, weight: 10}, "
        "{name: c, weight: 0}]\n"
    )
    counts = Counter(_to(table, "/") for _ in range(500))
    assert counts == {"a": 450, "b": 50}


def test_weighted_split_is_interleaved() -> None:
    choice = WeightedChoice([("a", Service("a")), ("b", Service("b"))], [1, 1])
    assert [choice.pick()[0] for _ in range(6)] == ["a", "b", "a", "b", "a", "b"]
    choice = WeightedChoice([("a", Service("a")), ("b", Service("b"))], [3, 1])
    picks = "".join(choice.pick()[0] for _ in range(8))
    assert "bb" not in picks and picks.count("b") == 2


@given(
    weights=st.lists(st.integers(0, 1_000_000), min_size=1, max_size=6).filter(
        lambda ws: sum(ws) > 0
    ),
    n=st.integers(1, 400),
)
def test_any_prefix_of_the_sequence_is_within_one_pick_of_the_weights(
    weights: list[int], n: int
) -> None:
    names = [f"s{i}" for i in range(len(weights))]
    choice = WeightedChoice([(s, Service(s)) for s in names], weights)
    counts = Counter(choice.pick()[0] for _ in range(n))
    total = sum(weights)
    for name, w in zip(names, weights, strict=True):
        assert abs(counts[name] - n * w / total) < len(weights), (counts, weights, n)
        if w == 0:
            assert counts[name] == 0


def test_weighted_choice_refuses_all_zero() -> None:
    with pytest.raises(ValueError):
        WeightedChoice([("a", Service("a"))], [0])


# -- the router ------------------------------------------------------------------------


def test_services_without_routes_have_no_table() -> None:
    router = Router(_config("  rules:\n" + _rule("a")))
    assert router.services["catalog"].routes is not None
    assert all(router.services[n].routes is None for n in ("a", "b", "c", "d", "e"))
    assert Router(load_documents(SERVICES, "m.yaml")).services["catalog"].routes is None


def test_router_backends_are_its_runtimes_and_survive_a_reload() -> None:
    first = Router(_config("  rules:\n" + _rule("a")))
    backend, _ = first.services["catalog"].routes.select(b"GET", b"/", [])  # type: ignore[union-attr]
    assert backend is first.services["a"]
    second = Router(_config("  rules:\n" + _rule("b")), previous=first)
    assert second.services["a"] is first.services["a"]  # unchanged runtimes are kept
    assert second.services["catalog"] is first.services["catalog"]
    backend, _ = second.services["catalog"].routes.select(b"GET", b"/", [])  # type: ignore[union-attr]
    assert backend is second.services["b"]
    third = Router(load_documents(SERVICES, "m.yaml"), previous=second)
    assert third.services["catalog"] is first.services["catalog"]
    assert third.services["catalog"].routes is None  # routes removed: plain service again


def test_router_gives_undefined_route_services_default_runtimes() -> None:
    cfg = load_documents(
        "apiVersion: meshlayer/v1\nkind: HTTPRoute\nmetadata: {name: r}\n"
        "spec:\n  parentRefs: [{name: front}]\n  rules:\n  - backendRefs: [{name: back}]\n",
        "cp",
        strict_refs=False,
    )
    router = Router(cfg)
    assert router.resolve(b"front").routes is not None
    backend, conf = router.resolve(b"front:80").routes.select(b"GET", b"/", [])  # type: ignore[union-attr]
    assert backend is router.services["back"]
    assert conf == Service("back") and not backend.service.endpoints
