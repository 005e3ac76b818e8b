"""Smoke test: bench/priority.py runs end to end on a tiny load and reports what it measured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "priority.py"


def _tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


@pytest.mark.slow
def test_priority_bench_quick_run_reports_every_mode_and_the_call_graph(tmp_path: Path) -> None:
    if _tool("nginx") is None or _tool("gcc") is None or _tool("taskset") is None:
        pytest.skip("needs nginx, gcc and taskset (the benchmark installs them when run)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    out = tmp_path / "priority.json"
    argv = [
        sys.executable, str(BENCH),
        "--modes", "priority,nginx",
        "--levels", "0.5,2",
        "--capacity", "150",
        "--graph-capacity", "60",
        "--duration", "1.5",
        "--warmup", "0",
        "--timeout", "2",
        "--conns", "64",
        "--quiet-wait", "0",
        "--no-rt", "--nice", "0", "--retries", "0",  # a good neighbour inside the test suite
        "--no-plot",
        "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=100, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Targets at 2 x C" in proc.stdout
    assert "Call graph" in proc.stdout
    data = json.loads(out.read_text())
    runs = {(r["mode"], r["level"]): r for r in data["main"]}
    assert set(runs) == {("priority", 0.5), ("priority", 2.0), ("nginx", 0.5), ("nginx", 2.0)}
    for (_mode, level), run in runs.items():
        sent = sum(c["sent"] for c in run["classes"].values())
        # Poisson arrivals at 75 or 300/s for 1.5 s, about a fifth critical
        assert 0.6 * level * 150 * 1.5 < sent < 1.4 * level * 150 * 1.5
        assert 0.1 < run["classes"]["critical"]["sent"] / sent < 0.3
        assert run["goodput"] > 0
    # half the capacity is served in full by every mode
    for mode in ("priority", "nginx"):
        assert (
            runs[(mode, 0.5)]["classes"]["critical"]["ok"]
            == runs[(mode, 0.5)]["classes"]["critical"]["sent"]
        )
    for g in data["graph"]:
        # B served calls tied to parents, and the share of wasted work is a percentage
        assert g["b_calls"] > 0
        assert 0.0 <= g["wasted_pct"] <= 100.0
