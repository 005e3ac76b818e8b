"""What a parser does with a header field, by its name as sent, computed once per name.

Theory of operation: the parsers see every header field through an llhttp
callback, and the names repeat from message to message (``Host``,
``Content-Type`` ...). Classifying a name costs a ``lower()``, a dictionary
lookup on the fresh lower-cased bytes (which hashes them) and a ``proxy-``
prefix test; a ``KindTable`` does that once per distinct name as sent and
then answers with one lookup on the name itself. The table is bounded
(``MAX_CACHED`` names), because names are chosen by the peer: past the bound
names are classified every time, never stored.

Most fields are PLAIN, and even the lookup costs a slice and a hash of the
name. ``KindTable.maybe`` answers "certainly PLAIN" for most of them first,
from the name's length and first letter alone (``kind_at``): a table of
what the non-PLAIN names (and ``proxy-*``) could be. A false "maybe" only
means the lookup is done.
"""

from __future__ import annotations

from typing import Final

from meshlayer.proxy.codec.serialize import CLASSIFY, CONNECTION

# Kinds. PLAIN fields travel end to end as they are; DROP fields never do.
PLAIN: Final = 0
DROPPED: Final = 1
CONN: Final = 2  # Connection: its tokens name more fields to drop
CLEN: Final = 3  # Content-Length
TE: Final = 4  # Transfer-Encoding
UPGRADE: Final = 5  # Upgrade (requests only; a response's is hop-by-hop)
HOST: Final = 6  # Host (requests only): end to end, but counted and remembered
EXPECT: Final = 7  # Expect (requests only): end to end, 100-continue remembered
WATCHED: Final = 8  # one of the caller's watched names: handed out apart

MAX_CACHED: Final = 512
MAYBE_LEN: Final = 64  # names this long or longer are always looked up


def _slot(length: int, first: int) -> int:
    """Where ``maybe`` keeps names of this length and first byte: letters fold to
    their case-insensitive position (the low five bits); other bytes may share a
    slot with a letter, which only costs a lookup."""
    return (length << 5) | (first & 31)


class KindTable:
    """Header field name as sent → kind, for one parser configuration."""

    __slots__ = ("_by_lower", "kinds", "maybe")

    def __init__(self, request: bool, watch: frozenset[bytes] = frozenset()) -> None:
        by_lower: dict[bytes, int] = dict.fromkeys(watch, WATCHED)
        for name, kind in CLASSIFY.items():
            by_lower[name] = CONN if kind == CONNECTION else DROPPED
        by_lower[b"content-length"] = CLEN
        by_lower[b"transfer-encoding"] = TE
        if request:
            by_lower[b"upgrade"] = UPGRADE
            by_lower.setdefault(b"host", HOST)
            by_lower.setdefault(b"expect", EXPECT)
        self._by_lower = by_lower
        maybe = bytearray(MAYBE_LEN << 5)
        for name in by_lower:
            if len(name) < MAYBE_LEN:
                maybe[_slot(len(name), name[0])] = 1
        for length in range(len(b"proxy-"), MAYBE_LEN):
            maybe[_slot(length, ord("p"))] = 1
        self.maybe = bytes(maybe)
        """Non-zero where a name of that length and first letter may not be PLAIN."""
        self.kinds: dict[bytes, int] = {}
        """The cache: names as sent, classified. Look here first."""

    def kind_at(self, data: bytes, start: int, colon: int) -> int:
        """The kind of the field whose row starts at ``start`` in ``data``, its name
        ending at ``colon``: PLAIN at once when ``maybe`` rules the rest out (no
        slice, no hash), else by lookup."""
        n = colon - start
        # _slot(n, data[start]), written out: the call costs 0.8 % of a request's instructions
        if n < MAYBE_LEN and self.maybe[(n << 5) | (data[start] & 31)] == 0:
            return PLAIN
        name = data[start:colon]
        found = self.kinds.get(name)
        return found if found is not None else self.classify(name)

    def classify(self, name: bytes) -> int:
        """The kind of ``name`` (a cache miss): compute, and remember while there is room."""
        lname = name.lower()
        kind = self._by_lower.get(lname)
        if kind is None:
            kind = DROPPED if lname[:6] == b"proxy-" else PLAIN
        if len(self.kinds) < MAX_CACHED:
            self.kinds[name] = kind
        return kind


_tables: dict[tuple[bool, frozenset[bytes]], KindTable] = {}


def kind_table(request: bool, watch: frozenset[bytes] = frozenset()) -> KindTable:
    """The shared table for a parser configuration (one per distinct ``watch``)."""
    key = (request, watch)
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = KindTable(request, watch)
    return table
