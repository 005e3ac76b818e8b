"""`meshlayer demo --duration N --exit` end to end: the shop of eight services behind the
gateway, on its control plane, with its own RabbitMQ, under mixed load. The gateway's
rules classify shoppers critical and the crawler and reorder job batch, the apps carry
the class through the call graph, the email worker gets order emails of both classes
through RabbitMQ, critical requests succeed, and nothing is left running afterwards."""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshlayer.config.load import load_file
from tests.support.rabbitmq import rabbitmq_missing

ROOT = Path(__file__).resolve().parents[2]
SPAN = 84  # the demo uses ports BASE .. BASE+83 (see meshlayer.demo.run)
SIDECARS = 9  # the gateway and one sidecar per app
PROCESSES = 20  # control plane, epmd, rabbitmq-server, gateway, 8 apps, 8 sidecars
SERVICES = ("frontend", "catalog", "cart", "recommendations", "checkout", "payment", "inventory")
DURATION = 12


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_block() -> int:
    """A base whose whole block is free, below the usual ephemeral port range."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 31900, 100)
        if all(_bindable(p) for p in range(base, base + SPAN)):
            return base
    raise RuntimeError("no free block of ports for the demo")


def _processes_mentioning(needle: str) -> list[str]:
    """Command lines of live processes containing ``needle`` (Linux /proc; else none)."""
    found: list[str] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _rows(out: str, header: str, names: tuple[str, ...]) -> dict[str, list[str]]:
    """The rows of the summary table under ``header``: name → the other columns."""
    start = out.index(header)
    rows = {}
    for line in out[start:].splitlines()[2:]:
        if not line.strip():
            break
        cols = line.split()
        if cols[0] in names:
            rows[cols[0]] = cols[1:]
    return rows


def _pct(text: str) -> float:
    return float(text.rstrip("%"))


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_demo_runs_the_shop_behind_the_gateway_and_cleans_up(tmp_path: Path) -> None:
    missing = rabbitmq_missing()
    if missing is not None:
        pytest.skip(missing)
    base = _free_block()
    # What a previous run leaves must not leak in: its database, a sidecar's saved
    # snapshot (of another mesh), the broker's queues.
    state = tmp_path / ".meshlayer" / "demo"
    (state / "sidecar-frontend-1").mkdir(parents=True)
    (state / "control.db").write_bytes(b"the previous run's database")
    (state / "sidecar-frontend-1" / "config.json").write_text('{"version": 999}')
    (state / "rabbitmq" / "mnesia").mkdir(parents=True)
    (state / "rabbitmq" / "mnesia" / "previous-run").write_text("queues")
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MESHLAYER_CONTROL", None)
    argv = [
        sys.executable,
        "-m",
        "meshlayer",
        "demo",
        "--duration",
        str(DURATION),
        "--exit",
        "--port-base",
        str(base),
        "--users",
        "8",
        "--crawl-rate",
        "100",
        "--reorder-rate",
        "10",
    ]
    done = subprocess.run(
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    out = done.stdout
    report = f"exit {done.returncode}\n--- stdout\n{out}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, report

    # Started in order, on a fresh store: the apply is the first version.
    control = f"http://127.0.0.1:{base + 9}"
    assert f"starting control plane ({control}, store sqlite:.meshlayer/demo/control.db)" in out
    applied = re.search(
        r"^applying \S+mesh\.yaml through the API \.\.\. mesh version 1 \((.*)\)", out, re.M
    )
    assert applied, report
    assert applied.group(1) == "3 PriorityClasss, 3 ClassificationRules, 8 Services", report
    assert re.search(r"^starting RabbitMQ \(.*\) \.\.\. ready", out, re.M), report
    for name in ("gateway", *(f"{s}-1" for s in (*SERVICES, "email"))):
        assert re.search(rf"^starting {name}\b.* \.\.\. ready", out, re.M), f"{name}\n{report}"
    assert re.search(rf"{SIDECARS}/{SIDECARS} at version \d+", out), report

    # Per class at the gateway, from its /metrics: both classes ran; critical all but
    # always succeeded.
    classes = _rows(out, "by class, at the gateway, the whole run", ("critical", "batch"))
    assert set(classes) == {"critical", "batch"}, report
    assert int(classes["critical"][0]) >= 50, report
    assert int(classes["batch"][0]) >= 100, report
    assert _pct(classes["critical"][1]) >= 98.0, report

    # Every HTTP service was called through its sidecar.
    services = _rows(out, "by service, at its sidecar's inbound side", SERVICES)
    assert set(services) == set(SERVICES), report
    assert all(int(cols[0]) > 0 for cols in services.values()), report
    # recommendations' sidecar admits 2 at once (spec.inbound.concurrency: 2).
    assert services["recommendations"][-2:] == ["limit", "2"], report

    # The load generator's view: the frontend served each workload in the class the
    # gateway's rules give it (the header a client cannot set, forwarded by the apps).
    # Columns: requests, success, p50 "ms", p99 "ms", shed, then "served as": class, count.
    load = _rows(out, "the load generator's own view", ("critical", "batch"))
    assert load["critical"][7:] == ["critical", load["critical"][0]], report
    assert load["batch"][7::2] == ["batch"] and int(load["batch"][8]) > 0, report
    assert _pct(load["critical"][1]) >= 98.0, report

    # The email worker consumed order emails of both classes from RabbitMQ.
    email = re.search(r"^\s+emails sent through RabbitMQ queue emails .*$", out, re.M)
    assert email, report
    sent = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"(critical|batch) (\d+) \(", email.group(0))
    }
    assert sent.get("critical", 0) > 0 and sent.get("batch", 0) > 0, report

    # Every sidecar and the gateway at the current mesh version at the end.
    line = re.search(
        r"control plane\s+(\S+)\s+mesh version (\d+)\s+sidecars connected (\d+)/(\d+), "
        r"at version (\d+): (\d+)/(\d+)",
        out,
    )
    assert line, report
    assert line.group(1) == control and line.group(3) == line.group(6) == str(SIDECARS), report

    # The config the user can re-apply is valid: the rules and classes are in it.
    mesh = load_file(state / "mesh.yaml")
    assert set(SERVICES) | {"email"} <= set(mesh.services)
    assert [r.name for r in mesh.classification_rules] == ["crawlers", "batch-jobs", "shoppers"]
    assert mesh.services["recommendations"].inbound.concurrency == 2
    assert (state / "sidecar-recommendations-1" / "config.json").is_file()
    assert not (state / "rabbitmq" / "mnesia" / "previous-run").exists()

    # Every child was stopped: no process names the demo's ports; all ports are free.
    assert f"stopped {PROCESSES} processes (the control plane last)" in out, report
    assert _processes_mentioning(f"127.0.0.1:{base + 9}") == [], report
    assert _processes_mentioning(f"127.0.0.1:{base + 41}") == [], report
    assert _processes_mentioning(f"meshlayer-demo-{base}@") == [], report
    busy = [p for p in range(base, base + SPAN) if not _bindable(p)]
    assert busy == [], f"ports still in use after the demo: {busy}\n{report}"
