"""``meshlayer``: one command, a subcommand per part.

Every subcommand has ``--help``. Exit codes: 0 ok, 1 runtime failure,
2 usage or config error (nothing started).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from meshlayer import __version__
from meshlayer.cli.control import add_parser as add_control_parser
from meshlayer.cli.net import add_parser as add_net_parser
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
    p.add_argument(
        "--control",
        metavar="URL[,URL...]",
        default=os.environ.get("MESHLAYER_CONTROL"),
        help="follow this control plane: register, watch, apply pushed config; several "
        "URLs (control processes over one etcd store) are tried in turn when one fails "
        "(default: $MESHLAYER_CONTROL, else none: static --config only)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the last good pushed config is saved (default: ./.meshlayer/sidecar-SERVICE)",
    )
    p.add_argument(
        "--token",
        metavar="TOKEN",
        help="join token from `meshlayer token create --service NAME`: the sidecar gets a "
        "certificate for its service and speaks mTLS (default: $MESHLAYER_TOKEN, else "
        "plaintext, which the control plane allows only with --allow-plaintext-sidecars)",
    )
    p.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="inbound address registered for peers to dial (default: --inbound, "
        "with 127.0.0.1 for a wildcard host)",
    )
    p.add_argument(
        "--lease-ttl",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="registration lease, renewed every third of it (default: %(default)s)",
    )
    p.add_argument(
        "--reconnect-max",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="longest wait between control-plane reconnects (default: %(default)s)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="on SIGTERM, time in-flight requests get to finish (default: %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a client must send a whole request head within this time (default: %(default)s)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="close client connections idle this long between requests (default: %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: %(default)s)",
    )
    p.add_argument(
        "--access-log", action="store_true", help="log one line per request (costs speed)"
    )
    p.set_defaults(func=_run_sidecar)


def _run_sidecar(args: argparse.Namespace) -> int:
    from meshlayer.proxy.sidecar import run_sidecar_cli

    return run_sidecar_cli(args)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the demo mesh: services with sidecars, some traffic, a summary table",
        description=(
            "Start a control plane (SQLite store under .meshlayer/demo/), apply the "
            "demo's mesh config (.meshlayer/demo/mesh.yaml) through its API, then a small "
            "microservice app (a frontend calling two backends, one of them in two "
            "versions split by an HTTPRoute), each instance with its own sidecar following "
            "the control plane; send traffic through the mesh, print a table and stay up "
            "until Ctrl-C."
        ),
    )
    p.add_argument(
        "--requests", type=int, default=2000, help="requests to send (default: %(default)s)"
    )
    p.add_argument(
        "--concurrency", type=int, default=16, help="parallel clients (default: %(default)s)"
    )
    p.add_argument(
        "--port-base",
        type=int,
        default=18000,
        help="first port of the block the demo uses (default: %(default)s)",
    )
    p.add_argument(
        "--exit", action="store_true", help="exit after printing the table instead of staying up"
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
