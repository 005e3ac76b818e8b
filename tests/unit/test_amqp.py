"""meshlayer.amqp's class ↔ priority mapping and argument checks (no broker)."""

from __future__ import annotations

import sys

import pytest

from meshlayer import amqp
from meshlayer.config.model import PriorityClass
from meshlayer.config.priority import merge_defaults


def test_shipped_classes_spread_by_rank() -> None:
    ranks = {"critical": 100, "default": 50, "batch": 10}
    assert amqp.priorities_by_rank(ranks) == dict(amqp.DEFAULT_PRIORITIES)
    assert amqp.DEFAULT_PRIORITIES == {"critical": 9, "default": 5, "batch": 1}


def test_priorities_from_configured_classes() -> None:
    classes: dict[str, PriorityClass] = merge_defaults([])
    assert amqp.priorities_by_rank(classes) == {"critical": 9, "default": 5, "batch": 1}


def test_rank_order_not_rank_distance_and_ties_share() -> None:
    got = amqp.priorities_by_rank({"a": 1000, "b": 11, "c": 10, "d": 10, "e": 0})
    assert got == {"a": 9, "b": 6, "c": 4, "d": 4, "e": 1}
    assert amqp.priorities_by_rank({"only": 5}) == {"only": 9}
    assert amqp.priorities_by_rank({"hi": 2, "lo": 1}, low=0, high=255) == {"hi": 255, "lo": 0}
    with pytest.raises(ValueError, match="priorities"):
        amqp.priorities_by_rank({"x": 1}, low=5, high=4)


def test_unknown_class_never_promotes() -> None:
    assert amqp.priority_for("critical") == 9
    assert amqp.priority_for("gold") == 5  # default's
    assert amqp.priority_for("gold", {"gold": 7, "batch": 2}) == 7
    assert amqp.priority_for("silver", {"gold": 7, "batch": 2}) == 2  # no default: lowest
    with pytest.raises(ValueError):
        amqp.priority_for("x", {})


def test_class_for_priority_rounds_down() -> None:
    assert amqp.class_for_priority(None) is None
    assert [amqp.class_for_priority(n) for n in (10, 9, 8, 5, 4, 1, 0)] == [
        "critical",
        "critical",
        "default",
        "default",
        "batch",
        "batch",
        "batch",
    ]


def test_argument_checks_name_the_argument() -> None:
    with pytest.raises(ValueError, match="max_priority"):
        amqp.declare_queue(object(), "q", max_priority=0)
    with pytest.raises(ValueError, match="max_priority"):
        amqp.declare_queue(object(), "q", max_priority=256)
    with pytest.raises(ValueError, match="prefetch"):
        amqp.consume(object(), "q", lambda d: None, prefetch=0)
    with pytest.raises(ValueError, match="requeue"):
        amqp.consume(object(), "q", lambda d: None, requeue="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="priority_class"):
        amqp.publish(object(), "q", b"x", priority_class="Not A Class!")


def test_publish_checks_its_arguments_before_it_needs_pika(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pika is optional: bad arguments are reported as such on a host without it.
    monkeypatch.setitem(sys.modules, "pika", None)  # `import pika` now raises ImportError
    with pytest.raises(ValueError, match="priority_class"):
        amqp.publish(object(), "q", b"x", priority_class="Not A Class!")
    # Properties that publish sets itself: an error naming them, not pika's TypeError
    # "got multiple values for keyword argument".
    with pytest.raises(ValueError, match=r"^priority: .*priority_class"):
        amqp.publish(object(), "q", b"x", priority=9)
    with pytest.raises(ValueError, match=r"^delivery_mode: .*persistent"):
        amqp.publish(object(), "q", b"x", delivery_mode=1)
    with pytest.raises(ImportError):  # good arguments: it gets as far as needing pika
        amqp.publish(object(), "q", b"x", priority_class="batch", correlation_id="c1")
