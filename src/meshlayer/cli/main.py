"""``meshlayer``: one command, a subcommand per part.

Every subcommand has ``--help``. Exit codes: 0 ok, 1 runtime failure,
2 usage or config error (nothing started).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from meshlayer import __version__
from meshlayer.cli.control import add_parser as add_control_parser
from meshlayer.cli.gateway import add_parser as add_gateway_parser
from meshlayer.cli.net import add_parser as add_net_parser
from meshlayer.cli.proxyflags import add_proxy_flags
from meshlayer.cli.resources import add_parsers as add_resource_parsers
from meshlayer.cli.security import add_parsers as add_security_parsers


def _add_sidecar(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sidecar",
        help="run a sidecar proxy next to one service instance",
        description=(
            "Run a sidecar: an outbound listener the local app sends plain HTTP to "
            "(explicit proxy or Host-addressed), an inbound listener that hands requests "
            "from other sidecars to the local app, and an admin listener."
        ),
    )
    p.add_argument("--service", required=True, help="name of the service this sidecar serves")
    p.add_argument(
        "--app",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="the local app's listener, where inbound requests go (default: %(default)s)",
    )
    p.add_argument(
        "--inbound",
        default="0.0.0.0:15006",
        metavar="HOST:PORT",
        help="inbound listener for traffic from other sidecars (default: %(default)s)",
    )
    p.add_argument(
        "--outbound",
        default="127.0.0.1:15001",
        metavar="HOST:PORT",
        help="outbound listener the local app sends requests to (default: %(default)s)",
    )
    p.add_argument(
        "--admin",
        default="127.0.0.1:15090",
        metavar="HOST:PORT",
        help="admin listener: /ready /live /metrics /config (default: %(default)s)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config (Service, HTTPRoute); required without --control, which "
        "uses it only until the first snapshot when there is no saved copy",
    )
    add_proxy_flags(p, "sidecar", "--inbound")
    p.add_argument(
        "--priority",
        choices=["on", "off"],
        default="on",
        help="on: each priority class gets its own request queues, upstream connection pools "
        "and socket marks (DSCP, SO_PRIORITY, TCP congestion control); off: FIFO, one queue "
        "and one pool per service whose sockets carry the default class's marks, while the "
        "x-meshlayer-priority header is still forwarded (default: %(default)s)",
    )
    p.set_defaults(func=_run_sidecar)


def _run_sidecar(args: argparse.Namespace) -> int:
    from meshlayer.proxy.sidecar import run_sidecar_cli

    return run_sidecar_cli(args)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the demo shop behind the gateway under mixed load, with a live view",
        description=(
            "Start a control plane (SQLite store under .meshlayer/demo/), apply the demo's "
            "mesh config (.meshlayer/demo/mesh.yaml: services, priority classes, the "
            "gateway's ClassificationRules) through its API, a private RabbitMQ, then a "
            "shop of eight services, each with its own sidecar, behind `meshlayer "
            "gateway`; send interactive shoppers (critical) mixed with a crawler and a "
            "reorder job (batch) past the recommendations service's capacity, and show "
            "each class's rate, success, p50/p99 and shed rate live, until Ctrl-C."
        ),
    )
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="send load this long, then print the summary (default: until Ctrl-C)",
    )
    p.add_argument(
        "--exit",
        action="store_true",
        help="with --duration: stop after the summary (exit 1 if, with priority on, under "
        "95%% of the critical requests succeeded) instead of staying up",
    )
    p.add_argument(
        "--users", type=int, default=12, help="interactive shoppers (default: %(default)s)"
    )
    p.add_argument(
        "--crawl-rate",
        type=float,
        default=120.0,
        metavar="PER_SECOND",
        help="the crawler's pages per second while on (default: %(default)s)",
    )
    p.add_argument(
        "--reorder-rate",
        type=float,
        default=15.0,
        metavar="PER_SECOND",
        help="the reorder job's orders per second while on (default: %(default)s)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="refresh the live view this often (default: %(default)s)",
    )
    p.add_argument(
        "--priority",
        choices=["on", "off"],
        default="on",
        help="off: run the sidecars with --priority off (FIFO queues and pools) to see "
        "the same load without prioritization (default: %(default)s)",
    )
    p.add_argument(
        "--no-broker",
        dest="broker",
        action="store_false",
        help="start no RabbitMQ (checkout then queues no emails)",
    )
    p.add_argument(
        "--port-base",
        type=int,
        default=18000,
        help="first port of the block the demo uses (default: %(default)s)",
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from meshlayer.demo.run import run_demo_cli

    code: int = run_demo_cli(args)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshlayer",
        description="meshlayer: a service mesh that treats the mesh as a network layer.",
    )
    parser.add_argument("--version", action="version", version=f"meshlayer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_sidecar(sub)
    add_gateway_parser(sub)
    _add_demo(sub)
    add_control_parser(sub)
    add_resource_parsers(sub)
    add_security_parsers(sub)
    add_net_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "info")).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code: int = args.func(args)
    return code
