"""``meshlayer control``: run the control plane (API, registry, watch streams)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from meshlayer.control.store import Store
from meshlayer.proxy.loop import run

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
        "--listen-mtls",
        default="127.0.0.1:15012",
        metavar="HOST:PORT",
        help="mesh listener for sidecars, mTLS with certificates from the mesh CA "
        "('off' for none; default: %(default)s)",
    )
    p.add_argument(
        "--trust-domain",
        default="meshlayer.local",
        metavar="DOMAIN",
        help="SPIFFE trust domain of workload identities (default: %(default)s)",
    )
    p.add_argument(
        "--cert-ttl",
        default="24h",
        metavar="DURATION",
        help="lifetime of workload certificates, e.g. 24h, 90m, 20s (default: %(default)s)",
    )
    p.add_argument(
        "--ca-cert",
        metavar="FILE",
        help="PEM root certificate to use when the store has no CA yet (with --ca-key)",
    )
    p.add_argument("--ca-key", metavar="FILE", help="PEM private key of --ca-cert")
    p.add_argument(
        "--allow-plaintext-sidecars",
        action="store_true",
        help="let sidecars without a certificate use the plain API listener for registry, "
        "watch and status (migration; otherwise 401)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: %(default)s)",
    )
    p.set_defaults(func=run_control_cli)


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
    try:
        security = _security(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    plane = ControlPlane(
        store,
        host.strip("[]"),
        port,
        keepalive=args.keepalive,
        health_checks=not args.no_health_checks,
        max_body=args.max_body,
        security=security,
    )
    return run(_serve(plane))


def _security(args: argparse.Namespace) -> Any:
    """The security flags as a :class:`~meshlayer.control.server.Security`; ValueError
    naming the flag."""
    from pathlib import Path

    from meshlayer.config.load import parse_address
    from meshlayer.control.ca import load_root, parse_spiffe_id
    from meshlayer.control.server import Security
    from meshlayer.control.tokens import load_admin_token, state_dir_for

    ttl = parse_seconds(args.cert_ttl)
    if ttl is None or ttl < 1:
        raise ValueError(f"--cert-ttl: {args.cert_ttl!r} is not a duration of >= 1s (24h, 20s)")
    if parse_spiffe_id(f"spiffe://{args.trust_domain}/ns/a/sa/b") is None or not all(
        c.isalnum() or c in "-._" for c in args.trust_domain
    ):
        raise ValueError(f"--trust-domain: {args.trust_domain!r} is not a valid trust domain")
    root = None
    if bool(args.ca_cert) != bool(args.ca_key):
        raise ValueError("--ca-cert and --ca-key go together")
    if args.ca_cert:
        try:
            root = load_root(Path(args.ca_cert).read_bytes(), Path(args.ca_key).read_bytes())
        except OSError as exc:
            raise ValueError(f"--ca-cert/--ca-key: {exc}") from None
    mtls_host, mtls_port = "", None
    if args.listen_mtls != "off":
        try:
            host, mtls_port = parse_address(args.listen_mtls)
        except ValueError as exc:
            raise ValueError(f"--listen-mtls: {exc}") from None
        mtls_host = host.strip("[]")
    token, path = load_admin_token(state_dir_for(args.store))
    if path is None:
        log.info("admin token: from MESHLAYER_ADMIN_TOKEN")
    else:
        log.info(
            "admin token file: %s (mode 0600; the CLI takes it as --admin-token-file "
            "or MESHLAYER_ADMIN_TOKEN_FILE)",
            path.absolute(),
        )
    return Security(
        admin_token=token,
        trust_domain=args.trust_domain,
        cert_ttl=ttl,
        supplied_root=root,
        mtls_host=mtls_host,
        mtls_port=mtls_port,
        allow_plaintext_sidecars=args.allow_plaintext_sidecars,
    )


def parse_seconds(text: str) -> float | None:
    """``90``, ``20s``, ``15m``, ``24h``, ``7d`` → seconds; None if it is none of those."""
    text = text.strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}.get(text[-1:] if text else "")
    number = text[:-1] if scale else text
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        return None
    return value if value > 0 and value == value and value != float("inf") else None


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
