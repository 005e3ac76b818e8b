"""What the demo prints besides the view: where to point curl, and a one-line status."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from meshlayer.demo.layout import CONFIG_NAME, DB_NAME, GATEWAY, instance
from meshlayer.demo.procs import HOST
from meshlayer.demo.view import Monitor, class_rows, ms, pct


def cli_command() -> str:
    """How the user runs ``meshlayer``: by name when PATH finds this installation's
    script, else by its path (``.venv/bin/meshlayer`` after ``make demo``)."""
    script = Path(sys.executable).parent / "meshlayer"
    found = shutil.which("meshlayer")
    if not script.exists() or (found and Path(found).resolve() == script.resolve()):
        return "meshlayer"
    rel = os.path.relpath(script)
    return rel if not rel.startswith("..") else str(script)


def status_line(mon: Monitor, t: float, phase: str) -> str:
    """``t=10s batch ON | critical 40.1/s 100.0% p99 31 ms shed 0.0/s | batch ...``."""
    pair = mon.pair()
    if pair is None or pair[0] is pair[1]:
        return f"t={t:.0f}s {phase}"
    rows, _ = class_rows(*pair)
    parts = [
        f"{r.name} {r.rate:.1f}/s {pct(r.traffic.ok, r.traffic.total)} "
        f"p99 {ms(r.traffic.quantile(0.99))} shed {r.shed_rate:.1f}/s"
        for r in rows
    ]
    return f"t={t:.0f}s {phase} | " + " | ".join(parts)


def render_howto(base: int, state: Path, control_url: str, recs_pid: int) -> str:
    entry = f"http://{HOST}:{GATEWAY.outbound(base)}"
    recs = instance("recommendations")
    gw_admin = f"http://{HOST}:{GATEWAY.admin(base)}"
    ml = cli_command()
    ctl = f"--control {control_url}"
    admin = f'--admin-token "$(cat {state / "admin-token"})"'
    mesh = state / CONFIG_NAME
    lines = [
        "The shop is up. Enter it through the gateway (the class comes from mesh.yaml's rules):",
        f"  curl -i -H 'Host: frontend' {entry}/                          # critical",
        f"  curl -i -H 'Host: frontend' -A 'mybot/1.0' {entry}/product/3  # batch",
        f"  curl -i -H 'Host: frontend' -H 'x-meshlayer-priority: critical' -A bot {entry}/"
        "   # still batch: never trusted",
        f"  curl -i -x {entry} -X POST -H 'x-user: ana' http://frontend/checkout   # an email",
        f"  curl {gw_admin}/metrics | grep -E 'classified|priority='     # the gateway's counts",
        f"  curl http://{HOST}:{recs.admin(base)}/metrics | grep -E 'shed|queue'   "
        "# the bottleneck's queues",
        f"  curl http://{HOST}:{instance('email').app_port(base)}/stats        "
        "# emails by class, time queued",
        f"Ask the control plane ({control_url}, store sqlite:{state / DB_NAME}):",
        f"  {ml} get services {ctl}",
        f"  {ml} check {ctl}",
        f"Change the mesh live: edit {mesh} (a rule, a class), then",
        f"  {ml} apply -f {mesh} {ctl} {admin}",
        f"Break something: kill {recs_pid}   (the recommendations app)",
        f"Config, state and logs: {state}{os.sep}   (port layout: pydoc meshlayer.demo.run)",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)
