"""Run the ``tc`` commands of :mod:`meshlayer.netqos.plan` and read the tree back.

Theory of operation: ``apply`` first removes whatever root qdisc the
interface has (so applying twice gives the same tree), then runs the plan's
commands in order. Two kinds of failure are expected on small kernels and
are worked around, each with one note for the user:

- the leaf qdisc kind is unknown (no ``sch_fq_codel``): the bands get
  ``pfifo`` leaves instead;
- an optional filter cannot be built (no ``cls_basic``/``em_meta`` for the
  SO_PRIORITY filters): those filters are skipped, DSCP still classifies.

``apply`` replaces any root qdisc; ``clear`` removes only an HTB ``1:``
root (ours) and leaves anything else alone. Any other failure of ``apply``
removes the half-built tree again and raises
:class:`QosError` with ``tc``'s own message. Without CAP_NET_ADMIN nothing is
tried: :func:`require_net_admin` checks the process's effective capabilities
first, and an EPERM from ``tc`` (a user namespace, a seccomp filter) gives
the same message.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from meshlayer.config.model import PriorityClass
from meshlayer.config.priority import dscp_name
from meshlayer.netqos.plan import (
    ROOT,
    Band,
    Command,
    apply_commands,
    clear_commands,
    format_rate,
    leaf_command,
    parse_class_stats,
    plan_bands,
)
from meshlayer.proxy.netmarks import has_net_admin

NEED_CAP = "meshlayer net qos needs CAP_NET_ADMIN (run as root)"
NEED_TC = (
    "meshlayer net qos needs the `tc` command, which is not on PATH: "
    "install the Debian package iproute2"
)
_EPERM = "Operation not permitted"
_NO_TREE = ("No such file or directory", "Cannot delete qdisc with handle of zero")


class QosError(Exception):
    """``meshlayer net qos`` cannot do what was asked (the message says why)."""


def find_tc() -> str:
    """Path of the ``tc`` binary. Raises QosError naming the package to install."""
    path = shutil.which("tc")
    if path is None:
        raise QosError(NEED_TC)
    return path


def require_net_admin() -> None:
    """Raises QosError unless this process has CAP_NET_ADMIN."""
    if not has_net_admin():
        raise QosError(NEED_CAP)


def tc(binary: str, args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``tc ARGS``. Raises QosError on EPERM, or on any failure when ``check``."""
    try:
        done = subprocess.run(
            [binary, *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QosError(f"cannot run tc {' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        if _EPERM in done.stderr:
            raise QosError(NEED_CAP)
        if check:
            raise QosError(f"tc {' '.join(args)} failed: {_first_line(done.stderr)}")
    return done


def apply(
    dev: str,
    classes: Sequence[PriorityClass],
    rate: int,
    leaf: str = "fq_codel",
    note: Callable[[str], None] = print,
) -> list[Band]:
    """Build the tree on ``dev``; returns the bands. Raises QosError (or PlanError)."""
    commands = apply_commands(dev, classes, rate, leaf)  # PlanError before touching anything
    binary = find_tc()
    require_net_admin()
    _check_device(dev)
    _delete_root(binary, dev)  # whatever was there: apply replaces the root qdisc
    bands = {b.classid: b for b in plan_bands(classes, rate)}
    skipped: set[str] = set()
    try:
        for cmd in commands:
            if cmd.optional in skipped:
                continue
            if _is_leaf(cmd) and leaf != "fq_codel" and cmd.args[-1] == "fq_codel":
                cmd = leaf_command(dev, bands[cmd.args[5]], leaf)
            done = tc(binary, cmd.args, check=False)
            if done.returncode == 0:
                continue
            if _is_leaf(cmd) and leaf == "fq_codel" and "kind is unknown" in done.stderr:
                note("note: the kernel has no fq_codel qdisc (sch_fq_codel); bands use pfifo")
                leaf = "pfifo"
                tc(binary, leaf_command(dev, bands[cmd.args[5]], leaf).args)
            elif cmd.optional:
                skipped.add(cmd.optional)
                why = _first_line(done.stderr)
                note(f"note: skipped {cmd.optional}: {why}; DSCP filters still classify")
            else:
                raise QosError(f"tc {' '.join(cmd.args)} failed: {_first_line(done.stderr)}")
    except QosError:
        _delete_root(binary, dev)
        raise
    return list(bands.values())


def clear(dev: str, *, binary: str | None = None) -> bool:
    """Remove the tree from ``dev``; False when there was none.

    Raises QosError when the root qdisc is someone else's (neither the kernel's
    default nor an HTB ``1:``): that is left alone.
    """
    binary = binary or find_tc()
    require_net_admin()
    _check_device(dev)
    root = _root_qdisc(binary, dev)
    if root is None or root.get("handle") == "0:":
        return False
    if (root.get("kind"), root.get("handle")) != ("htb", ROOT):
        raise QosError(
            f"the root qdisc of {dev} is {root.get('kind')} {root.get('handle')}, not a "
            f"meshlayer qos tree; left alone (tc qdisc del dev {dev} root removes it)"
        )
    _delete_root(binary, dev)
    return True


def _delete_root(binary: str, dev: str) -> None:
    for cmd in clear_commands(dev):
        done = tc(binary, cmd.args, check=False)
        if done.returncode != 0 and not any(text in done.stderr for text in _NO_TREE):
            raise QosError(f"tc {' '.join(cmd.args)} failed: {_first_line(done.stderr)}")


def _root_qdisc(binary: str, dev: str) -> dict[str, Any] | None:
    qdiscs: list[dict[str, Any]] = json.loads(
        tc(binary, ["-j", "qdisc", "show", "dev", dev]).stdout or "[]"
    )
    return next((q for q in qdiscs if q.get("root")), None)


def show(dev: str, classes: Sequence[PriorityClass]) -> dict[str, Any]:
    """The tree on ``dev`` with per-band counters, labelled by class (JSON-able).

    ``tree`` is False when the root qdisc is not an HTB ``1:`` (nothing applied).
    """
    binary = find_tc()
    _check_device(dev)
    qdiscs: list[dict[str, Any]] = json.loads(
        tc(binary, ["-s", "-j", "qdisc", "show", "dev", dev]).stdout or "[]"
    )
    root = next((q for q in qdiscs if q.get("root")), None)
    result: dict[str, Any] = {"dev": dev, "tree": False, "root": root and root.get("kind")}
    if root is None or root.get("kind") != "htb" or root.get("handle") != ROOT:
        return result
    stats = parse_class_stats(tc(binary, ["-s", "class", "show", "dev", dev]).stdout)
    leaves = {q.get("handle"): q.get("kind") for q in qdiscs if not q.get("root")}
    by_id = {b.classid: b for b in plan_bands(classes, 1_000_000)}
    default = str(root.get("options", {}).get("default", ""))
    default_id = f"1:{int(default, 16):x}" if default.startswith("0x") else ""
    bands = []
    for s in sorted(stats, key=lambda s: s.classid):
        if s.parent == "root":
            result["rate"] = s.rate
            continue
        b = by_id.get(s.classid)
        row: dict[str, Any] = asdict(s)
        row.update(
            {
                "class": b.name if b else "?",
                "rank": b.rank if b else None,
                "dscp": b.dscp if b else None,
                "so_priority": b.so_priority if b else None,
                "leaf_kind": leaves.get(s.leaf, ""),
                "default": s.classid == default_id,
            }
        )
        bands.append(row)
    result.update(tree=True, default=default_id, bands=bands)
    result["classes_match"] = len(bands) == len(by_id) and all(r["class"] != "?" for r in bands)
    if default_id in by_id and not by_id[default_id].is_default:
        result["classes_match"] = False
    return result


def format_show(view: dict[str, Any]) -> str:
    """The ``show`` view as a readable table."""
    dev = view["dev"]
    if not view["tree"]:
        return f"no meshlayer qos tree on {dev} (root qdisc: {view['root'] or 'none'})"
    lines = [
        f"qos tree on {dev}: htb root {ROOT} rate {view.get('rate', '?')}, "
        f"unclassified traffic → {view['default']}"
    ]
    header = "band class rank dscp so_prio rate ceil leaf sent pkts dropped overlimits"
    rows = [tuple(header.split())]
    for r in view["bands"]:
        dscp = "-" if r["dscp"] is None else dscp_name(r["dscp"])
        name = r["class"] + (" *" if r["default"] else "")
        row = [r["classid"], name, _dash(r["rank"]), dscp, _dash(r["so_priority"])]
        row += [r["rate"], r["ceil"], r["leaf_kind"] or "-", _bytes(r["sent_bytes"])]
        row += [str(r[k]) for k in ("sent_packets", "dropped", "overlimits")]
        rows.append(tuple(row))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.append("* default band: traffic that no filter matches")
    if not view["classes_match"]:
        lines.append("warning: the tree does not match these classes (was it applied with others?)")
    return "\n".join(lines)


def describe(bands: Sequence[Band], dev: str, rate: int) -> str:
    """One line per band, for ``apply``'s output."""
    lines = [f"applied qos tree on {dev}, rate {format_rate(rate)}:"]
    default_minor = next((b.minor for b in bands if b.is_default), -1)
    for b in bands:
        lines.append(
            f"  {b.classid} {b.name}: rate {format_rate(b.rate)} ceil {format_rate(b.ceil)} "
            f"prio {b.prio} ← DSCP {dscp_name(b.dscp)}, SO_PRIORITY {b.so_priority}"
            + (" (and all unmarked traffic)" if b.minor == default_minor else "")
        )
    return "\n".join(lines)


def _check_device(dev: str) -> None:
    """A clear error for a missing interface (``tc`` says only "Cannot find device")."""
    ip = shutil.which("ip")
    if ip is None:
        return
    done = subprocess.run(
        [ip, "link", "show", "dev", dev], capture_output=True, text=True, check=False, timeout=10
    )
    if done.returncode != 0:
        raise QosError(f"no network interface {dev!r} here ({_first_line(done.stderr)})")


def _is_leaf(cmd: Command) -> bool:
    return cmd.args[:2] == ("qdisc", "add") and "root" not in cmd.args


def _first_line(text: str) -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), "no message")
    return line.removeprefix("Error: ").rstrip(".")


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"
