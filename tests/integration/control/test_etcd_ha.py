"""Two control processes over a 3-member etcd cluster survive losing one of each.

Apply through one control process, watch through the other (raw watch
streams, and a real sidecar given ``--control A,B``, which must fail over to
B); then SIGKILL the etcd leader (which is also the member both control processes talk to first)
and one control process. Applies and watches keep working on the survivors,
and no watcher or sidecar ever sees the mesh version go backwards.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.support.control import Control, Watch, service_doc, start_control
from tests.support.etcd import EtcdCluster, etcd_binary, start_cluster, unique_prefix
from tests.support.procs import Cluster, Proc, Sidecar

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason="etcd not installed")


def apply(ctl: Control, name: str, lb: str, deadline: float) -> int:
    """Apply one Service through ``ctl``, retrying 503s until ``deadline``; its version."""
    doc = service_doc(name, {"loadBalancer": lb})
    while True:
        status, body = ctl.api("POST", "/v1/apply", {"documents": [doc]}, timeout=5)
        if status == 200:
            return int(body["version"])
        assert status == 503, (status, body)
        assert time.monotonic() < deadline, f"apply still failing: {body}"
        time.sleep(0.1)


def versions_until(watch: Watch, version: int, seen: list[int], timeout: float = 10.0) -> None:
    """Read snapshots into ``seen`` until one is at ``version`` or above."""
    deadline = time.monotonic() + timeout
    while not seen or seen[-1] < version:
        left = deadline - time.monotonic()
        assert left > 0, f"watch stuck at {seen[-1:]} waiting for {version}"
        event, vid, data = watch.event(left)
        assert event == "snapshot"
        assert vid == data["version"]
        seen.append(vid)


class VersionSampler:
    """Reads a real sidecar's config version every 20 ms in a thread, until stopped."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.seen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                status, body = self.sidecar.admin_get("/config")
            except OSError:
                continue
            if status == 200:
                v = int(json.loads(body).get("version") or 0)
                if not self.seen or self.seen[-1] != v:
                    self.seen.append(v)

    def wait_for(self, version: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.seen or self.seen[-1] < version:
            assert time.monotonic() < deadline, f"sidecar stuck at {self.seen[-1:]}"
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_apply_and_watch_survive_losing_an_etcd_member_and_a_control(
    tmp_path: Path, cluster: Cluster
) -> None:
    procs: list[Proc] = []
    watches: list[Watch] = []
    sampler: VersionSampler | None = None
    etcd: EtcdCluster = start_cluster(tmp_path)
    try:
        etcd.make_leader(0)  # the member every control process dials first
        url = etcd.url + unique_prefix("ha")
        a = start_control(tmp_path, url, procs=procs)
        b = start_control(tmp_path, url, procs=procs)
        # a real sidecar that follows A first and must fail over to B when A dies
        sampler = VersionSampler(
            cluster.sidecar(
                None, "client", control=f"{a.url},{b.url}", extra=["--reconnect-max", "0.5"]
            )
        )

        on_b: list[int] = []
        on_a: list[int] = []
        wb = b.watch("sc-b")
        wa = a.watch("sc-a")
        watches += [wb, wa]
        versions: list[int] = []
        for i in range(3):
            versions.append(apply(a, "catalog", ["round-robin", "p2c-ewma"][i % 2], 0))
        versions_until(wb, versions[-1], on_b)
        versions_until(wa, versions[-1], on_a)
        sampler.wait_for(versions[-1])
        status, body = a.api(
            "POST",
            "/v1/registry",
            {"service": "catalog", "address": "127.0.0.1:20001", "ttl": 3, "sidecar": "sc-1"},
        )
        assert status == 200, body
        versions.append(int(body["version"]))
        versions_until(wb, versions[-1], on_b)

        # Lose the etcd leader and control A at once.
        etcd.kill(0)
        a.kill()
        t0 = time.monotonic()
        versions.append(apply(b, "catalog", "least-request", t0 + 10))
        recovered = time.monotonic() - t0
        versions_until(wb, versions[-1], on_b)  # B's old stream carries on

        # A's watcher reconnects to B: it must not be sent anything older.
        with pytest.raises((EOFError, OSError)):
            versions_until(wa, versions[-1], on_a, timeout=3)
        wa2 = b.watch("sc-a")
        watches.append(wa2)
        versions_until(wa2, versions[-1], on_a)

        # The registry too: the lease granted through A renews through B.
        status, body = b.api("POST", "/v1/registry/sc-1/renew")
        assert status == 200, body
        for lb in ("round-robin", "p2c-ewma"):
            versions.append(apply(b, "reviews", lb, time.monotonic() + 5))
        versions_until(wb, versions[-1], on_b)
        versions_until(wa2, versions[-1], on_a)
        sampler.wait_for(versions[-1])
        status, snap = b.api("GET", "/v1/resources")
        assert status == 200
        assert snap["version"] == versions[-1]
        assert {d["metadata"]["name"]: d["spec"]["loadBalancer"] for d in snap["items"]} == {
            "catalog": "least-request",
            "reviews": "p2c-ewma",
        }
    finally:
        if sampler is not None:
            sampler.stop()
        for w in watches:
            w.close()
        for p in procs:
            p.stop()
        etcd.stop()

    assert versions == sorted(versions) and len(set(versions)) == len(versions), versions
    assert sampler is not None
    for seen in (on_a, on_b, sampler.seen):
        assert seen == sorted(seen), f"a watcher saw the version go backwards: {seen}"
    assert recovered < 10, recovered
