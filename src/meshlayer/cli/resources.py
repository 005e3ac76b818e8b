"""``meshlayer apply | get | delete | describe | check``: config in the control plane.

Each command is one or a few calls to the control plane's JSON API
(``docs/control-plane.md``) through :mod:`meshlayer.cli.client`. Exit codes:
0 ok, 1 runtime failure (unreachable, conflict, not found, a failed check),
2 invalid input (unreadable or invalid documents, bad flags).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from meshlayer.cli.client import (
    CLIError,
    ControlAPI,
    add_admin_flags,
    api_from_args,
    cli_command,
    path,
)

SUFFIXES = (".yaml", ".yml", ".json")
_DOC_RE = re.compile(r"\bdoc#(\d+)\b")
OK = "\N{SQUARE ROOT}"  # √
FAIL = "\N{MULTIPLICATION SIGN}"  # x

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def add_parsers(sub: SubParsers) -> None:
    """Register the commands on the ``meshlayer`` parser."""
    _add_apply(sub)
    _add_get(sub)
    _add_delete(sub)
    _add_describe(sub)
    _add_check(sub)


def _control_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        metavar="URL",
        default=None,
        help="control plane URL (default: $MESHLAYER_CONTROL, else http://127.0.0.1:15000)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="per request (default: %(default)s)",
    )
    add_admin_flags(p)


def _api(args: argparse.Namespace) -> ControlAPI:
    return api_from_args(args)


# -- apply --------------------------------------------------------------------------


def _add_apply(sub: SubParsers) -> None:
    p = sub.add_parser(
        "apply",
        help="create or update config resources in the control plane",
        description=(
            "Send every document of the given files to the control plane in one "
            "all-or-nothing apply: if any document is invalid nothing is applied and the "
            "error names the file, the document, the field and the problem. A document "
            "carrying metadata.resourceVersion is only applied if the stored one matches."
        ),
    )
    p.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE|DIR|-",
        help="YAML/JSON file (multi-document), directory (*.yaml, *.yml, *.json, "
        "sorted) or - for stdin; repeatable",
    )
    _control_flag(p)
    p.set_defaults(func=cli_command(_apply))


def _files(arg: str) -> list[Path]:
    p = Path(arg)
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES and f.is_file())
        if not found:
            raise CLIError(f"{arg}: no *.yaml, *.yml or *.json files in the directory", 2)
        return found
    if not p.exists():
        raise CLIError(f"{arg}: no such file or directory", 2)
    return [p]


def read_documents(args: list[str], stdin: TextIO) -> list[tuple[str, int, Any]]:
    """All documents of the ``-f`` arguments as (file, index in file, document)."""
    out: list[tuple[str, int, Any]] = []
    for arg in args:
        sources: list[tuple[str, str]] = []
        if arg == "-":
            sources.append(("<stdin>", stdin.read()))
        else:
            for f in _files(arg):
                try:
                    sources.append((str(f), f.read_text(encoding="utf-8")))
                except (OSError, UnicodeDecodeError) as exc:
                    raise CLIError(f"{f}: cannot read: {exc}", 2) from None
        for name, text in sources:
            try:
                docs = list(yaml.safe_load_all(text))
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(exc, "problem", None) or str(exc)
                raise CLIError(f"{name}: not valid YAML{where}: {problem}", 2) from None
            index = 0
            for doc in docs:
                if doc is None:
                    continue
                # a JSON list, or the output of `get -o json`: its items are documents
                items = doc.get("items") if isinstance(doc, dict) and "kind" not in doc else None
                for item in (
                    items if isinstance(items, list) else doc if isinstance(doc, list) else [doc]
                ):
                    index += 1
                    out.append((name, index, item))
    if not out:
        raise CLIError("no documents to apply", 2)
    return out


def _apply(args: argparse.Namespace) -> int:
    docs = read_documents(args.filename, sys.stdin)
    api = _api(args)
    try:
        data = api.expect("POST", "/v1/apply", {"documents": [d for _, _, d in docs]})
    except CLIError as exc:
        # the server names documents by their place in the apply: doc#N → file#k
        def name(m: re.Match[str]) -> str:
            n = int(m.group(1))
            if 1 <= n <= len(docs):
                f, k, _ = docs[n - 1]
                return f"{f}#{k}"
            return m.group(0)

        raise CLIError(_DOC_RE.sub(name, exc.message), exc.code) from None
    for r in data.get("results", []):
        what = f"{str(r['kind']).lower()}/{r['name']}"
        print(f"{what} {r['action']} (resourceVersion {r['resourceVersion']})")
    print(f"mesh version {data.get('version')}")
    return 0


# -- get ----------------------------------------------------------------------------


def _add_get(sub: SubParsers) -> None:
    p = sub.add_parser(
        "get",
        help="list config resources, or print one",
        description=(
            "Print resources of a kind (service, httproute; plural, any case and the short "
            "names svc, route, pc work; 'all' for every kind) as a table, or as documents "
            "with -o yaml|json."
        ),
    )
    p.add_argument(
        "kind",
        help="service (svc) | httproute (route) | authorizationpolicy | mesh | "
        "priorityclass (pc) | classificationrule | all",
    )
    p.add_argument("name", nargs="?", help="one resource by name")
    p.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    _control_flag(p)
    p.set_defaults(func=cli_command(_get))


def _summary(doc: dict[str, Any]) -> str:
    spec = doc.get("spec") or {}
    if doc.get("kind") == "Service":
        eps = spec.get("endpoints") or []
        return f"{len(eps)} static endpoints, {spec.get('loadBalancer', 'p2c-ewma')}"
    if doc.get("kind") == "HTTPRoute":
        parents = ",".join(str(p.get("name")) for p in spec.get("parentRefs") or [])
        backends = sorted(
            {
                str(b.get("name"))
                for r in spec.get("rules") or []
                for b in r.get("backendRefs") or []
            }
        )
        rules = len(spec.get("rules") or [])
        return f"parents {parents}; {rules} rules" + (
            f" -> {','.join(backends)}" if backends else ""
        )
    if doc.get("kind") == "AuthorizationPolicy":
        target = (spec.get("targetRef") or {}).get("name")
        dry = " (dry-run)" if spec.get("dryRun") else ""
        return f"{spec.get('action')} to {target}; {len(spec.get('rules') or [])} rules{dry}"
    if doc.get("kind") == "PriorityClass":
        cc = spec.get("congestionControl")
        return f"rank {spec.get('rank')}, dscp {spec.get('dscp', 0)}" + (f", {cc}" if cc else "")
    if doc.get("kind") == "ClassificationRule":
        match = spec.get("match") or {}
        conds = ",".join(sorted(match)) or "every request"
        return f"-> {spec.get('priorityClass')}, order {spec.get('order', 100)}; match {conds}"
    if doc.get("kind") == "Mesh":
        mtls = (spec.get("mtls") or {}).get("mode", "strict")
        authz = spec.get("authorization") or {}
        dry = " (dry-run)" if authz.get("dryRun") else ""
        return f"mtls {mtls}; authorization default {authz.get('default', 'allow')}{dry}"
    return ""


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _get(args: argparse.Namespace) -> int:
    api = _api(args)
    kind = args.kind
    if args.name:
        if kind.lower() == "all":
            raise CLIError("get all takes no NAME", 2)
        docs = [api.expect("GET", path("v1", "resources", kind, args.name))]
        single = True
    else:
        where = path("v1", "resources") if kind.lower() == "all" else path("v1", "resources", kind)
        listing = api.expect("GET", where)
        docs = list(listing.get("items", []))
        single = False
    if args.output == "json":
        out = docs[0] if single else {"version": listing.get("version"), "items": docs}
        print(json.dumps(out, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    elif not docs:
        print(f"no resources of kind {kind}", file=sys.stderr)
    else:
        rows = [["NAME", "KIND", "RESOURCE VERSION", "SUMMARY"]]
        for d in docs:
            meta = d.get("metadata") or {}
            rows.append(
                [
                    str(meta.get("name")),
                    str(d.get("kind")),
                    str(meta.get("resourceVersion", "")),
                    _summary(d),
                ]
            )
        print(table(rows))
    return 0


# -- delete -------------------------------------------------------------------------


def _add_delete(sub: SubParsers) -> None:
    p = sub.add_parser(
        "delete",
        help="delete a config resource",
        description="Delete one resource; --resource-version makes it conditional (409 if stale).",
    )
    p.add_argument("kind", help="service (svc) | httproute (route) | ... as for get")
    p.add_argument("name")
    p.add_argument("--resource-version", type=int, metavar="N", help="only if still at N")
    _control_flag(p)
    p.set_defaults(func=cli_command(_delete))


def _delete(args: argparse.Namespace) -> int:
    api = _api(args)
    where = path("v1", "resources", args.kind, args.name)
    if args.resource_version is not None:
        where += f"?resourceVersion={args.resource_version}"
    data = api.expect("DELETE", where)
    print(f"{args.kind.lower()}/{args.name} deleted (mesh version {data.get('version')})")
    return 0


# -- describe -----------------------------------------------------------------------


def _add_describe(sub: SubParsers) -> None:
    p = sub.add_parser(
        "describe",
        help="show a service: settings, registered endpoints and health, routes, sidecars",
        description=(
            "Show what the mesh knows about a service: its Service resource, the "
            "endpoints registered by its sidecars with their health and lease, the "
            "HTTPRoutes that route its traffic or send traffic to it, and its sidecars' "
            "config versions."
        ),
    )
    p.add_argument("kind", choices=["service", "services", "svc"], help="service")
    p.add_argument("name")
    _control_flag(p)
    p.set_defaults(func=cli_command(_describe))


def _describe(args: argparse.Namespace) -> int:
    api = _api(args)
    name = args.name
    status, svc = api.call("GET", path("v1", "resources", "service", name))
    if status != 200:
        svc = None
    registry = api.expect("GET", "/v1/registry")
    endpoints = [e for e in registry.get("endpoints", []) if e.get("service") == name]
    if svc is None and not endpoints:
        raise CLIError(f"no Service resource and no registered endpoints named {name!r}", 1)
    routes = api.expect("GET", path("v1", "resources", "httproute")).get("items", [])
    st = api.expect("GET", "/v1/status")
    mesh = st.get("version")
    lines = [f"Name:              {name}", f"Mesh version:      {mesh}"]
    if svc is not None:
        spec = svc.get("spec") or {}
        lines.append(f"Resource version:  {(svc.get('metadata') or {}).get('resourceVersion')}")
        lines.append(f"Load balancer:     {spec.get('loadBalancer', 'p2c-ewma')}")
        static = spec.get("endpoints") or []
        lines.append(f"Static endpoints:  {len(static)}")
        for e in static:
            meshed = "meshed" if e.get("meshed", True) else "not meshed"
            lines.append(f"  {e.get('address')}  ({meshed})")
    else:
        lines.append("Resource version:  none (registered endpoints only: default settings)")
    lines.append(f"Registered endpoints: {len(endpoints)}")
    if endpoints:
        rows = [["  ADDRESS", "HEALTHY", "LEASE", "SIDECAR"]]
        for e in sorted(endpoints, key=lambda e: str(e.get("address"))):
            rows.append(
                [
                    f"  {e.get('address')}",
                    "yes" if e.get("healthy", True) else "no",
                    f"{float(e.get('expires_in', 0)):.1f}s",
                    str(e.get("sidecar")),
                ]
            )
        lines.append(table(rows))
    related = []
    for r in routes:
        spec = r.get("spec") or {}
        parents = [p.get("name") for p in spec.get("parentRefs") or []]
        backends = [
            b.get("name") for rule in spec.get("rules") or [] for b in rule.get("backendRefs") or []
        ]
        role = (
            "routes its traffic"
            if name in parents
            else "sends traffic to it"
            if name in backends
            else ""
        )
        if role:
            related.append(f"  {r['metadata']['name']} ({role}): {_summary(r)}")
    lines.append(f"Routes: {len(related)}")
    lines += related
    mine = [s for s in st.get("sidecars", []) if s.get("service") == name]
    lines.append(f"Sidecars: {len(mine)}")
    for s in mine:
        state = "connected" if s.get("connected") else "not connected"
        err = f", rejected: {s['error']}" if s.get("error") else ""
        lines.append(f"  {s.get('sidecar')}  applied {s.get('applied')}  {state}{err}")
    print("\n".join(lines))
    return 0


# -- check --------------------------------------------------------------------------


def _add_check(sub: SubParsers) -> None:
    p = sub.add_parser(
        "check",
        help="check the mesh: control plane, store, and every sidecar's config version",
        description=(
            "Check that the control plane answers, its store is healthy, and every "
            "registered sidecar is connected and runs the current mesh version without "
            "having rejected it. One line per check; exit code 1 if any fails. Sidecars "
            "that are behind get --wait seconds to catch up."
        ),
    )
    _control_flag(p)
    p.add_argument(
        "--wait",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long sidecars may take to catch up before they count as behind "
        "(default: %(default)s)",
    )
    p.set_defaults(func=cli_command(_check))


def check_lines(url: str, st: dict[str, Any]) -> list[tuple[bool, str]]:
    """(passed, text) per check of one ``GET /v1/status`` answer."""
    out: list[tuple[bool, str]] = [(True, f"control plane reachable at {url}")]
    store = st.get("store") or {}
    detail = f" ({store['detail']})" if store.get("detail") else ""
    out.append(
        (bool(store.get("ok")), f"store {'healthy' if store.get('ok') else 'unhealthy'}{detail}")
    )
    mesh = st.get("version")
    sidecars = st.get("sidecars") or []
    if not sidecars:
        out.append((True, "no sidecars registered"))
    for s in sorted(sidecars, key=lambda s: str(s.get("sidecar"))):
        who = f"sidecar {s.get('sidecar')}"
        applied = s.get("applied")
        if s.get("error"):
            out.append((False, f"{who} rejected {s['error']} (keeps running version {applied})"))
        elif not s.get("connected", False):
            out.append((False, f"{who} is not connected (at version {applied}, mesh is at {mesh})"))
        elif applied != mesh:
            out.append((False, f"{who} at version {applied}, mesh is at {mesh}"))
        else:
            out.append((True, f"{who} at version {applied}"))
    return out


def _check(args: argparse.Namespace) -> int:
    api = _api(args)
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        try:
            st = api.expect("GET", "/v1/status")
        except CLIError as exc:
            print(f"{FAIL} {exc.message}")
            return 1
        lines = check_lines(api.url, st)
        if all(ok for ok, _ in lines) or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for ok, text in lines:
        print(f"{OK if ok else FAIL} {text}")
    failed = sum(1 for ok, _ in lines if not ok)
    if failed:
        print(f"{failed} check{'s' if failed > 1 else ''} failed")
        return 1
    print("all checks passed")
    return 0
