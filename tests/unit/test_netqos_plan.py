"""The ``tc`` command plan of ``meshlayer net qos`` (no I/O)."""

from __future__ import annotations

import pytest

from meshlayer.config.model import DEFAULT_PRIORITY_CLASSES, PriorityClass
from meshlayer.netqos.plan import (
    SO_PRIORITY_FILTERS,
    Band,
    PlanError,
    apply_commands,
    clear_commands,
    format_rate,
    parse_class_stats,
    parse_rate,
    plan_bands,
)


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("100mbit", 100_000_000),
        ("1gbit", 1_000_000_000),
        ("1Gbit", 1_000_000_000),
        ("500kbit", 500_000),
        ("12.5mbps", 100_000_000),
        ("8000bit", 8000),
    ],
)
def test_parse_rate(text: str, bits: int) -> None:
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["fast", "100", "100mb", "-1mbit", "10bit", ""])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(PlanError, match="rate"):
        parse_rate(text)


def test_format_rate() -> None:
    assert format_rate(100_000_000) == "100Mbit"
    assert format_rate(1_500_000_000) == "1.5Gbit"
    assert format_rate(64_000) == "64Kbit"
    assert format_rate(999) == "999bit"


def test_bands_follow_rank_weight_and_default() -> None:
    bands = plan_bands(DEFAULT_PRIORITY_CLASSES, 100_000_000)
    assert bands == [
        Band("critical", 0x10, 100, 0, 60_000_000, 100_000_000, 46, 6, False),
        Band("default", 0x11, 50, 1, 30_000_000, 100_000_000, 0, 0, True),
        Band("batch", 0x12, 10, 2, 10_000_000, 100_000_000, 8, 1, False),
    ]
    assert [b.classid for b in bands] == ["1:10", "1:11", "1:12"]
    assert bands[0].handle == "10:"


def test_many_classes_hex_minors_and_prio_cap() -> None:
    classes = [PriorityClass(f"c{i}", 100 - i, weight=1) for i in range(20)]
    bands = plan_bands(classes, 20_000_000)
    assert bands[15].classid == "1:1f" and bands[16].classid == "1:20"
    assert max(b.prio for b in bands) == 7
    assert all(b.rate == 1_000_000 for b in bands)
    assert bands[-1].is_default  # no class named default: the lowest ranked


def test_tiny_weights_keep_a_minimum_rate() -> None:
    classes = [PriorityClass("big", 2, weight=1000), PriorityClass("small", 1, weight=1)]
    assert plan_bands(classes, 100_000)[1].rate == 1000


def test_apply_commands_build_the_tree() -> None:
    cmds = apply_commands("eth0", DEFAULT_PRIORITY_CLASSES, 100_000_000)
    lines = [" ".join(c.args) for c in cmds]
    assert lines[:3] == [
        "qdisc add dev eth0 root handle 1: htb default 11",
        "class add dev eth0 parent 1: classid 1:1 htb rate 100000000bit ceil 100000000bit",
        "class add dev eth0 parent 1:1 classid 1:10 htb rate 60000000bit ceil 100000000bit prio 0",
    ]
    assert "qdisc add dev eth0 parent 1:12 handle 12: fq_codel" in lines
    filters = [c for c in cmds if c.args[0] == "filter"]
    # Pure ACKs to the top band, then SO_PRIORITY (optional), then DSCP for IPv4 and IPv6;
    # none for the default band.
    acks, filters = filters[:2], filters[2:]
    assert [" ".join(c.args[6:]) for c in acks] == [
        "protocol ip prio 1 u32 match ip protocol 6 0xff match u8 0x05 0x0f at 0 "
        "match u16 0x0000 0xffc0 at 2 match u8 0x10 0xff at 33 flowid 1:10",
        "protocol ipv6 prio 2 u32 match ip6 protocol 6 0xff "
        "match u16 0x0000 0xffc0 at 4 match u8 0x10 0xff at 53 flowid 1:10",
    ]
    assert not any(c.optional for c in acks)
    assert [c.optional for c in filters[:2]] == [SO_PRIORITY_FILTERS] * 2
    assert filters[0].args[-4:] == ("match", "meta(priority eq 6)", "flowid", "1:10")
    assert [" ".join(c.args[6:]) for c in filters[2:]] == [
        "protocol ip prio 100 u32 match ip dsfield 0xb8 0xfc flowid 1:10",
        "protocol ipv6 prio 101 u32 match ip6 priority 0xb8 0xfc flowid 1:10",
        "protocol ip prio 102 u32 match ip dsfield 0x20 0xfc flowid 1:12",
        "protocol ipv6 prio 103 u32 match ip6 priority 0x20 0xfc flowid 1:12",
    ]
    assert not any("1:11" in c.args for c in filters)


def test_shared_marks_go_to_the_more_important_class() -> None:
    classes = [
        PriorityClass("default", 50),
        PriorityClass("gold", 90, dscp=46, so_priority=5),
        PriorityClass("silver", 70, dscp=46, so_priority=5),
    ]
    filters = [c for c in apply_commands("eth0", classes, 10**8) if c.args[0] == "filter"]
    assert {c.args[-1] for c in filters} == {"1:10"}  # gold
    assert len(filters) == 5  # 2 pure-ACK, 1 SO_PRIORITY, 2 DSCP


def test_pfifo_leaf_and_refusals() -> None:
    cmds = apply_commands("eth0", DEFAULT_PRIORITY_CLASSES, 10**8, leaf="pfifo")
    assert sum(c.args[-1] == "pfifo" for c in cmds) == 3
    with pytest.raises(PlanError, match="leaf qdisc 'sfq'"):
        apply_commands("eth0", DEFAULT_PRIORITY_CLASSES, 10**8, leaf="sfq")
    with pytest.raises(PlanError, match="no priority classes"):
        apply_commands("eth0", [], 10**8)
    for dev in ("eth 0", "a/b", "x" * 16, ""):
        with pytest.raises(PlanError, match="not a network interface name"):
            apply_commands(dev, DEFAULT_PRIORITY_CLASSES, 10**8)
        with pytest.raises(PlanError):
            clear_commands(dev)
    assert [c.args for c in clear_commands("eth0")] == [("qdisc", "del", "dev", "eth0", "root")]


# As tc prints it: trailing spaces included.
TC_CLASS_SHOW = "\n".join(
    [
        "class htb 1:11 parent 1:1 leaf 11: prio 1 rate 15Mbit ceil 50Mbit burst 1597b "
        "cburst 1600b ",
        " Sent 688 bytes 12 pkt (dropped 0, overlimits 0 requeues 0) ",
        " backlog 0b 0p requeues 0",
        " lended: 12 borrowed: 0 giants: 0",
        " tokens: 11206 ctokens: 3483",
        "",
        "class htb 1:1 root rate 50Mbit ceil 50Mbit burst 1600b cburst 1600b ",
        " Sent 1253 bytes 22 pkt (dropped 3, overlimits 7 requeues 0) ",
        " backlog 0b 0p requeues 0",
        "",
        "class fq_codel 10:1 parent 10: ",
        " Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0) ",
        "",
    ]
)


def test_parse_class_stats() -> None:
    stats = parse_class_stats(TC_CLASS_SHOW)
    assert [(s.classid, s.parent, s.leaf, s.prio) for s in stats] == [
        ("1:11", "1:1", "11:", 1),
        ("1:1", "root", "", None),
    ]
    assert (stats[0].rate, stats[0].ceil, stats[0].sent_bytes, stats[0].sent_packets) == (
        "15Mbit",
        "50Mbit",
        688,
        12,
    )
    assert (stats[1].dropped, stats[1].overlimits) == (3, 7)
    assert parse_class_stats("") == []
