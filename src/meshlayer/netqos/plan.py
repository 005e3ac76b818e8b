"""The host's packet scheduler for priority classes, as a list of ``tc`` commands.

Theory of operation: ``meshlayer net qos apply`` turns the priority classes
into this tree on one interface's egress::

    1:    htb root qdisc; unclassified traffic goes to the default band
    1:1   htb class: rate = ceil = RATE (the link's share we manage)
    1:10  one htb class per priority class, most important first:
    1:11    rate = RATE * weight / sum(weights)  (guaranteed, so none starves)
    ...     ceil = RATE (a band may borrow what the others leave unused)
            prio = position by rank (0 first: spare bandwidth goes there first)
    10:   one fq_codel qdisc under each band (short queues, fair among flows)

and filters on the root that pick the band of a packet:

- ``u32`` on the DSCP bits of the IPv4 TOS byte (``ip dsfield``) and of the
  IPv6 traffic class (``ip6 priority``): the marks that also leave the host;
- ``basic`` with ``meta(priority eq N)`` on ``skb->priority``, i.e. the
  socket's ``SO_PRIORITY``: the host-local mark. These are optional: kernels
  built without ``cls_basic``/``em_meta`` still classify by DSCP.

Pure TCP ACKs (no payload: IPv4 total length or IPv6 payload length under
64 bytes, flags exactly ACK) go to the most important band before anything
else: a flow's ACKs share the link with the opposite direction's bulk data,
and an ACK stuck behind a batch queue throttles its own flow (a download's
ACKs behind uploads), the trick wondershaper and most home routers use.
Then priority filters (a nonzero SO_PRIORITY is set deliberately), then
DSCP. The default band (the class named ``default``, else the lowest ranked)
needs no filters: HTB's ``default`` sends everything else there. When two
classes share a mark, the more important one gets it.

Band minors are hexadecimal in ``tc`` (``1:10`` is 0x10), so at most 216
classes fit (0x10..0xe7); far more than anyone should configure.

This module does no I/O: :mod:`meshlayer.netqos.run` executes the commands and
parses what ``tc`` prints back with :func:`parse_class_stats`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshlayer.config.model import PriorityClass
from meshlayer.config.priority import by_rank

ROOT = "1:"
PARENT = "1:1"
FIRST_MINOR = 0x10
MAX_BANDS = 0xD8
MAX_HTB_PRIO = 7
LEAVES = ("fq_codel", "pfifo")
MIN_BAND_RATE = 1000  # bit/s
SO_PRIORITY_FILTERS = "SO_PRIORITY classification (kernel modules cls_basic and em_meta)"

_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)([kmgt]?)(bit|bps)$")
_DEV_RE = re.compile(r"^[^\s/:]{1,15}$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class PlanError(ValueError):
    """The classes or the rate cannot make a tree (the message says why)."""


@dataclass(frozen=True, slots=True)
class Band:
    """One HTB class of the tree, for one priority class."""

    name: str
    """The priority class."""
    minor: int
    """Class id minor (``1:<minor hex>``); also the leaf qdisc's handle major."""
    rank: int
    """The class's rank."""
    prio: int
    """HTB prio: 0 is offered spare bandwidth first."""
    rate: int
    """Guaranteed rate, bit/s."""
    ceil: int
    """Upper bound when borrowing, bit/s."""
    dscp: int
    """The class's DSCP; filters map it here (the default band needs none)."""
    so_priority: int
    """The class's SO_PRIORITY (skb priority); filters map it here too."""
    is_default: bool = False
    """Unclassified traffic goes here (HTB ``default``); it needs no filters."""

    @property
    def classid(self) -> str:
        """``1:10`` and so on."""
        return f"1:{self.minor:x}"

    @property
    def handle(self) -> str:
        """Handle of the leaf qdisc: ``10:`` and so on."""
        return f"{self.minor:x}:"


@dataclass(frozen=True, slots=True)
class Command:
    """One ``tc`` invocation (without the leading ``tc``)."""

    args: tuple[str, ...]
    """Arguments for ``tc``."""
    optional: str = ""
    """Non-empty: the feature this gives, which may be missing from the kernel."""


def parse_rate(text: str) -> int:
    """``100mbit``, ``1gbit``, ``500kbit``, ``12.5mbps`` (bytes) → bit/s. Raises PlanError."""
    m = _RATE_RE.match(text.strip().lower())
    if not m:
        raise PlanError(f"rate {text!r} must look like 100mbit, 1gbit, 500kbit or 10mbps")
    bits = float(m.group(1)) * _SCALE[m.group(2)] * (8 if m.group(3) == "bps" else 1)
    if bits < MIN_BAND_RATE:
        raise PlanError(f"rate {text!r} is below {MIN_BAND_RATE}bit")
    return int(bits)


def format_rate(bits: int) -> str:
    """bit/s → ``100Mbit`` style, as ``tc`` prints it."""
    for unit, scale in (("Gbit", 10**9), ("Mbit", 10**6), ("Kbit", 10**3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits}bit"


def default_band_name(classes: Sequence[PriorityClass]) -> str:
    """``default`` when there is such a class, else the lowest ranked."""
    if any(c.name == "default" for c in classes):
        return "default"
    return by_rank(classes)[-1].name


def plan_bands(classes: Iterable[PriorityClass], rate: int) -> list[Band]:
    """One band per class, most important first. Raises PlanError."""
    ordered = by_rank(classes)
    if not ordered:
        raise PlanError("no priority classes to build bands from")
    if len(ordered) > MAX_BANDS:
        raise PlanError(f"{len(ordered)} priority classes; at most {MAX_BANDS} bands fit")
    total = sum(c.weight for c in ordered)
    default = default_band_name(ordered)
    return [
        Band(
            name=c.name,
            minor=FIRST_MINOR + i,
            rank=c.rank,
            prio=min(i, MAX_HTB_PRIO),
            rate=max(MIN_BAND_RATE, rate * c.weight // total),
            ceil=rate,
            dscp=c.dscp,
            so_priority=c.so_priority,
            is_default=c.name == default,
        )
        for i, c in enumerate(ordered)
    ]


def apply_commands(
    dev: str, classes: Iterable[PriorityClass], rate: int, leaf: str = "fq_codel"
) -> list[Command]:
    """The commands that build the tree on ``dev`` (after :func:`clear_commands`)."""
    if not _DEV_RE.match(dev):
        raise PlanError(f"{dev!r} is not a network interface name")
    if leaf not in LEAVES:
        raise PlanError(f"leaf qdisc {leaf!r} must be one of {', '.join(LEAVES)}")
    bands = plan_bands(classes, rate)
    default = next(b for b in bands if b.is_default)
    cmds = [
        _tc(f"qdisc add dev {dev} root handle {ROOT} htb default {default.minor:x}"),
        _tc(
            f"class add dev {dev} parent {ROOT} classid {PARENT} htb rate {rate}bit ceil {rate}bit"
        ),
    ]
    for b in bands:
        htb = f"htb rate {b.rate}bit ceil {b.ceil}bit prio {b.prio}"
        cmds.append(_tc(f"class add dev {dev} parent {PARENT} classid {b.classid} {htb}"))
        cmds.append(leaf_command(dev, b, leaf))
    cmds.extend(filter_commands(dev, bands))
    return cmds


def leaf_command(dev: str, band: Band, leaf: str) -> Command:
    """The leaf qdisc of one band."""
    return _tc(f"qdisc add dev {dev} parent {band.classid} handle {band.handle} {leaf}")


def filter_commands(dev: str, bands: Sequence[Band]) -> list[Command]:
    """Filters mapping pure ACKs, SO_PRIORITY, then DSCP, to bands (none for the default)."""
    head = f"filter add dev {dev} parent {ROOT} protocol"
    top = bands[0].classid
    cmds: list[Command] = [  # IHL 5, length < 64, TCP flags == ACK (IPv6: no ext. headers)
        _tc(
            f"{head} ip prio 1 u32 match ip protocol 6 0xff match u8 0x05 0x0f at 0 "
            f"match u16 0x0000 0xffc0 at 2 match u8 0x10 0xff at 33 flowid {top}"
        ),
        _tc(
            f"{head} ipv6 prio 2 u32 match ip6 protocol 6 0xff "
            f"match u16 0x0000 0xffc0 at 4 match u8 0x10 0xff at 53 flowid {top}"
        ),
    ]
    pref = 10
    taken: set[int] = set()
    for b in bands:
        if b.is_default or b.so_priority == 0 or b.so_priority in taken:
            continue
        taken.add(b.so_priority)
        args = _tc(f"{head} all prio {pref} basic match META flowid {b.classid}").args
        args = tuple(f"meta(priority eq {b.so_priority})" if a == "META" else a for a in args)
        cmds.append(Command(args, optional=SO_PRIORITY_FILTERS))
        pref += 1
    pref = 100
    taken = set()
    for b in bands:
        if b.is_default or b.dscp in taken:
            continue
        taken.add(b.dscp)
        match = f"0x{b.dscp << 2:02x} 0xfc flowid {b.classid}"
        cmds.append(_tc(f"{head} ip prio {pref} u32 match ip dsfield {match}"))
        cmds.append(_tc(f"{head} ipv6 prio {pref + 1} u32 match ip6 priority {match}"))
        pref += 2
    return cmds


def _tc(line: str) -> Command:
    return Command(tuple(line.split()))


def clear_commands(dev: str) -> list[Command]:
    """Remove the tree (the root qdisc and with it every class and filter)."""
    if not _DEV_RE.match(dev):
        raise PlanError(f"{dev!r} is not a network interface name")
    return [Command(("qdisc", "del", "dev", dev, "root"))]


@dataclass(frozen=True, slots=True)
class ClassStats:
    """One HTB class as ``tc -s class show`` reports it."""

    classid: str
    """``1:10``."""
    parent: str
    """``1:1``, or ``root``."""
    leaf: str
    """Handle of the leaf qdisc (``10:``), or ""."""
    prio: int | None
    """HTB prio (None for inner classes)."""
    rate: str
    """Guaranteed rate as tc prints it."""
    ceil: str
    """Ceiling as tc prints it."""
    sent_bytes: int
    """Bytes sent through the class."""
    sent_packets: int
    """Packets sent through the class."""
    dropped: int
    """Packets dropped."""
    overlimits: int
    """Times the class was over its rate."""


_CLASS_RE = re.compile(r"^class htb (\S+) (?:(root)|parent (\S+))(.*)$")
_SENT_RE = re.compile(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)")


def parse_class_stats(text: str) -> list[ClassStats]:
    """Parse ``tc -s class show dev DEV`` (HTB classes; others are skipped)."""
    out: list[ClassStats] = []
    current: dict[str, str] | None = None
    for line in text.splitlines():
        m = _CLASS_RE.match(line.strip())
        if m:
            rest = m.group(4)
            fields = dict(re.findall(r"\b(leaf|prio|rate|ceil) (\S+)", rest))
            current = {
                "classid": m.group(1),
                "parent": "root" if m.group(2) else m.group(3),
                **fields,
            }
            continue
        s = _SENT_RE.search(line)
        if s and current is not None:
            prio = current.get("prio")
            out.append(
                ClassStats(
                    classid=current["classid"],
                    parent=current["parent"],
                    leaf=current.get("leaf", ""),
                    prio=int(prio) if prio is not None and prio.isdigit() else None,
                    rate=current.get("rate", ""),
                    ceil=current.get("ceil", ""),
                    sent_bytes=int(s.group(1)),
                    sent_packets=int(s.group(2)),
                    dropped=int(s.group(3)),
                    overlimits=int(s.group(4)),
                )
            )
            current = None
    return out
