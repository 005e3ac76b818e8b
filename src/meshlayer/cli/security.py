"""``meshlayer token create`` and ``meshlayer ca show|rotate``: identity admin calls.

``ca rotate`` without ``--phase`` runs the whole trust-anchor rotation with a
progress line per step: add a new root to the bundle, wait until every live
sidecar has applied it, switch signing to it (sidecars renew at once on the
new generation), wait until every live sidecar reports a certificate from
it, then retire the old root. The control plane refuses a step whose
precondition does not hold yet (409 with the sidecars it waits for); this
command retries until ``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from meshlayer.cli.client import (
    CLIError,
    ControlAPI,
    add_admin_flags,
    api_from_args,
    cli_command,
    message,
)

PHASES = ("add", "switch", "retire")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``token`` and ``ca`` on the ``meshlayer`` parser."""
    tok = sub.add_parser(
        "token",
        help="join tokens: a sidecar's proof of who it is, for its first certificate",
        description="Create join tokens. A token is bound to one service and expires; "
        "until then it gets that service's sidecars certificates as often as they need "
        "(after a restart, or after an outage of the control plane) unless created "
        "--single-use. Give it to the sidecar as --token or MESHLAYER_TOKEN.",
    )
    tsub = tok.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)
    create = tsub.add_parser("create", help="print a new join token for a service")
    create.add_argument("--service", required=True, metavar="NAME", help="the service")
    create.add_argument(
        "--ttl", default="24h", metavar="DURATION", help="valid for (default: %(default)s)"
    )
    create.add_argument(
        "--single-use",
        action="store_true",
        help="one certificate only: a sidecar that restarts, or whose certificate expired "
        "while the control plane was away, needs a new token",
    )
    create.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    _common(create)
    create.set_defaults(func=cli_command(_token_create))

    ca = sub.add_parser(
        "ca",
        help="the mesh certificate authority: show it, rotate its root",
        description="Show the trust bundle, or rotate the trust anchor with zero failed "
        "requests (add a root, switch signing, retire the old root).",
    )
    csub = ca.add_subparsers(dest="ca_command", metavar="SUBCOMMAND", required=True)
    show = csub.add_parser("show", help="trust domain, roots, signing root, generation")
    show.add_argument("--json", action="store_true", help="print the answer as JSON")
    _common(show)
    show.set_defaults(func=cli_command(_ca_show))
    rot = csub.add_parser("rotate", help="rotate the root (all steps, or one with --phase)")
    rot.add_argument(
        "--phase",
        choices=PHASES,
        default=None,
        help="do one step only (default: all three, waiting for the sidecars between them)",
    )
    rot.add_argument(
        "--force",
        action="store_true",
        help="do the step even if some sidecars are not ready (their requests may fail)",
    )
    rot.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the sidecars before a step (default: %(default)s)",
    )
    _common(rot)
    rot.set_defaults(func=cli_command(_ca_rotate))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        metavar="URL",
        default=None,
        help="control plane URL (default: $MESHLAYER_CONTROL, else http://127.0.0.1:15000)",
    )
    add_admin_flags(p)
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="per request")


def _api(args: argparse.Namespace) -> ControlAPI:
    return api_from_args(args)


def _token_create(args: argparse.Namespace) -> int:
    from meshlayer.cli.control import parse_seconds

    ttl = parse_seconds(args.ttl)
    if ttl is None:
        raise CLIError(f"--ttl: {args.ttl!r} is not a duration (24h, 30m, 90s)", 2)
    body: dict[str, Any] = {"service": args.service, "ttl": ttl}
    if args.single_use:
        body["singleUse"] = True
    out = _api(args).expect("POST", "/v1/tokens", body)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(out["token"])
    return 0


def _ca_show(args: argparse.Namespace) -> int:
    out = _api(args).expect("GET", "/v1/ca")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"trust domain: {out['trustDomain']}   generation: {out['generation']}")
    for r in out["roots"]:
        when = time.strftime("%Y-%m-%d", time.gmtime(r["notAfter"]))
        mark = "signing" if r["signing"] else "trusted"
        print(f"  {mark:8} {r['fingerprint']}  until {when}")
    return 0


def _step(api: ControlAPI, phase: str, force: bool, wait: float) -> dict[str, Any]:
    """POST one rotation phase, retrying while the control plane says sidecars lag."""
    deadline = time.monotonic() + wait
    last = ""
    while True:
        status, data = api.call("POST", "/v1/ca/rotate", {"phase": phase, "force": force})
        if status == 200:
            return dict(data)
        if status != 409 or not isinstance(data, dict) or "waiting" not in data:
            api.expect("POST", "/v1/ca/rotate", {"phase": phase, "force": force})  # raises
            raise CLIError(f"{phase}: control plane answered {status}: {message(data)}")
        line = f"  waiting: {message(data)}"
        if line != last:
            print(line, flush=True)
            last = line
        if time.monotonic() >= deadline:
            raise CLIError(
                f"{phase}: sidecars not ready after {wait:g}s ({message(data)}); "
                f"run `meshlayer ca rotate --phase {phase}` again later, or add --force",
                1,
            )
        time.sleep(0.25)


def _ca_rotate(args: argparse.Namespace) -> int:
    api = _api(args)
    phases = [args.phase] if args.phase else list(PHASES)
    for phase in phases:
        print(f"{phase}: ...", flush=True)
        out = _step(api, phase, args.force, args.wait)
        roots = ", ".join(fp[:16] for fp in out["roots"])
        print(
            f"{phase}: done; generation {out['generation']}, signing {out['signing'][:16]}, "
            f"bundle [{roots}]",
            flush=True,
        )
    return 0
