"""The flags ``meshlayer sidecar`` and ``meshlayer gateway`` share.

Both run a :class:`~meshlayer.proxy.sidecar.Sidecar` (the gateway in gateway
mode), so they follow a control plane, get an identity, time out clients and
log the same way; :func:`add_proxy_flags` defines those flags once, and
:func:`meshlayer.proxy.sidecar.common_options` validates them once.
"""

from __future__ import annotations

import argparse
import os


def add_proxy_flags(p: argparse.ArgumentParser, kind: str, listener: str) -> None:
    """Add the shared flags to ``p``.

    Args:
        kind: ``sidecar`` or ``gateway``, as the help and the state directory say it.
        listener: the flag of the address registered with the control plane by default.
    """
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
        help=f"where the last good pushed config is saved (default: ./.meshlayer/{kind}-"
        + ("SERVICE)" if kind == "sidecar" else "NAME)"),
    )
    p.add_argument(
        "--token",
        "--join-token",
        dest="token",
        metavar="TOKEN",
        help=f"join token from `meshlayer token create --service NAME`: the {kind} gets a "
        "certificate for its name and speaks mTLS to meshed endpoints (default: "
        "$MESHLAYER_TOKEN, else plaintext, which the control plane allows only with "
        "--allow-plaintext-sidecars)",
    )
    p.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help=f"address registered with the control plane (default: {listener}, with "
        "127.0.0.1 for a wildcard host)",
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
