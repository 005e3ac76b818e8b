"""``meshlayer gateway``: run the mesh's ingress gateway (see :mod:`meshlayer.proxy.gateway`)."""

from __future__ import annotations

import argparse

from meshlayer.cli.proxyflags import add_proxy_flags


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``meshlayer gateway`` on the ``meshlayer`` parser."""
    p = sub.add_parser(
        "gateway",
        help="run the ingress gateway: the mesh's edge, where requests get their priority class",
        description=(
            "Run an ingress gateway: a sidecar without an app that takes plain HTTP from "
            "outside clients on --listen and routes it like a sidecar's outbound listener "
            "(Host or absolute-form target to a service of the mesh, then HTTPRoutes), with "
            "mTLS to meshed endpoints when it has an identity (--token). Each request gets "
            "its priority class from the ClassificationRules (first match by order, then "
            "name; else the destination service's priorityClass), forwarded as "
            "x-meshlayer-priority; a class a client sends itself is never trusted. Config "
            "comes from --config or the control plane, and reloads without a restart."
        ),
    )
    p.add_argument(
        "--listen",
        default="0.0.0.0:8080",
        metavar="HOST:PORT",
        help="listener for outside clients, plain HTTP (default: %(default)s)",
    )
    p.add_argument(
        "--admin",
        default="127.0.0.1:15091",
        metavar="HOST:PORT",
        help="admin listener: /ready /live /metrics /config (default: %(default)s)",
    )
    p.add_argument(
        "--name",
        default="gateway",
        help="the gateway's name: its identity (join tokens are made for it) and the "
        "x-meshlayer-source it sends (default: %(default)s)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config (Service, HTTPRoute, PriorityClass, ClassificationRule); required "
        "without --control, which uses it only until the first snapshot when there is no "
        "saved copy",
    )
    add_proxy_flags(p, "gateway", "--listen")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from meshlayer.proxy.gateway import run_gateway_cli

    return run_gateway_cli(args)
