"""The runtime class table: how a request's class is read from its watched fields."""

from __future__ import annotations

import pytest

from meshlayer.config.model import DEFAULT_PRIORITY_CLASSES, PriorityClass
from meshlayer.proxy.classes import ClassTable


def table(*extra: PriorityClass) -> ClassTable:
    classes = {c.name: c for c in DEFAULT_PRIORITY_CLASSES}
    classes.update((c.name, c) for c in extra)
    return ClassTable(classes)


def test_ordered_by_rank_with_index() -> None:
    t = table(PriorityClass("gold", 200))
    assert [c.name for c in t.ordered] == ["gold", "critical", "default", "batch"]
    assert all(t.ordered[c.index] is c for c in t.ordered)
    assert t.ordered[1].header_line == b"x-meshlayer-priority: critical"


@pytest.mark.parametrize(
    ("picked", "expected"),
    [
        ({b"x-meshlayer-priority": b"batch"}, "batch"),
        ({b"x-meshlayer-priority": b" Critical "}, "critical"),
        ({b"baggage": b"userid=alice,meshlayer-priority=critical;ttl=2"}, "critical"),
        ({b"baggage": b"meshlayer-priority = batch"}, "batch"),
        (
            {b"x-meshlayer-priority": b"critical", b"baggage": b"meshlayer-priority=batch"},
            "critical",
        ),
        ({b"x-meshlayer-priority": b"nope", b"baggage": b"meshlayer-priority=batch"}, "batch"),
        ({b"x-meshlayer-priority": b"nope"}, None),
        ({b"baggage": b"userid=alice"}, None),
        ({b"baggage": b"xmeshlayer-priority=critical"}, None),
        ({}, None),
    ],
)
def test_read(picked: dict[bytes, bytes], expected: str | None) -> None:
    found = table().read(picked)
    assert (found.name if found else None) == expected


def test_default_for_unknown_falls_back_to_default() -> None:
    t = table()
    assert t.default_for("batch").name == "batch"
    assert t.default_for("gold").name == "default"


def test_default_class_is_required() -> None:
    with pytest.raises(ValueError, match="default"):
        ClassTable({"critical": DEFAULT_PRIORITY_CLASSES[0]})


def test_service_priority_class_must_be_known_in_a_file() -> None:
    from meshlayer.config import ConfigError, load_documents

    doc = (
        "apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: crawler}\n"
        "spec: {endpoints: [{address: '127.0.0.1:9'}], priorityClass: %s}\n"
    )
    assert load_documents(doc % "batch", "f.yaml").services["crawler"].priority_class == "batch"
    with pytest.raises(ConfigError) as err:
        load_documents(doc % "gold", "f.yaml")
    assert err.value.field == "spec.priorityClass"
    assert "Service/crawler" in err.value.document and "'gold'" in str(err.value)
    # from a control plane's store, the class may come in another apply: not checked here
    cfg = load_documents(doc % "gold", "store", strict_refs=False)
    assert cfg.services["crawler"].priority_class == "gold"
