"""``meshlayer net qos apply|show|clear``: the host's packet scheduler for priority classes."""

from __future__ import annotations

import argparse
import json
import sys

from meshlayer.config.errors import ConfigError
from meshlayer.config.model import PriorityClass
from meshlayer.config.priority import merge_defaults


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    net = sub.add_parser(
        "net",
        help="host network set-up for the mesh (qos: tc tree for priority classes)",
        description="Host network set-up for the mesh.",
    )
    net_sub = net.add_subparsers(dest="net_command", metavar="COMMAND", required=True)
    qos = net_sub.add_parser(
        "qos",
        help="install, show or remove the tc tree that honours the classes' marks",
        description=(
            "Manage an HTB tree on one interface's egress with one band per priority "
            "class (guaranteed rate by the class's weight, ceiling RATE, priority by "
            "rank), an fq_codel queue per band, and filters that put packets in the "
            "band of their DSCP or SO_PRIORITY mark. Needs the `tc` command (Debian "
            "package iproute2); apply and clear need CAP_NET_ADMIN."
        ),
    )
    qos_sub = qos.add_subparsers(dest="qos_command", metavar="ACTION", required=True)

    p = qos_sub.add_parser(
        "apply",
        help="install the tree on an interface (replaces its root qdisc)",
        description="Replace the root qdisc of IFACE with the priority-class tree.",
    )
    _dev(p)
    p.add_argument(
        "--rate",
        required=True,
        metavar="RATE",
        help="bandwidth the tree shares out, a little below the link's: 100mbit, 1gbit, 10mbps",
    )
    _classes(p)
    p.add_argument(
        "--leaf",
        choices=("fq_codel", "pfifo"),
        default="fq_codel",
        help="queue of each band (default: %(default)s; pfifo when the kernel lacks fq_codel)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the tc commands instead of running them"
    )
    p.set_defaults(func=_apply)

    p = qos_sub.add_parser(
        "show",
        help="print the tree and per-band counters",
        description="Print the tree on IFACE, one row per band with its class and counters.",
    )
    _dev(p)
    _classes(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_show)

    p = qos_sub.add_parser(
        "clear",
        help="remove the tree (restores the kernel's default qdisc)",
        description=(
            "Delete the tree (an HTB root 1:) from IFACE with its classes and filters; "
            "another root qdisc is left alone (exit 1)."
        ),
    )
    _dev(p)
    p.set_defaults(func=_clear)


def _dev(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dev", required=True, metavar="IFACE", help="network interface, e.g. eth0")


def _classes(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--classes",
        metavar="FILE",
        help="YAML with PriorityClass documents (other kinds are ignored); "
        "default: the shipped classes critical, default, batch",
    )


def _load_classes(path: str | None) -> list[PriorityClass]:
    if path is None:
        return list(merge_defaults([]).values())
    from meshlayer.config.load import load_file

    return list(load_file(path).priority_classes.values())


def _apply(args: argparse.Namespace) -> int:
    from meshlayer.netqos import plan, run

    try:
        classes = _load_classes(args.classes)
        rate = plan.parse_rate(args.rate)
        if args.dry_run:
            for cmd in plan.clear_commands(args.dev) + plan.apply_commands(
                args.dev, classes, rate, args.leaf
            ):
                extra = f"  # optional: {cmd.optional}" if cmd.optional else ""
                print("tc " + " ".join(_quote(a) for a in cmd.args) + extra)
            return 0
    except (ConfigError, plan.PlanError) as exc:
        print(f"meshlayer net qos: {exc}", file=sys.stderr)
        return 2
    try:
        bands = run.apply(args.dev, classes, rate, args.leaf, note=_note)
    except run.QosError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(run.describe(bands, args.dev, rate))
    return 0


def _show(args: argparse.Namespace) -> int:
    from meshlayer.netqos import run

    try:
        classes = _load_classes(args.classes)
    except ConfigError as exc:
        print(f"meshlayer net qos: {exc}", file=sys.stderr)
        return 2
    try:
        view = run.show(args.dev, classes)
    except run.QosError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(view, indent=2) if args.json else run.format_show(view))
    return 0


def _clear(args: argparse.Namespace) -> int:
    from meshlayer.netqos import plan, run

    try:
        removed = run.clear(args.dev)
    except plan.PlanError as exc:
        print(f"meshlayer net qos: {exc}", file=sys.stderr)
        return 2
    except run.QosError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"removed the qos tree from {args.dev}" if removed else f"no qos tree on {args.dev}")
    return 0


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def _quote(arg: str) -> str:
    return f"'{arg}'" if " " in arg or "(" in arg else arg
