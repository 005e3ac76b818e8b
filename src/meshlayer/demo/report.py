"""What the demo prints: the summary table after the load, and the hints after it."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from meshlayer.demo.layout import CONFIG_NAME, DB_NAME, EDGE, INSTANCES, ROWS
from meshlayer.demo.load import LoadResult, RouteStats
from meshlayer.demo.mesh import CANARY_HEADER, ROUTE, SPLIT
from meshlayer.demo.procs import HOST


def cli_command() -> str:
    """How the user runs ``meshlayer``: by name when PATH finds this installation's
    script, else by its path (``.venv/bin/meshlayer`` after ``make demo``)."""
    script = Path(sys.executable).parent / "meshlayer"
    found = shutil.which("meshlayer")
    if not script.exists() or (found and Path(found).resolve() == script.resolve()):
        return "meshlayer"
    rel = os.path.relpath(script)
    return rel if not rel.startswith("..") else str(script)


def _ms(seconds: float | None, approx: bool = False) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000.0
    text = f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"
    return ("~" if approx else "") + text + " ms"


def _rate(ok: int, total: int) -> str:
    if total == 0:
        return "-"
    # Rounded down: anything short of every request never shows as 100.0%.
    return f"{(ok * 1000 // total) / 10:.1f}%"


def render_table(
    per_row: dict[str, RouteStats],
    per_instance: dict[str, int],
    load: LoadResult,
    control: str,
) -> str:
    """The summary: per app, end to end, the control plane, and the catalog split.

    ``per_instance``: requests each catalog instance's sidecar took in;
    ``control``: the control plane's line (:meth:`MeshStatus.line`).
    """
    head = f"  {'service':<15}{'replicas':>9}{'requests':>10}{'success':>9}{'p50':>11}{'p99':>11}"
    rows = [head, "  " + "-" * (len(head) - 2)]
    for row in ROWS:
        st = per_row[row]
        n = sum(1 for i in INSTANCES if i.app == row)
        rows.append(
            f"  {row:<15}{n:>9}{st.total:>10}{_rate(st.ok, st.total):>9}"
            f"{_ms(st.quantile(0.5), True):>11}{_ms(st.quantile(0.99), True):>11}"
        )
    rows.append(
        f"  {'end to end':<15}{'-':>9}{load.total:>10}{_rate(load.ok, load.total):>9}"
        f"{_ms(load.quantile(0.5)):>11}{_ms(load.quantile(0.99)):>11}"
    )
    rows.append("")
    rows.append(f"  {'control plane':<15}{control}")
    rows.append("")
    rows.append("  service rows: each app's sidecars, inbound requests from the mesh (p50/p99")
    rows.append("  interpolated from histogram buckets); end to end: the load generator, through")
    rate = load.total / load.elapsed if load.elapsed > 0 else 0.0
    rows.append(
        f"  the edge: {load.total} requests in {load.elapsed:.1f}s ({rate:.0f} req/s); "
        "success = a status below 500."
    )
    if load.errors or any(s >= 500 for s in load.statuses):
        failures = [f"{n}x HTTP {s}" for s, n in sorted(load.statuses.items()) if s >= 500]
        failures += [f"{n}x {e}" for e, n in sorted(load.errors.items())]
        rows.append("  failed: " + ", ".join(failures))
    rows.append("")
    weights = ", ".join(f"{name} {w}" for name, w in SPLIT)
    agree = all(load.catalog_replicas.get(name, 0) == n for name, n in per_instance.items())
    rows.append(f"  catalog by version, HTTPRoute {ROUTE}: /items -> {weights}")
    rows.append(
        "  (their sidecars' counts" + ("; the frontend's answers agree):" if agree else "):")
    )
    total = sum(per_instance.values())
    total_weight = sum(w for _, w in SPLIT)
    for service, weight in SPLIT:
        members = [i for i in INSTANCES if i.service == service]
        n = sum(per_instance.get(i.name, 0) for i in members)
        share = n / total if total else 0.0
        rows.append(
            f"    {service:<14}{n:>7}{share:>8.1%}  weight {weight}/{total_weight}  "
            f"{'#' * round(share * 40)}"
        )
        for inst in members:
            line = f"      {inst.name:<14}{per_instance.get(inst.name, 0):>5}"
            if not agree:
                line += f"   (frontend answers: {load.catalog_replicas.get(inst.name, 0)})"
            rows.append(line)
    return "\n".join(rows)


def render_howto(base: int, state: Path, control_url: str, catalog_pid: int) -> str:
    entry = f"http://{HOST}:{EDGE.outbound(base)}"
    frontend, catalog = INSTANCES[1], INSTANCES[2]
    ml = cli_command()
    ctl = f"--control {control_url}"
    admin = f'--admin-token "$(cat {state / "admin-token"})"'

    mesh = state / CONFIG_NAME
    lines = [
        "The mesh is up. Enter it through the edge sidecar:",
        f"  curl -H 'Host: frontend' {entry}/",
        f"  curl -x {entry} 'http://frontend/shop?item=3'",
        f"  curl -x {entry} http://catalog/items          # any service, by name",
        f"  curl -x {entry} -H '{CANARY_HEADER}: 1' http://frontend/    # catalog-v2 answers",
        f"Ask the control plane ({control_url}, store sqlite:{state / DB_NAME}):",
        f"  {ml} get services {ctl}",
        f"  {ml} describe service catalog {ctl}      # its route",
        f"  {ml} describe service catalog-v1 {ctl}   # its sidecars, health, leases",
        f"  {ml} check {ctl}",
        "Change the mesh live: edit the weights in mesh.yaml and apply it again, e.g. 50/50:",
        f"  sed -i.bak -e 's/weight: 80/weight: 50/' -e 's/weight: 20/weight: 50/' {mesh} "
        f"&& {ml} apply -f {mesh} {ctl} {admin}",
        "Look inside a sidecar:",
        f"  curl http://{HOST}:{frontend.admin(base)}/metrics    # frontend-1's",
        f"  curl http://{HOST}:{catalog.admin(base)}/config     # catalog-v1-1's, with its version",
        "Break something:",
        f"  kill {catalog_pid}    # catalog-v1-1's app: the mesh retries and routes around it,",
        f"  {'':<{len(str(catalog_pid))}}         # and the health check takes it out of rotation",
        f"Config, state and logs: {state}{os.sep}   (port layout: pydoc meshlayer.demo.run)",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)
