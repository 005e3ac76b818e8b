"""Header field classification by name as sent (codec/fields.py), and its bounded cache."""

from __future__ import annotations

from meshlayer.proxy.codec import fields
from meshlayer.proxy.codec.fields import (
    CLEN,
    CONN,
    DROPPED,
    EXPECT,
    HOST,
    PLAIN,
    TE,
    UPGRADE,
    WATCHED,
    KindTable,
    kind_table,
)
from meshlayer.proxy.codec.request import RequestParser

REQUEST_KINDS = {
    b"Host": HOST,
    b"X-Thing": PLAIN,
    b"Content-Length": CLEN,
    b"TRANSFER-ENCODING": TE,
    b"Connection": CONN,
    b"Keep-Alive": DROPPED,
    b"Proxy-Authorization": DROPPED,
    b"Proxy-Anything": DROPPED,
    b"Upgrade": UPGRADE,
    b"Expect": EXPECT,
    b"X-Request-Id": WATCHED,
}


def test_request_names_classify_whatever_their_case() -> None:
    table = KindTable(True, frozenset({b"x-request-id"}))
    for name, kind in REQUEST_KINDS.items():
        assert table.classify(name) == kind, name
        assert table.kinds[name] == kind  # remembered under the name as sent


def test_response_names_know_no_request_only_kinds() -> None:
    table = KindTable(False)
    assert table.classify(b"Host") == PLAIN
    assert table.classify(b"Expect") == PLAIN
    assert table.classify(b"Upgrade") == DROPPED
    assert table.classify(b"x-request-id") == PLAIN


def test_the_cache_is_bounded_but_classification_goes_on() -> None:
    table = KindTable(False)
    for i in range(fields.MAX_CACHED + 50):
        assert table.classify(b"X-Name-%d" % i) == PLAIN
    assert len(table.kinds) == fields.MAX_CACHED
    assert table.classify(b"Proxy-Late") == DROPPED
    assert b"Proxy-Late" not in table.kinds


def test_tables_are_shared_per_configuration() -> None:
    assert kind_table(True, frozenset({b"a"})) is kind_table(True, frozenset({b"a"}))
    assert kind_table(True) is not kind_table(False)


def test_parser_after_the_cache_filled_still_drops_hop_by_hop_fields() -> None:
    """Past the bound, names are classified each time, not treated as plain."""
    table = kind_table(True)
    while len(table.kinds) < fields.MAX_CACHED:
        table.classify(b"X-Filler-%d" % len(table.kinds))
    events = RequestParser().feed(
        b"GET / HTTP/1.1\r\nHost: a\r\nKEEP-alive: 5\r\nPrOxY-x: 1\r\nX-Kept: 1\r\n\r\n"
    )
    head = events[0]
    assert head.lines == [b"Host: a", b"X-Kept: 1"] or head.lines == [  # type: ignore[attr-defined]
        b"Host: a\r\nX-Kept: 1"  # in blocks: consecutive lines that travel as received are one item
    ]
