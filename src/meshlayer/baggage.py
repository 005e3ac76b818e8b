"""The ``meshlayer-priority`` member of W3C ``baggage``: found, and set.

Theory of operation: a request's class may travel as a member of the W3C
``baggage`` header (``key=value;properties``, comma-separated), because
OpenTelemetry instrumentation forwards baggage on its own. Three places read
or write that member — the sidecar reading a request's class
(:mod:`meshlayer.proxy.classes`), the gateway replacing a client's claim
(:mod:`meshlayer.proxy.classify`), and the helpers apps use
(:mod:`meshlayer.propagation`) — and they must split a member the same way,
or one could see a class the other does not. This module is that one way.
It works on bytes (the proxy's form; apps encode text as latin-1) and
imports nothing, so apps pay nothing for it.

Keys compare exactly (after the optional whitespace around them); values are
returned as sent, without the whitespace around them: the caller decides
whether to percent-decode (apps do) or to look the bytes up (the proxy does:
class names need no escapes).
"""

from __future__ import annotations

from collections.abc import Iterator

KEY = b"meshlayer-priority"
"""The baggage key that carries the class."""
_OWS = b" \t"


def split_member(member: bytes) -> tuple[bytes, bytes, bytes] | None:
    """One list-member as (key, value, properties); None when it has no ``=``."""
    pair, _, props = member.partition(b";")
    key, eq, value = pair.partition(b"=")
    if not eq:
        return None
    return key.strip(_OWS), value.strip(_OWS), props


def class_values(baggage: bytes) -> Iterator[bytes]:
    """The values of the ``meshlayer-priority`` members, in order."""
    for member in baggage.split(b","):
        parts = split_member(member)
        if parts is not None and parts[0] == KEY:
            yield parts[1]


def stamp_class(baggage: bytes | None, name: bytes) -> bytes:
    """``baggage`` with its ``meshlayer-priority`` member(s) set to ``name``.

    Other members are kept byte for byte, and a member's properties too; when
    there is no such member (or no baggage at all) one is added at the end.
    """
    if not baggage:
        return KEY + b"=" + name
    out = []
    found = False
    for member in baggage.split(b","):
        parts = split_member(member)
        if parts is not None and parts[0] == KEY:
            found = True
            member = KEY + b"=" + name + (b";" + parts[2] if parts[2] else b"")
        out.append(member)
    if not found:
        out.append(KEY + b"=" + name)
    return b",".join(out)
