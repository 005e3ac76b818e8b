"""``kind: PriorityClass``: parsing, strict errors, and the shipped defaults."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from meshlayer.config import ConfigError, MeshConfig, PriorityClass, load_documents
from meshlayer.config.model import DEFAULT_PRIORITY_CLASSES
from meshlayer.config.priority import DSCP_NAMES, by_rank, dscp_name, merge_defaults


def doc(name: str, spec: object) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "meshlayer/v1",
            "kind": "PriorityClass",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def one(spec: dict[str, Any], name: str = "gold") -> PriorityClass:
    return load_documents(doc(name, spec), "mesh.yaml").priority_classes[name]


def test_defaults_are_shipped_when_no_documents() -> None:
    cfg = load_documents("", "empty.yaml")
    classes = cfg.priority_classes
    assert [c.name for c in by_rank(classes.values())] == ["critical", "default", "batch"]
    assert (
        classes["critical"].rank,
        classes["critical"].dscp,
        classes["critical"].so_priority,
    ) == (
        100,
        46,
        6,
    )
    assert (classes["default"].rank, classes["default"].dscp, classes["default"].so_priority) == (
        50,
        0,
        0,
    )
    assert (classes["batch"].rank, classes["batch"].dscp, classes["batch"].so_priority) == (
        10,
        8,
        1,
    )
    assert MeshConfig().priority_classes == classes
    assert all(c.congestion_control is None for c in DEFAULT_PRIORITY_CLASSES)


def test_full_class_parses() -> None:
    c = one(
        {
            "rank": 70,
            "weight": 40,
            "queueDelayTarget": "250ms",
            "maxQueueLength": 50,
            "dscp": "AF41",
            "soPriority": 4,
            "congestionControl": "bbr",
        }
    )
    assert c == PriorityClass("gold", 70, 40, 0.25, 50, 34, 4, "bbr")


def test_minimal_class_takes_field_defaults() -> None:
    c = one({"rank": 0})
    assert c == PriorityClass("gold", 0, 10, 0.1, 1000, 0, 0, None)


def test_document_overrides_default_of_same_name_others_stay() -> None:
    cfg = load_documents(doc("batch", {"rank": 5, "dscp": "LE", "congestionControl": "reno"}), "m")
    assert cfg.priority_classes["batch"] == PriorityClass(
        "batch", 5, dscp=1, congestion_control="reno"
    )
    assert cfg.priority_classes["critical"] == DEFAULT_PRIORITY_CLASSES[0]
    assert set(cfg.priority_classes) == {"critical", "default", "batch"}


def test_merge_defaults_adds_new_classes() -> None:
    merged = merge_defaults([PriorityClass("gold", 75)])
    assert [c.name for c in by_rank(merged.values())] == ["critical", "gold", "default", "batch"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EF", 46),
        ("ef", 46),
        ("CS0", 0),
        ("CS1", 8),
        ("CS7", 56),
        ("AF11", 10),
        ("AF43", 38),
        ("LE", 1),
    ],
)
def test_dscp_names(name: str, value: int) -> None:
    assert one({"rank": 1, "dscp": name}).dscp == value


def test_dscp_name_round_trip() -> None:
    assert dscp_name(46) == "EF"
    assert dscp_name(0) == "CS0"
    assert dscp_name(3) == "3"
    assert all(DSCP_NAMES[dscp_name(v)] == v for v in DSCP_NAMES.values())


@pytest.mark.parametrize(
    ("spec", "field", "problem"),
    [
        ({}, "spec.rank", "is required"),
        ({"rank": -1}, "spec.rank", "between 0 and"),
        ({"rank": "high"}, "spec.rank", "got 'high'"),
        ({"rank": 1, "weight": 0}, "spec.weight", "between 1 and 1000, got 0"),
        ({"rank": 1, "weight": 1001}, "spec.weight", "between 1 and 1000"),
        ({"rank": 1, "weight": True}, "spec.weight", "got True"),
        ({"rank": 1, "queueDelayTarget": "soon"}, "spec.queueDelayTarget", "duration"),
        ({"rank": 1, "queueDelayTarget": 0}, "spec.queueDelayTarget", "positive"),
        ({"rank": 1, "maxQueueLength": -5}, "spec.maxQueueLength", "between 0 and"),
        ({"rank": 1, "dscp": 64}, "spec.dscp", "must be 0..63 or a DSCP name"),
        ({"rank": 1, "dscp": "AF51"}, "spec.dscp", "got 'AF51'"),
        ({"rank": 1, "dscp": -1}, "spec.dscp", "got -1"),
        ({"rank": 1, "soPriority": 16}, "spec.soPriority", "between 0 and 15, got 16"),
        ({"rank": 1, "congestionControl": "BBR!"}, "spec.congestionControl", "cubic, bbr or reno"),
        (
            {"rank": 1, "congestionControl": "x" * 16},
            "spec.congestionControl",
            "congestion control",
        ),
        ({"rank": 1, "congestionControl": ""}, "spec.congestionControl", "non-empty"),
        ({"rank": 1, "color": "red"}, "spec.color", "unknown field"),
    ],
)
def test_errors_name_document_field_and_problem(
    spec: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        one(spec)
    assert info.value.document == "mesh.yaml#1 (PriorityClass/gold)"
    assert info.value.field == field
    assert problem in info.value.problem


def test_spec_is_required_and_duplicates_refused() -> None:
    with pytest.raises(ConfigError, match=r"mesh.yaml#1 \(PriorityClass/gold\): spec: is required"):
        load_documents(
            "apiVersion: meshlayer/v1\nkind: PriorityClass\nmetadata: {name: gold}\n", "mesh.yaml"
        )
    text = doc("gold", {"rank": 1}) + "---\n" + doc("gold", {"rank": 2})
    with pytest.raises(ConfigError, match="duplicate PriorityClass 'gold'"):
        load_documents(text, "mesh.yaml")


def test_to_dict_lists_classes_by_rank() -> None:
    view = load_documents(doc("gold", {"rank": 75, "dscp": "AF41"}), "m").to_dict()
    classes = view["priorityClasses"]
    assert isinstance(classes, dict)
    assert list(classes) == ["critical", "gold", "default", "batch"]
    assert classes["gold"]["dscp"] == 34
