"""Smoke test: the wire case of the priority benchmark (bench/priority_wire.py), short.

Real namespaces, a real 20 Mbit/s shaper, real sidecars: the sidecars' marks must
put the bulk bytes in the batch band and the critical calls in the critical band
of ``meshlayer net qos``'s tree, and the tree must keep the critical calls' p99
far below what one FIFO queue gives them under the same bulk load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.netns import netns_unavailable

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "priority_wire.py"


@pytest.mark.slow
def test_wire_case_marks_reach_the_qdisc_and_keep_critical_calls_fast(tmp_path: Path) -> None:
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    out = tmp_path / "wire.json"
    argv = [
        sys.executable, str(BENCH),
        "--phases", "unloaded/qos,loaded/qos,loaded/fifo",
        "--warmup", "1.5",
        "--duration", "4",
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=100, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["phase"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["unloaded/qos", "loaded/qos", "loaded/fifo"]
    for row in rows.values():  # Poisson at 50/s for 4 s; every call answered
        assert 120 < row["critical_sent"] < 280, row
        assert row["critical_ok"] == row["critical_sent"], row["statuses"]

    loaded = rows["loaded/qos"]
    bands = loaded["band_bytes"]
    # The client sidecar's marks, as the qdisc saw them: bulk (CS1) in the batch band,
    # the critical calls (EF) in the critical band, next to nothing unmarked.
    assert bands["batch"] > 4 * 2**20, bands
    assert 20_000 < bands["critical"] < 2**20, bands
    assert bands["default"] < 16_000, bands
    assert loaded["bulk_share"] > 0.8, loaded  # the link stays full with the tree
    assert rows["loaded/fifo"]["bulk_share"] > 0.8

    # One FIFO queue makes the critical calls wait behind the bulk bytes; the tree does not.
    qos_p99, fifo_p99 = loaded["p99_ms"], rows["loaded/fifo"]["p99_ms"]
    assert fifo_p99 > 20, rows["loaded/fifo"]
    assert fifo_p99 > 5 * qos_p99, (qos_p99, fifo_p99)
    assert "PASS  qos: bulk goodput" in done.stdout
