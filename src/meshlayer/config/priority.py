"""Validate ``kind: PriorityClass`` documents, and the classes shipped by default.

Theory of operation: a priority class names a level of service. Its ``rank``
orders classes (higher is more important); ``weight`` is the share it is
guaranteed under contention, so no class starves entirely; ``queueDelayTarget``
and ``maxQueueLength`` bound its request queue in the sidecar; ``dscp``,
``soPriority`` and ``congestionControl`` are the marks its upstream sockets
carry, for the kernel's packet scheduler (see ``meshlayer net qos``) and the
network beyond.

:mod:`meshlayer.config.load` reads the document's envelope and hands the
document's reader here, so errors name the document and field, e.g.
``mesh.yaml#4 (PriorityClass/gold): spec.dscp: must be 0..63 or a DSCP name
(EF, AF11..AF43, CS0..CS7, LE, VA), got 'AF51'``.

Whether ``congestionControl`` names an algorithm the kernel allows depends on
the host, not the document: the sidecar checks it
(:func:`meshlayer.proxy.netmarks.check_congestion_control`), not the loader.

:func:`merge_defaults` puts the shipped classes ``critical``, ``default`` and
``batch`` under the documents' classes: a document with one of those names
replaces that default; the others stay.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshlayer.config.model import DEFAULT_PRIORITY_CLASSES, PriorityClass

if TYPE_CHECKING:
    from meshlayer.config.load import _Reader

MAX_WEIGHT = 1000
MAX_RANK = 1_000_000
MAX_SO_PRIORITY = 15
"""0..6 can be set by any process; 7..15 need CAP_NET_ADMIN (or CAP_NET_RAW) at the sidecar."""
MAX_QUEUE_LENGTH = 1_000_000
# TCP_CA_NAME_MAX is 16 bytes including the terminating NUL.
_CC_RE = re.compile(r"^[a-z0-9_-]{1,15}$")


def _dscp_names() -> dict[str, int]:
    names = {f"CS{n}": 8 * n for n in range(8)}
    for cls in range(1, 5):
        for drop in range(1, 4):
            names[f"AF{cls}{drop}"] = 8 * cls + 2 * drop
    names.update(EF=46, VA=44, LE=1, DF=0)
    return names


DSCP_NAMES: dict[str, int] = _dscp_names()
"""Code points by name (RFC 2474, 2597, 3246, 5865, 8622); DF is CS0."""


def dscp_name(value: int) -> str:
    """The conventional name of a code point (``EF``, ``CS1``), or its number."""
    for name, code in DSCP_NAMES.items():
        if code == value and name != "DF":
            return name
    return str(value)


def parse_priority_class(r: _Reader, name: str) -> PriorityClass:
    """Read the ``spec`` of a PriorityClass document. Raises ConfigError."""
    spec = r.child("spec", required=True)
    if not spec.has("rank"):
        raise spec.error("rank", "is required (an integer; higher is more important)")
    rank = _bounded(spec, "rank", 0, 0, MAX_RANK)
    weight = _bounded(spec, "weight", 10, 1, MAX_WEIGHT)
    target = spec.duration("queueDelayTarget", 0.1)
    max_queue = _bounded(spec, "maxQueueLength", 1000, 0, MAX_QUEUE_LENGTH)
    dscp = _dscp(spec)
    so_priority = _bounded(spec, "soPriority", 0, 0, MAX_SO_PRIORITY)
    cc: str | None = None
    if spec.has("congestionControl"):
        cc = spec.string("congestionControl")
        if not _CC_RE.match(cc):
            raise spec.error(
                "congestionControl",
                f"must be a kernel congestion control name like cubic, bbr or reno, got {cc!r}",
            )
    spec.finish()
    return PriorityClass(name, rank, weight, target, max_queue, dscp, so_priority, cc)


def merge_defaults(classes: Iterable[PriorityClass]) -> dict[str, PriorityClass]:
    """The shipped classes, each replaced by a document's class of the same name, plus the rest."""
    merged = {c.name: c for c in DEFAULT_PRIORITY_CLASSES}
    merged.update((c.name, c) for c in classes)
    return merged


def by_rank(classes: Iterable[PriorityClass]) -> list[PriorityClass]:
    """Most important first (rank descending; ties by name)."""
    return sorted(classes, key=lambda c: (-c.rank, c.name))


def _bounded(r: _Reader, key: str, default: int, low: int, high: int) -> int:
    value = r.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise r.error(key, f"must be an integer between {low} and {high}, got {value!r}")
    return value


def _dscp(r: _Reader) -> int:
    value = r.get("dscp", 0)
    if isinstance(value, str) and value.upper() in DSCP_NAMES:
        return DSCP_NAMES[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 63:
        return value
    raise r.error(
        "dscp", f"must be 0..63 or a DSCP name (EF, AF11..AF43, CS0..CS7, LE, VA), got {value!r}"
    )
