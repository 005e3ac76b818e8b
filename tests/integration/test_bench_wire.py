"""Smoke test: the wire case of the priority benchmark (bench/priority_wire.py), short.

Real namespaces, a real 20 Mbit/s shaper on each direction, real sidecars: the
sidecars' marks must put the bulk bytes in the batch band and the critical calls in
the critical band of ``meshlayer net qos``'s tree -- uploads and requests on the
client side's veth (the client sidecar's pool sockets), downloads and responses on
the server side's (the server sidecar's accepted sockets) -- and the trees must keep
the critical calls' p99 far below what one FIFO queue gives them under the same load.
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
    assert loaded["bulk_flows"] == 4 and loaded["down_flows"] == 4
    # The marks as each qdisc saw them: bulk (CS1) in the batch band, the critical calls
    # (EF) in the critical band, next to nothing unmarked. Up: the client sidecar's
    # pool sockets; down: the server sidecar's accepted sockets, marked per class.
    for bands in (loaded["band_bytes"], loaded["band_bytes_down"]):
        assert bands["batch"] > 4 * 2**20, bands
        assert 20_000 < bands["critical"] < 2**20, bands
        assert bands["default"] < 16_000, bands
    # The links stay busy with the tree, both ways at once (pure ACKs ride in the top band,
    # so neither way's ACKs wait behind the other way's bulk bytes; see bench/RESULTS.md).
    # One FIFO band has no such rule: there one direction's ACKs queue behind the other's.
    assert loaded["bulk_share"] > 0.8, loaded
    assert loaded["down_share"] > 0.8, loaded
    assert rows["loaded/fifo"]["bulk_share"] + rows["loaded/fifo"]["down_share"] > 0.6

    # One FIFO queue makes the critical calls wait behind the bulk bytes; the tree does not.
    qos_p99, fifo_p99 = loaded["p99_ms"], rows["loaded/fifo"]["p99_ms"]
    assert fifo_p99 > 20, rows["loaded/fifo"]
    assert fifo_p99 > 5 * qos_p99, (qos_p99, fifo_p99)
    assert "qos: bulk upload goodput" in done.stdout
    assert "qos: bulk download goodput" in done.stdout
