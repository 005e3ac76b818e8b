"""`meshlayer demo --exit` end to end, on its control plane: every service answers, every
sidecar is at the current mesh version, the HTTPRoute splits catalog's traffic between
its versions, and nothing is left running afterwards. A second run in the same directory
(another port block) must not trip over the first run's state."""

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

ROOT = Path(__file__).resolve().parents[2]
SPAN = 54  # the demo uses ports BASE .. BASE+53 (see meshlayer.demo.run)
SIDECARS = 6
REQUESTS = 200
V2_SHARE = 0.2  # catalog-v2's weight in HTTPRoute catalog-split (80/20)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_block(avoid: int = -1) -> int:
    """A base whose whole block is free, below the usual ephemeral port range."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000, 100)
        if base != avoid and all(_bindable(p) for p in range(base, base + SPAN)):
            return base
    raise RuntimeError("no free block of ports for the demo")


def _processes_mentioning(needle: str) -> list[str]:
    """Command lines of live processes containing ``needle`` (Linux /proc; else none)."""
    found = []
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


def _run_demo(cwd: Path, base: int) -> None:
    """One `meshlayer demo --exit` in ``cwd``; asserts on its output and on the cleanup."""
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MESHLAYER_CONTROL", None)
    argv = [
        sys.executable,
        "-m",
        "meshlayer",
        "demo",
        "--requests",
        str(REQUESTS),
        "--concurrency",
        "4",
        "--port-base",
        str(base),
        "--exit",
    ]
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    out = done.stdout
    report = f"exit {done.returncode}\n--- stdout\n{out}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, report

    control = f"http://127.0.0.1:{base + 9}"
    assert re.search(
        rf"^starting control plane \({re.escape(control)}, store "
        r"sqlite:\.meshlayer/demo/control\.db\) \.\.\. ready",
        out,
        re.M,
    ), report
    # A fresh store each run: the apply is the first version, whatever ran here before.
    applied = (
        r"^applying \S+mesh\.yaml through the API \.\.\. "
        r"mesh version 1 \(5 Services and 1 HTTPRoute\)"
    )
    assert re.search(applied, out, re.M), report
    names = ("edge", "frontend-1", "catalog-v1-1", "catalog-v1-2", "catalog-v2-1", "reviews-1")
    for name in names:
        assert re.search(rf"^starting {name}\b.* \.\.\. ready", out, re.M), report
    synced = re.search(
        rf"^waiting for the {SIDECARS} sidecars to register .* \.\.\. "
        rf"{SIDECARS}/{SIDECARS} at version (\d+)",
        out,
        re.M,
    )
    assert synced, report

    rows = {
        m.group(1): (int(m.group(2)), m.group(3))
        for m in re.finditer(
            r"^\s+(frontend|catalog|reviews|end to end)\s+\S+\s+(\d+)\s+(\S+%)", out, re.M
        )
    }
    assert set(rows) == {"frontend", "catalog", "reviews", "end to end"}, report
    for service, (requests, success) in rows.items():
        # Each frontend answer took one catalog call and one reviews call.
        assert requests == REQUESTS, f"{service}: {requests} requests\n{report}"
        assert success == "100.0%", f"{service}: success {success}\n{report}"

    # The control plane's line: every sidecar connected and at the current mesh version.
    line = re.search(
        r"^\s+control plane\s+(\S+)\s+mesh version (\d+)\s+sidecars connected (\d+)/(\d+), "
        r"at version (\d+): (\d+)/(\d+)",
        out,
        re.M,
    )
    assert line, report
    url, version, connected, total, at, current, total2 = line.groups()
    assert url == control, report
    assert int(version) >= int(synced.group(1)) and at == version, report
    assert (int(connected), int(current)) == (SIDECARS, SIDECARS), report
    assert int(total) == int(total2) == SIDECARS, report

    # The route's split, by version and replica; the frontend's answers agree.
    assert "the frontend's answers agree" in out, report
    versions = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^\s+(catalog-v[12])\s+(\d+)\s+\S+%", out, re.M)
    }
    replicas = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^\s+(catalog-v\d-\d)\s+(\d+)\s*$", out, re.M)
    }
    assert set(versions) == {"catalog-v1", "catalog-v2"}, report
    assert sum(versions.values()) == REQUESTS, report
    assert abs(versions["catalog-v2"] - V2_SHARE * REQUESTS) <= 0.05 * REQUESTS, report
    assert set(replicas) == {"catalog-v1-1", "catalog-v1-2", "catalog-v2-1"}, report
    assert all(n > 0 for n in replicas.values()), f"a catalog replica got no traffic\n{report}"
    assert replicas["catalog-v1-1"] + replicas["catalog-v1-2"] == versions["catalog-v1"]

    # What the user can re-apply is a valid config with the route; sidecars kept state.
    state = cwd / ".meshlayer" / "demo"
    mesh = load_file(state / "mesh.yaml")
    assert {"catalog", "catalog-v1", "catalog-v2", "reviews"} <= set(mesh.services)
    assert [r.name for r in mesh.routes] == ["catalog-split"]
    assert all(not s.endpoints for s in mesh.services.values()), "meshed endpoints are dynamic"
    assert (state / "control.db").is_file()
    assert (state / "sidecar-catalog-v2-1" / "config.json").is_file()
    assert (state / "catalog-v2-1-sidecar.log").is_file()
    assert "stopped 12 processes (the control plane last)" in out, report

    # Every child was stopped: no process still names the demo's ports, all ports are free.
    assert _processes_mentioning(f"127.0.0.1:{base + 9}") == [], report
    assert _processes_mentioning(f"127.0.0.1:{base + 21}") == [], report
    assert _processes_mentioning(f"--port {base + 52}") == [], report
    busy = [p for p in range(base, base + SPAN) if not _bindable(p)]
    assert busy == [], f"ports still in use after the demo: {busy}\n{report}"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_demo_runs_the_mesh_on_its_control_plane_and_cleans_up(tmp_path: Path) -> None:
    first = _free_block()
    _run_demo(tmp_path, first)
    # Again in the same directory, on other ports: the saved snapshots and the database of
    # the first run name endpoints that are gone now.
    _run_demo(tmp_path, _free_block(avoid=first))
