"""`meshlayer demo --exit` end to end: every service answers, both catalog replicas serve,
and nothing is left running afterwards."""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPAN = 44  # the demo uses ports BASE .. BASE+43 (see meshlayer.demo.run)
REQUESTS = 200


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
        base = rng.randrange(20000, 32000, 100)
        if all(_bindable(p) for p in range(base, base + SPAN)):
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


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_runs_the_mesh_and_cleans_up(tmp_path: Path) -> None:
    base = _free_block()
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
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
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150, check=False
    )
    out = done.stdout
    report = f"exit {done.returncode}\n--- stdout\n{out}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, report

    for name in ("edge", "frontend-1", "catalog-1", "catalog-2", "reviews-1"):
        assert re.search(rf"^starting {name}\b.* \.\.\. ready", out, re.M), report

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

    served = {
        m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(catalog-[12])\s+(\d+)\s", out, re.M)
    }
    assert set(served) == {"catalog-1", "catalog-2"}, report
    assert all(n > 0 for n in served.values()), f"a catalog replica got no traffic\n{report}"
    assert sum(served.values()) == REQUESTS, report

    state = tmp_path / ".meshlayer" / "demo"
    assert (state / "mesh.yaml").is_file()
    assert (state / "catalog-2-sidecar.log").is_file()

    # Every child was stopped: no process still names the demo's ports, all ports are free.
    assert _processes_mentioning(f"127.0.0.1:{base + 21}") == [], report
    assert _processes_mentioning(f"--port {base + 42}") == [], report
    busy = [p for p in range(base, base + SPAN) if not _bindable(p)]
    assert busy == [], f"ports still in use after the demo: {busy}\n{report}"
