"""The control plane away for minutes, with the sidecars on their default lease and
backoff settings: traffic keeps 100% success, and the mesh converges when it returns."""

from __future__ import annotations

import time

import pytest

from tests.integration.control.test_sidecar_control import (
    Traffic,
    apply,
    config_of,
    ctl,
    endpoints_of,
    in_sync,
    route_doc,
)
from tests.support.control import Control, start_control
from tests.support.procs import Cluster, run_meshlayer, wait_for

__all__ = ["ctl"]  # the fixture, shared with test_sidecar_control

OUTAGE = 125.0  # seconds: over two minutes, twelve default lease TTLs


@pytest.mark.slow
@pytest.mark.timeout(OUTAGE + 120)
def test_two_minute_outage_keeps_traffic_whole_and_the_mesh_converges_after(
    cluster: Cluster, ctl: Control
) -> None:
    up = cluster.upstream("catalog")
    catalog = cluster.sidecar(None, service="catalog", app=up.address, control=ctl.url)
    client = cluster.sidecar(None, control=ctl.url)  # default --lease-ttl and backoff
    wait_for("catalog endpoint", lambda: endpoints_of(client, "catalog"))
    with Traffic(
        client.outbound, "catalog", max_seconds=OUTAGE + 90, max_requests=200_000
    ) as traffic:
        wait_for("traffic to flow", lambda: traffic.count() > 20)
        ctl.kill()
        wait_for("the client to notice", lambda: client.metric("meshlayer_control_connected") == 0)
        down = time.monotonic()
        time.sleep(OUTAGE)
        during = traffic.window(down)
        ctl2 = start_control(cluster.tmp, ctl.store_url, port=ctl.port, procs=cluster.procs)
        # the default backoff tops out at 5 s (with jitter)
        wait_for("reconnect", lambda: client.metric("meshlayer_control_connected") == 1, 15)
        wait_for(
            "both registered again",
            lambda: len(ctl2.api("GET", "/v1/registry")[1]["endpoints"]) == 2,
            timeout=15,
        )
        v = apply(ctl2, route_doc("catalog-self", "catalog", "catalog"))
        wait_for("convergence", lambda: in_sync(ctl2, client, catalog), timeout=15)
        assert int(config_of(client)["version"]) >= v
        after = traffic.count()
        wait_for("traffic after convergence", lambda: traffic.count() > after + 20)
    assert traffic.failures == []
    assert len(during) > 1000 and set(during) == {"catalog"}
    assert [r["name"] for r in config_of(client)["routes"]] == ["catalog-self"]
    res = run_meshlayer(["check", "--control", ctl2.url])
    assert res.returncode == 0, res.stdout + res.stderr
