"""Building a sidecar's config from a control-plane snapshot, and the saved copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meshlayer.config import ConfigError, Endpoint
from meshlayer.config.snapshot import carry_endpoints, config_from_snapshot
from meshlayer.proxy.control_client import Backoff, load_saved, save_snapshot

URL = "http://127.0.0.1:15000"


def service(name: str, spec: dict[str, Any] | None = None, rv: int = 1) -> dict[str, Any]:
    meta = {"name": name, "resourceVersion": rv}
    return {"apiVersion": "meshlayer/v1", "kind": "Service", "metadata": meta, "spec": spec or {}}


def route(name: str, parent: str, backend: str) -> dict[str, Any]:
    return {
        "apiVersion": "meshlayer/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "resourceVersion": 2},
        "spec": {"parentRefs": [{"name": parent}], "rules": [{"backendRefs": [{"name": backend}]}]},
    }


def snap(version: int = 7, resources: Any = (), endpoints: Any = None) -> dict[str, Any]:
    return {"version": version, "resources": list(resources), "endpoints": endpoints or {}}


def error(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_snapshot(data, URL)
    return info.value


def test_registered_endpoints_merge_into_services() -> None:
    spec = {
        "loadBalancer": "round-robin",
        "endpoints": [{"address": "10.0.0.1:80", "meshed": False}],
    }
    data = snap(
        7,
        [service("catalog", spec)],
        {
            "catalog": [
                {"address": "127.0.0.1:20001", "healthy": True},
                {"address": "127.0.0.1:20002", "healthy": False},
                {"address": "127.0.0.1:20001", "healthy": True},
                {"address": "10.0.0.1:80", "healthy": True},
            ],
            "reviews": [{"address": "[::1]:20003", "healthy": True}],
        },
    )
    cfg = config_from_snapshot(data, URL)
    assert cfg.version == "7" and cfg.source == URL
    catalog = cfg.services["catalog"]
    assert catalog.load_balancer == "round-robin"
    assert catalog.endpoints == (
        Endpoint("10.0.0.1", 80, meshed=False),  # static first; a duplicate is not added
        Endpoint("127.0.0.1", 20001, meshed=True),  # unhealthy and repeated ones left out
    )
    reviews = cfg.services["reviews"]  # registered only: default settings
    assert reviews.load_balancer == "p2c-ewma"
    assert reviews.endpoints == (Endpoint("::1", 20003, meshed=True),)


def test_routes_may_name_services_not_in_the_mesh_yet() -> None:
    # The control plane accepts a route before its backend registers; the sidecar does
    # too (the backend answers 503 no-endpoints until then) rather than refusing the
    # whole snapshot and with it every other change.
    cfg = config_from_snapshot(snap(3, [route("r", "catalog", "catalog-v2")]), URL)
    assert [r.name for r in cfg.routes] == ["r"]
    assert "catalog-v2" not in cfg.services
    regs = {s: [{"address": "127.0.0.1:1", "healthy": True}] for s in ("catalog", "catalog-v2")}
    cfg = config_from_snapshot(snap(4, [route("r", "catalog", "catalog-v2")], regs), URL)
    assert cfg.services["catalog-v2"].endpoints == (Endpoint("127.0.0.1", 1, meshed=True),)


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ([], "", "JSON object"),
        ({"resources": []}, "version", "integer"),
        ({"version": -1}, "version", "integer"),
        ({"version": True}, "version", "integer"),
        ({"version": 1, "endpoints": []}, "endpoints", "mapping"),
        (snap(1, endpoints={"Bad_Name": []}), "endpoints", "DNS name"),
        (snap(1, endpoints={"a": {}}), "endpoints.a", "list"),
        (snap(1, endpoints={"a": ["x"]}), "endpoints.a[0]", "mapping"),
        (snap(1, endpoints={"a": [{"address": "nope"}]}), "endpoints.a[0].address", "HOST:PORT"),
        (
            snap(1, endpoints={"a": [{"address": "h:1", "healthy": 1}]}),
            "endpoints.a[0].healthy",
            "",
        ),
        ({"version": 1, "resources": {}}, "resources", "list"),
    ],
)
def test_malformed_snapshots(data: Any, field: str, words: str) -> None:
    err = error(data)
    assert err.field == field
    assert words in err.problem


def test_documents_are_validated_like_a_file() -> None:
    err = error(snap(9, [service("catalog", {"loadBalancer": "random"})]))
    assert err.document == "snapshot v9#1 (Service/catalog)"
    assert err.field == "spec.loadBalancer"
    err = error(snap(9, [service("catalog", {"typo": 1})]))
    assert (err.field, err.problem) == ("spec.typo", "unknown field")


def test_carry_endpoints_adds_back_only_what_the_new_snapshot_lacks() -> None:
    def ep(address: str, healthy: bool = True) -> dict[str, Any]:
        return {"address": address, "healthy": healthy}

    previous = snap(
        5,
        endpoints={
            "catalog": [ep("127.0.0.1:1"), ep("127.0.0.1:2"), ep("127.0.0.1:9", False)],
            "reviews": [ep("127.0.0.1:3")],
        },
    )
    new = snap(6, endpoints={"catalog": [ep("127.0.0.1:2", False)], "other": [ep("h:4")]})
    merged, carried = carry_endpoints(previous, new)
    # missing ones come back; one the new snapshot lists stays as it says (unhealthy);
    # one that was unhealthy before is not carried
    assert carried == {"catalog": ["127.0.0.1:1"], "reviews": ["127.0.0.1:3"]}
    assert merged["version"] == 6
    assert merged["endpoints"] == {
        "catalog": [ep("127.0.0.1:2", False), ep("127.0.0.1:1")],
        "other": [ep("h:4")],
        "reviews": [ep("127.0.0.1:3")],
    }
    assert new["endpoints"]["catalog"] == [ep("127.0.0.1:2", False)]  # not mutated
    cfg = config_from_snapshot(merged, URL)
    assert [e.address for e in cfg.services["catalog"].endpoints] == ["127.0.0.1:1"]
    same, none = carry_endpoints(previous, previous)
    assert none == {} and same == previous


def test_saved_copy_round_trip(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert load_saved(state, URL) is None
    data = snap(
        12, [service("catalog")], {"catalog": [{"address": "127.0.0.1:9", "healthy": True}]}
    )
    save_snapshot(state, json.dumps(data))
    assert sorted(p.name for p in state.iterdir()) == ["config.json"]  # no temp file left
    saved = load_saved(state, URL)
    assert saved is not None
    cfg, raw = saved
    assert raw == data
    assert cfg.version == "12" and "saved copy" in cfg.source
    assert cfg.services["catalog"].endpoints == (Endpoint("127.0.0.1", 9),)
    (state / "config.json").write_text('{"version": 13, "resources": [{"kind": "Nope"}]}')
    assert load_saved(state, URL) is None  # unusable copies are ignored, not fatal
    (state / "config.json").write_text("{trunc")
    assert load_saved(state, URL) is None


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    b = Backoff(0.1, 5.0)
    delays = [b.delay() for _ in range(12)]
    caps = [min(5.0, 0.1 * 2**i) for i in range(12)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, caps, strict=True))
    b.reset()
    assert b.delay() <= 0.1
