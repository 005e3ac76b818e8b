"""A shed answer crossing a hop: the calling sidecar passes it on, never retries it.

Retrying a peer's shed would multiply the load on exactly the service that
is shedding (each of the caller's retries is another request for it to
refuse), so the outbound side treats ``x-meshlayer-error: shed`` as final even
when its retry policy names 503, and does not count it as an endpoint failure.
"""

from __future__ import annotations

import json
import threading
import time

from tests.support.procs import Cluster, request, service_yaml

# A batch class that may not wait at all: past the limit, batch is shed at arrival.
NO_WAIT_BATCH = """---
apiVersion: meshlayer/v1
kind: PriorityClass
metadata: {name: batch}
spec: {rank: 10, weight: 10, maxQueueLength: 0}
"""


def test_shed_is_passed_on_not_retried(cluster: Cluster) -> None:
    up = cluster.upstream("web")
    web = cluster.sidecar(
        service_yaml("web", [up.address], spec="inbound: {concurrency: 1}") + NO_WAIT_BATCH,
        service="web",
        app=up.address,
    )
    spec = "retries: {attempts: 3, onStatus: [503], minPerSecond: 100}"
    front = cluster.sidecar(
        service_yaml("web", [f"127.0.0.1:{web.inbound}"], meshed=True, spec=spec),
        service="front",
    )
    # Without a shed, a 503 from the app is retried (the policy is live).
    status, _, _ = request(front.outbound, path="/status/503", host="web")
    assert status == 503
    assert front.metric("meshlayer_retries_total") == 3

    # A critical request holds web's only admission slot ...
    held: list[int] = []
    t = threading.Thread(
        target=lambda: held.append(
            request(
                front.outbound,
                path="/delay/1500",
                host="web",
                headers={"x-meshlayer-priority": "critical"},
            )[0]
        )
    )
    t.start()
    deadline = time.monotonic() + 5
    while web.metric("meshlayer_admitted_in_flight") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    # ... so a batch request is shed by web's sidecar, and front passes the shed on.
    status, headers, body = request(
        front.outbound, path="/", host="web", headers={"x-meshlayer-priority": "batch"}
    )
    t.join(10)
    assert held == [200]
    assert status == 503 and headers["x-meshlayer-error"] == "shed", (status, headers, body)
    assert "retry-after" in headers
    assert json.loads(body)["error"] == "shed"
    assert web.metric("meshlayer_shed_total", priority="batch") == 1  # one refusal, no retries
    assert front.metric("meshlayer_retries_total") == 3  # unchanged since the app's 503
    assert front.metric("meshlayer_ejected_endpoints") == 0
