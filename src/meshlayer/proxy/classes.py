"""The priority classes in force, and how a request's class is read.

Theory of operation: every request the sidecar handles has a class. A sidecar
reads it from the request's ``x-meshlayer-priority`` header, else from the
W3C ``baggage`` entry ``meshlayer-priority`` (which OpenTelemetry
instrumentation already forwards); a request that carries neither, or names
a class this mesh does not define, gets its destination's default class
(``Service.priority_class``) and is counted as missing, so an operator can
see where an app stopped forwarding the header. A gateway does not read the
client's claim at all: its ClassificationRules decide (the listener's
``classify`` hook). Whatever the class, the sidecar forwards it on the next
hop as ``x-meshlayer-priority`` — it replaces what came in.

``ClassTable`` is built from the config's PriorityClasses when config
changes; the request path only does one dictionary lookup on the header's
bytes. ``ClassState.index`` is the class's position by rank (0 = most
important), so per-class state elsewhere (queues, pools) can be lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from meshlayer.baggage import KEY, class_values
from meshlayer.config.model import PriorityClass
from meshlayer.config.priority import by_rank

HEADER: Final = b"x-meshlayer-priority"
BAGGAGE: Final = b"baggage"
BAGGAGE_KEY: Final = KEY
FALLBACK: Final = "default"


class ClassState:
    """One priority class as the request path sees it."""

    __slots__ = (
        "cc",
        "dscp",
        "header_line",
        "index",
        "max_queue",
        "name",
        "rank",
        "so_priority",
        "spec",
        "target",
        "top",
        "weight",
    )

    def __init__(self, spec: PriorityClass, index: int) -> None:
        self.spec = spec
        self.index = index
        self.name = spec.name
        self.rank = spec.rank
        self.weight = spec.weight
        self.target = spec.queue_delay_target
        self.max_queue = spec.max_queue_length
        self.top = False
        """The top-ranked class (set by the table): it may take admission's reserved slots."""
        self.dscp = spec.dscp
        self.so_priority = spec.so_priority
        self.cc = spec.congestion_control
        self.header_line = HEADER + b": " + spec.name.encode()
        """The line the sidecar forwards on the next hop."""

    def __repr__(self) -> str:
        return f"<ClassState {self.name} rank={self.rank} index={self.index}>"


class ClassTable:
    """The classes in force: by name (as header bytes), and by rank."""

    __slots__ = ("_by_bytes", "by_name", "fallback", "ordered")

    def __init__(self, classes: Mapping[str, PriorityClass]) -> None:
        self.ordered = [ClassState(spec, i) for i, spec in enumerate(by_rank(classes.values()))]
        """Most important first; ``ordered[c.index] is c``."""
        for c in self.ordered:
            c.top = c.rank == self.ordered[0].rank
        self.by_name = {c.name: c for c in self.ordered}
        self._by_bytes = {c.name.encode(): c for c in self.ordered}
        if FALLBACK not in self.by_name:  # documents may not remove it, but be sure
            raise ValueError("the priority classes must include 'default'")
        self.fallback = self.by_name[FALLBACK]
        """The ``default`` class: for unknown names, and for everyone with --priority off."""

    def get(self, name: str) -> ClassState | None:
        return self.by_name.get(name)

    def default_for(self, name: str) -> ClassState:
        """A service's default class; ``default`` when the name is unknown here."""
        return self.by_name.get(name) or self.fallback

    def read(self, picked: Mapping[bytes, bytes]) -> ClassState | None:
        """The class a request's watched fields carry, or None (absent or unknown)."""
        value = picked.get(HEADER)
        if value is not None:
            found = self._by_bytes.get(value)
            if found is None:
                found = self._by_bytes.get(value.strip().lower())
            if found is not None:
                return found
        baggage = picked.get(BAGGAGE)
        if baggage is not None:
            return self._from_baggage(baggage)
        return None

    def _from_baggage(self, value: bytes) -> ClassState | None:
        # The first meshlayer-priority member decides; class names need no escapes.
        for found in class_values(value):
            return self._by_bytes.get(found.lower())
        return None
