"""Active health checks end to end: control plane, registered sidecars, their apps, a client.

An app whose ``/health`` fails is taken out of rotation for the client's
traffic (the probe goes through the app's own sidecar), and put back when it
passes again.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from tests.support.control import service_doc, start_control
from tests.support.procs import Cluster, request, upstream_with

FAST = ["--lease-ttl", "2", "--reconnect-max", "0.5"]


def spread(port: int, n: int = 40) -> Counter[str]:
    """Which app answered each of ``n`` requests to ``web`` through a client sidecar."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, _, body = request(port, path="/id", host="web", timeout=5)
        seen[body.decode() if status == 200 else f"status {status}"] += 1
    return seen


def wait_spread(port: int, want: set[str], timeout: float = 10.0) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while True:
        seen = spread(port)
        if set(seen) == want:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"answers from {dict(seen)}, wanted only {sorted(want)}")
        time.sleep(0.1)


def test_failing_app_leaves_rotation_and_comes_back(cluster: Cluster, tmp_path: Path) -> None:
    ctl = start_control(cluster.tmp, f"sqlite:{tmp_path / 'c.db'}", procs=cluster.procs)
    check = {"path": "/health", "interval": "100ms", "unhealthyThreshold": 2}
    spec = {"loadBalancer": "round-robin", "healthCheck": check}
    assert ctl.api("POST", "/v1/apply", {"documents": [service_doc("web", spec)]})[0] == 200
    flag = tmp_path / "web-a-sick"
    apps = {
        "web-a": upstream_with(cluster, "web-a", "--health-file", str(flag)),
        "web-b": upstream_with(cluster, "web-b"),
    }
    for app in apps.values():
        cluster.sidecar(None, service="web", app=app.address, control=ctl.url, extra=FAST)
    client = cluster.sidecar(None, service="client", control=ctl.url, extra=FAST)

    wait_spread(client.outbound, {"web-a", "web-b"})
    flag.write_text("sick")
    wait_spread(client.outbound, {"web-b"}, timeout=5)
    regs = ctl.api("GET", "/v1/registry")[1]["endpoints"]
    assert sorted(e["healthy"] for e in regs if e["service"] == "web") == [False, True]
    assert spread(client.outbound, 20) == Counter({"web-b": 20})  # and it stays out

    flag.unlink()
    wait_spread(client.outbound, {"web-a", "web-b"}, timeout=5)
    assert "is unhealthy after 2 failed checks" in ctl.log()
