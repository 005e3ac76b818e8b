"""``meshlayer control``: run the control plane (API, registry, watch streams)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from meshlayer.control.store import Store

log = logging.getLogger("meshlayer.control")

DEFAULT_STORE = "sqlite:.meshlayer/control.db"


class StoreURLError(ValueError):
    """A --store value that names no store we can open."""


def open_store(url: str) -> Store:
    """``sqlite:PATH`` or ``etcd://HOST:PORT[,HOST:PORT...]`` → a (not yet opened) store."""
    if url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
        if path.startswith("//"):  # sqlite:///abs/path
            path = path[2:]
        if not path:
            raise StoreURLError("sqlite: needs a file path, e.g. sqlite:.meshlayer/control.db")
        from meshlayer.control.sqlite import SqliteStore

        return SqliteStore(path)
    if url.startswith("etcd://"):
        from meshlayer.control.etcd import EtcdStore

        try:  # etcd://HOST:PORT[,HOST:PORT...][/key-prefix/]
            store: Store = EtcdStore.from_url(url)
        except ValueError as exc:
            raise StoreURLError(str(exc)) from None
        return store
    raise StoreURLError(f"unknown store {url!r}: use sqlite:PATH or etcd://HOST:PORT[,...]")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "control",
        help="run the control plane: config API, registry, health checks, watch streams",
        description=(
            "Run a control-plane process: a JSON API over HTTP/1.1 to apply and read "
            "config, a registry of sidecars with leases, active health checks, and the "
            "watch streams that push versioned snapshots to sidecars. See "
            "docs/control-plane.md; GET /openapi.json describes the API."
        ),
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:15000",
        metavar="HOST:PORT",
        help="API listener (default: %(default)s)",
    )
    p.add_argument(
        "--store",
        default=DEFAULT_STORE,
        metavar="URL",
        help="sqlite:PATH or etcd://HOST:PORT[,HOST:PORT...][/PREFIX/] (default: %(default)s)",
    )
    p.add_argument(
        "--keepalive",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="keep-alive comment interval on idle watch streams (default: %(default)s)",
    )
    p.add_argument(
        "--no-health-checks",
        action="store_true",
        help="do not run the active health checks of Services with spec.healthCheck",
    )
    p.add_argument(
        "--max-body",
        type=int,
        default=8 * 1024 * 1024,
        metavar="BYTES",
        help="largest request body accepted (413 beyond; default: %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: %(default)s)",
    )
    p.set_defaults(func=run_control_cli)


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    code: int = uvloop.run(main)
    return code


def run_control_cli(args: argparse.Namespace) -> int:
    from meshlayer.config.load import parse_address
    from meshlayer.control.server import ControlPlane

    try:
        host, port = parse_address(args.listen)
    except ValueError as exc:
        log.error("--listen: %s", exc)
        return 2
    try:
        store = open_store(args.store)
    except (ValueError, StoreURLError) as exc:
        log.error("--store: %s", exc)
        return 2
    plane = ControlPlane(
        store,
        host.strip("[]"),
        port,
        keepalive=args.keepalive,
        health_checks=not args.no_health_checks,
        max_body=args.max_body,
    )
    return _run(_serve(plane))


async def _serve(plane: Any) -> int:
    from meshlayer.control.store import StoreError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await plane.start()
    except (StoreError, OSError) as exc:
        log.error("cannot start: %s", exc)
        await plane.close()
        return 1
    await stop.wait()
    log.info("shutting down")
    await plane.close()
    log.info("stopped")
    return 0
