"""PriorityClass documents through a real control plane to a real sidecar."""

from __future__ import annotations

import json
import subprocess
import time

from tests.support.control import ADMIN_TOKEN, start_control
from tests.support.procs import Cluster, run_meshlayer

GOLD = """\
apiVersion: meshlayer/v1
kind: PriorityClass
metadata: {name: gold}
spec: {rank: 75, weight: 20, dscp: AF41, soPriority: 4, congestionControl: reno}
"""


def ml(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"MESHLAYER_ADMIN_TOKEN": ADMIN_TOKEN}
    return run_meshlayer(args, 30, stdin=stdin, env=env, unset=["MESHLAYER_CONTROL"])


def test_priority_class_applied_listed_and_pushed(cluster: Cluster) -> None:
    ctl = start_control(cluster.tmp, f"sqlite:{cluster.tmp / 'control.db'}", procs=cluster.procs)
    bad = ml(["apply", "--control", ctl.url, "-f", "-"], GOLD.replace("AF41", "AF51"))
    assert bad.returncode == 2, bad.stderr
    assert "(PriorityClass/gold): spec.dscp: must be 0..63 or a DSCP name" in bad.stderr

    done = ml(["apply", "--control", ctl.url, "-f", "-"], GOLD)
    assert done.returncode == 0, done.stderr
    table = ml(["get", "priorityclasses", "--control", ctl.url])
    assert table.returncode == 0, table.stderr
    assert "gold" in table.stdout and "rank 75, dscp AF41, reno" in table.stdout

    sc = cluster.sidecar(None, service="client", control=ctl.url)
    deadline = time.monotonic() + 10
    classes: dict[str, dict[str, object]] = {}
    while time.monotonic() < deadline and "gold" not in classes:
        classes = json.loads(sc.admin_get("/config")[1])["priorityClasses"]
        time.sleep(0.05)
    assert list(classes) == ["critical", "gold", "default", "batch"]
    assert classes["gold"] == {
        "rank": 75,
        "weight": 20,
        "queueDelayTarget": 0.1,
        "maxQueueLength": 1000,
        "dscp": 34,
        "soPriority": 4,
        "congestionControl": "reno",
    }
