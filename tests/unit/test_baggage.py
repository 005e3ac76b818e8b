"""The ``meshlayer-priority`` member of W3C baggage: one splitter for the proxy, the
gateway and the app helpers, so they never disagree on what a member says."""

from __future__ import annotations

import pytest

from meshlayer.baggage import class_values, split_member, stamp_class
from meshlayer.config.priority import merge_defaults
from meshlayer.propagation import class_from_baggage
from meshlayer.proxy.classes import ClassTable

CLASSES = ClassTable(merge_defaults([]))


@pytest.mark.parametrize(
    ("member", "parts"),
    [
        (b"k=v", (b"k", b"v", b"")),
        (b" k = v ;p=1;q", (b"k", b"v", b"p=1;q")),
        (b"k=", (b"k", b"", b"")),
        (b"k", None),
        (b"k;p=1", None),  # the "=" of a property is not the member's
    ],
)
def test_split_member(member: bytes, parts: tuple[bytes, bytes, bytes] | None) -> None:
    assert split_member(member) == parts


@pytest.mark.parametrize(
    ("baggage", "want"),
    [
        ("meshlayer-priority=batch", "batch"),
        ("a=1, meshlayer-priority = critical ;ttl=5", "critical"),
        ("meshlayer-priority;x=critical", None),
        ("Meshlayer-Priority=critical", None),  # keys compare exactly
        ("xmeshlayer-priority=critical,b=2", None),
        ("", None),
    ],
)
def test_the_proxy_and_the_apps_read_the_same_member(baggage: str, want: str | None) -> None:
    got = CLASSES.read({b"baggage": baggage.encode()})
    assert (got.name if got else None) == want
    assert class_from_baggage(baggage) == want


def test_class_values_in_order() -> None:
    assert list(class_values(b"meshlayer-priority=a,x=1,meshlayer-priority=b")) == [b"a", b"b"]


def test_stamp_replaces_every_claim_and_keeps_the_rest() -> None:
    out = stamp_class(b"s=1, meshlayer-priority=critical;p, meshlayer-priority=x", b"batch")
    assert out == b"s=1,meshlayer-priority=batch;p,meshlayer-priority=batch"
    assert list(class_values(out)) == [b"batch", b"batch"]
