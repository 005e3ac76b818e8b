"""Name resolution through the outbound listener, both request forms."""

from __future__ import annotations

import json

from tests.support.procs import Cluster, request, service_yaml


def test_host_and_absolute_form_reach_the_service(cluster: Cluster) -> None:
    up = cluster.upstream("catalog")
    sc = cluster.sidecar(service_yaml("catalog", [up.address]))
    status, _, body = request(sc.outbound, path="/id", host="catalog")
    assert (status, body) == (200, b"catalog")
    status, _, body = request(sc.outbound, path="http://catalog/headers", host="catalog")
    assert status == 200
    seen = json.loads(body)
    assert seen["target"] == "/headers"  # absolute-form became origin-form
    names = {k.lower(): v for k, v in seen["headers"]}
    assert names["host"] == "catalog"
    assert names["x-forwarded-for"] == "127.0.0.1"
    assert names["x-forwarded-proto"] == "http"
    assert names["x-request-id"]  # generated (its form: test_http11)


def test_unknown_service_is_a_mesh_404(cluster: Cluster) -> None:
    up = cluster.upstream("catalog")
    sc = cluster.sidecar(service_yaml("catalog", [up.address]))
    status, headers, body = request(sc.outbound, path="/", host="nope")
    assert status == 404
    assert headers["x-meshlayer-error"] == "no-route"
    assert json.loads(body)["error"] == "no-route"
