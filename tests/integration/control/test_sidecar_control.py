"""Sidecars following a real control plane: registration and leases, live config
changes under traffic, rejected pushes, outages, and the config saved on disk."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.control import Control, service_doc, start_control
from tests.support.procs import Cluster, Sidecar, request, run_meshlayer, wait_for

TTL = "1.5"
FAST = ["--lease-ttl", TTL, "--reconnect-max", "0.5"]


@pytest.fixture
def ctl(cluster: Cluster) -> Control:
    return start_control(cluster.tmp, f"sqlite:{cluster.tmp / 'control.db'}", procs=cluster.procs)


def config_of(sc: Sidecar) -> dict[str, Any]:
    status, body = sc.admin_get("/config")
    assert status == 200
    return dict(json.loads(body))


def endpoints_of(sc: Sidecar, service: str) -> list[str]:
    svc = config_of(sc)["services"].get(service)
    return [e["address"] for e in svc["endpoints"]] if svc else []


def upstream_connections(sc: Sidecar, service: str) -> float:
    """``meshlayer_open_connections{side="upstream",name=SERVICE}``."""
    _, text = sc.admin_get("/metrics")
    for line in text.splitlines():
        head = line.split(" ", 1)[0]
        wanted = ("meshlayer_open_connections{", 'side="upstream"', f'name="{service}"')
        if head.startswith(wanted[0]) and all(w in head for w in wanted[1:]):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def mesh_version(ctl: Control) -> int:
    return int(ctl.api("GET", "/v1/status")[1]["version"])


def in_sync(ctl: Control, *sidecars: Sidecar) -> bool:
    v = str(mesh_version(ctl))
    return all(config_of(sc)["version"] == v for sc in sidecars)


def apply(ctl: Control, *docs: dict[str, Any]) -> int:
    status, body = ctl.api("POST", "/v1/apply", {"documents": list(docs)})
    assert status == 200, body
    return int(body["version"])


def route_doc(name: str, parent: str, backend: str) -> dict[str, Any]:
    return {
        "apiVersion": "meshlayer/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name},
        "spec": {"parentRefs": [{"name": parent}], "rules": [{"backendRefs": [{"name": backend}]}]},
    }


def meshed_service(
    cluster: Cluster, ctl: Control, name: str, extra: list[str] | None = None
) -> Sidecar:
    """An upstream answering ``/id`` with ``name`` behind its own registered sidecar."""
    up = cluster.upstream(name)
    return cluster.sidecar(
        None, service=name, app=up.address, control=ctl.url, extra=[*FAST, *(extra or [])]
    )


class Traffic:
    """A client loop in a thread: GET /id through a sidecar on one keep-alive connection
    (a new one after an error), bounded in time and count; records every answer."""

    def __init__(
        self,
        port: int,
        host: str,
        max_seconds: float = 30.0,
        max_requests: int = 20000,
        path: str = "/id",
    ) -> None:
        self.port = port
        self.host = host
        self.path = path
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.answers: list[tuple[float, int, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.max_seconds + 10)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set() and time.monotonic() < deadline:
            if len(self.answers) + len(self.failures) >= self.max_requests:
                break
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", self.path, headers={"Host": self.host})
                resp = conn.getresponse()
                body = resp.read().decode()
                self.answers.append((time.monotonic(), resp.status, body))
                if resp.status != 200:
                    self.failures.append(f"{resp.status} {body[:200]}")
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.002)
        if conn is not None:
            conn.close()

    def window(self, start: float, end: float = float("inf")) -> list[str]:
        """Bodies of the answers that arrived in [start, end)."""
        return [b for ts, _, b in list(self.answers) if start <= ts < end]

    def count(self) -> int:
        return len(self.answers)


def test_registers_and_lease_expiry_removes_it(cluster: Cluster, control: Control) -> None:
    catalog = meshed_service(cluster, control, "catalog")
    client = cluster.sidecar(None, control=control.url, extra=FAST)
    # the registry, not a static endpoint, tells the client where catalog is
    want = f"127.0.0.1:{catalog.inbound}"
    wait_for(
        "client to learn catalog's endpoint", lambda: endpoints_of(client, "catalog") == [want]
    )
    _, reg = control.api("GET", "/v1/registry")
    assert {(e["service"], e["address"]) for e in reg["endpoints"]} >= {("catalog", want)}
    status, _, body = request(client.outbound, path="/id", host="catalog")
    assert (status, body) == (200, b"catalog")
    assert client.metric("meshlayer_control_connected") == 1

    catalog.proc.signal(signal.SIGKILL)  # no deregistration: only the lease can remove it
    catalog.proc.popen.wait(5)
    t0 = time.monotonic()
    wait_for("the lapsed lease to drop catalog", lambda: endpoints_of(client, "catalog") == [])
    assert time.monotonic() - t0 < float(TTL) + 3.0
    _, reg = control.api("GET", "/v1/registry")
    assert all(e["service"] != "catalog" for e in reg["endpoints"])
    status, headers, _ = request(client.outbound, path="/id", host="catalog")
    assert status == 404 and headers["x-meshlayer-error"] == "no-route"


def test_graceful_stop_deregisters(cluster: Cluster, ctl: Control) -> None:
    catalog = meshed_service(cluster, ctl, "catalog", extra=["--lease-ttl", "60"])
    client = cluster.sidecar(None, control=ctl.url, extra=FAST)
    wait_for("catalog endpoint", lambda: endpoints_of(client, "catalog"))
    assert catalog.proc.stop() == 0
    # the 60 s lease has not lapsed: the entry went away because the sidecar said so
    wait_for("deregistration", lambda: endpoints_of(client, "catalog") == [], timeout=5)


def test_route_change_switches_live_traffic_without_errors(
    cluster: Cluster, control: Control
) -> None:
    ctl = control  # both stores
    v1 = meshed_service(cluster, ctl, "catalog")
    v2 = meshed_service(cluster, ctl, "catalog-v2")
    client = cluster.sidecar(None, control=ctl.url, extra=FAST)
    wait_for(
        "client to see both services",
        lambda: endpoints_of(client, "catalog") and endpoints_of(client, "catalog-v2"),
    )
    with Traffic(client.outbound, "catalog") as traffic:
        wait_for("traffic to flow", lambda: traffic.count() > 50)
        t_apply = time.monotonic()
        apply(ctl, route_doc("catalog-to-v2", "catalog", "catalog-v2"))
        wait_for("the route to reach the client", lambda: in_sync(ctl, client, v1, v2))
        switched = time.monotonic()
        wait_for("traffic after the switch", lambda: len(traffic.window(switched)) > 50)
        t_delete = time.monotonic()
        ctl.api("DELETE", "/v1/resources/httproute/catalog-to-v2")
        wait_for("the route's removal to reach the client", lambda: in_sync(ctl, client))
        back = time.monotonic()
        wait_for("traffic after switching back", lambda: len(traffic.window(back)) > 50)
    assert traffic.failures == []
    assert set(traffic.window(0, t_apply)) == {"catalog"}
    # once the client runs the new version, every request it sends goes to v2 (the one
    # answer in flight across the switch may come from either)
    assert set(traffic.window(switched, t_delete)[1:]) == {"catalog-v2"}
    assert set(traffic.window(back)[1:]) == {"catalog"}


def test_service_change_keeps_requests_in_flight(cluster: Cluster, ctl: Control) -> None:
    """A changed Service gets a new runtime; requests in flight on the old one finish,
    and the old pool's connections are closed once they are done."""
    catalog = meshed_service(cluster, ctl, "catalog")
    client = cluster.sidecar(None, control=ctl.url, extra=FAST)
    wait_for("catalog endpoint", lambda: endpoints_of(client, "catalog"))
    loops = [Traffic(client.outbound, "catalog", path="/delay/150") for _ in range(4)]
    for t in loops:
        t.__enter__()
    try:
        wait_for("slow requests in flight", lambda: all(t.count() >= 1 for t in loops))
        for policy in ("round-robin", "least-request", "p2c-ewma"):
            apply(ctl, service_doc("catalog", {"loadBalancer": policy}))
            wait_for("the change to reach the client", lambda: in_sync(ctl, client, catalog))
            assert config_of(client)["services"]["catalog"]["loadBalancer"] == policy
            time.sleep(0.2)  # a slow request is in flight on each connection meanwhile
    finally:
        for t in loops:
            t.stop()
    assert [f for t in loops for f in t.failures] == []
    assert sum(t.count() for t in loops) >= 12
    # retired pools give their connections back: at most one per client connection remains
    wait_for(
        "retired pools to close",
        lambda: upstream_connections(client, "catalog") <= 4,
        timeout=5,
    )


def write_behind_the_api(store_url: str, kind: str, name: str, spec: dict[str, Any]) -> int:
    """Write a resource straight into the store, skipping the API's validation: what
    a newer control plane that knows fields this sidecar does not would store."""
    from meshlayer.cli.control import open_store
    from meshlayer.control.store import Resource, Write

    async def go() -> int:
        store = open_store(store_url)
        await store.open()
        try:
            result = await store.apply([Write(Resource(kind, name, spec))])
            return result.version
        finally:
            await store.close()

    return asyncio.run(go())


def test_bad_pushed_config_is_rejected_and_the_old_one_kept(
    cluster: Cluster, control: Control
) -> None:
    meshed_service(cluster, control, "catalog")
    client = cluster.sidecar(None, control=control.url, extra=FAST)
    wait_for("catalog endpoint", lambda: endpoints_of(client, "catalog"))
    wait_for("sync", lambda: in_sync(control, client))
    good = config_of(client)["version"]
    bad = write_behind_the_api(
        control.store_url, "Service", "catalog", {"loadBalancer": "random", "shards": 4}
    )
    rejection = wait_for(
        "the sidecar to reject the push", lambda: config_of(client)["control"]["lastRejection"]
    )
    assert rejection["version"] == bad
    assert "(Service/catalog): spec.loadBalancer" in rejection["error"]
    assert config_of(client)["version"] == good
    assert client.metric("meshlayer_config_rejected_total") >= 1
    status, _, body = request(client.outbound, path="/id", host="catalog")
    assert (status, body) == (200, b"catalog")  # still served on the last good config
    res = run_meshlayer(["check", "--control", control.url, "--wait", "0.5"])
    assert res.returncode == 1, res.stdout
    assert "rejected version" in res.stdout and "loadBalancer" in res.stdout

    # a valid config for the service through the API heals it: the mesh converges
    apply(control, service_doc("catalog", spec={"loadBalancer": "round-robin"}))
    wait_for("convergence", lambda: in_sync(control, client), timeout=10)
    assert config_of(client)["control"]["lastRejection"] is None
    assert config_of(client)["services"]["catalog"]["loadBalancer"] == "round-robin"
    status, _, body = request(client.outbound, path="/id", host="catalog")
    assert (status, body) == (200, b"catalog")
    res = run_meshlayer(["check", "--control", control.url])
    assert res.returncode == 0, res.stdout + res.stderr


def test_route_to_a_service_not_yet_in_the_mesh_is_a_503_until_it_registers(
    cluster: Cluster, control: Control
) -> None:
    meshed_service(cluster, control, "catalog")
    client = cluster.sidecar(None, control=control.url, extra=FAST)
    wait_for("catalog endpoint", lambda: endpoints_of(client, "catalog"))
    apply(control, route_doc("to-nowhere", "catalog", "nowhere"))
    wait_for("sync", lambda: in_sync(control, client))
    status, headers, _ = request(client.outbound, path="/id", host="catalog")
    assert status == 503 and headers.get("x-meshlayer-error") == "no-endpoints"
    nowhere = meshed_service(cluster, control, "nowhere")
    wait_for("convergence", lambda: in_sync(control, client, nowhere), timeout=10)
    status, _, body = request(client.outbound, path="/id", host="catalog")
    assert (status, body) == (200, b"nowhere")


def test_control_plane_outage_and_restart(cluster: Cluster, control: Control) -> None:
    catalog = meshed_service(cluster, control, "catalog")
    client = cluster.sidecar(None, control=control.url, extra=FAST)
    wait_for("catalog endpoint", lambda: endpoints_of(client, "catalog"))
    with Traffic(client.outbound, "catalog") as traffic:
        wait_for("traffic to flow", lambda: traffic.count() > 20)
        control.kill()
        wait_for("the client to notice", lambda: client.metric("meshlayer_control_connected") == 0)
        down = time.monotonic()
        time.sleep(float(TTL) + 1.0)  # longer than the leases: they lapse meanwhile
        during = traffic.window(down)
        ctl2 = start_control(cluster.tmp, control.store_url, port=control.port, procs=cluster.procs)
        wait_for("reconnect", lambda: client.metric("meshlayer_control_connected") == 1, timeout=5)
        wait_for(
            "both registered again",
            lambda: len(ctl2.api("GET", "/v1/registry")[1]["endpoints"]) == 2,
        )
        v = apply(ctl2, route_doc("catalog-self", "catalog", "catalog"))
        wait_for("convergence", lambda: in_sync(ctl2, client, catalog))
        assert int(config_of(client)["version"]) >= v
    assert traffic.failures == []
    assert len(during) > 100 and set(during) == {"catalog"}
    assert [r["name"] for r in config_of(client)["routes"]] == ["catalog-self"]
    res = run_meshlayer(["check", "--control", ctl2.url])
    assert res.returncode == 0, res.stdout + res.stderr


def test_reconnect_grace_keeps_peers_until_they_register_again(
    cluster: Cluster, control: Control
) -> None:
    """After an outage longer than the leases the registry comes back empty. A sidecar
    that reconnects before its peers must not drop them. The test registers catalog
    itself (standing in for catalog's sidecar) so it decides who comes back first."""
    up = cluster.upstream("catalog")
    reg = {"service": "catalog", "address": up.address, "ttl": 1.0, "sidecar": "catalog-test"}
    assert control.api("POST", "/v1/registry", reg)[0] == 200
    client = cluster.sidecar(None, control=control.url, extra=FAST)  # grace: 2 x 0.5 + 1 s
    wait_for("catalog endpoint", lambda: endpoints_of(client, "catalog") == [up.address])
    with Traffic(client.outbound, "catalog") as traffic:
        wait_for("traffic to flow", lambda: traffic.count() > 20)
        control.kill()
        time.sleep(1.5)  # the lease lapses
        ctl2 = start_control(cluster.tmp, control.store_url, port=control.port, procs=cluster.procs)
        wait_for(
            "the client to carry catalog over",
            lambda: config_of(client)["control"]["carried"] == {"catalog": [up.address]},
        )
        assert endpoints_of(client, "catalog") == [up.address]
        t_back = time.monotonic()
        assert ctl2.api("POST", "/v1/registry", reg)[0] == 200  # catalog is back
        wait_for("the carry to end", lambda: config_of(client)["control"]["carried"] == {})
        wait_for("traffic after", lambda: len(traffic.window(t_back)) > 20)
    assert traffic.failures == []
    assert endpoints_of(client, "catalog") == [up.address]

    # a peer that does not come back is dropped when the grace ends
    ctl2.kill()
    time.sleep(1.5)
    start_control(cluster.tmp, control.store_url, port=control.port, procs=cluster.procs)
    wait_for("carried over", lambda: config_of(client)["control"]["carried"])
    t0 = time.monotonic()
    wait_for("dropped at the end of the grace", lambda: endpoints_of(client, "catalog") == [])
    assert 0.5 < time.monotonic() - t0 < 4.0
    assert config_of(client)["control"]["carried"] == {}


def test_starts_from_saved_config_while_control_plane_is_down(
    cluster: Cluster, control: Control, tmp_path: Path
) -> None:
    ctl = control  # both stores
    meshed_service(cluster, ctl, "catalog")
    state = tmp_path / "client-state"
    first = cluster.sidecar(None, control=ctl.url, extra=[*FAST, "--state-dir", str(state)])
    wait_for("catalog endpoint", lambda: endpoints_of(first, "catalog"))
    wait_for("sync", lambda: in_sync(ctl, first))
    version = config_of(first)["version"]

    def saved_version() -> str | None:  # the copy is written in the background
        try:
            return str(json.loads((state / "config.json").read_text())["version"])
        except (OSError, ValueError, KeyError):
            return None

    wait_for("the saved copy", lambda: saved_version() == version)
    assert first.proc.stop() == 0
    ctl.kill()

    second = cluster.sidecar(None, control=ctl.url, extra=[*FAST, "--state-dir", str(state)])
    view = config_of(second)
    assert view["version"] == version and "saved copy" in view["source"]
    assert view["control"]["connected"] is False
    for _ in range(20):
        status, _, body = request(second.outbound, path="/id", host="catalog")
        assert (status, body) == (200, b"catalog")


def sidecar_status(ctl: Control, sidecar: str) -> dict[str, Any] | None:
    """One sidecar's entry in ``GET /v1/status`` asked of ``ctl`` (None: not listed)."""
    for s in ctl.api("GET", "/v1/status")[1]["sidecars"]:
        if s["sidecar"] == sidecar:
            return dict(s)
    return None


def connected(ctl: Control, sidecar: str) -> bool | None:
    """``connected`` of one sidecar in ``GET /v1/status`` asked of ``ctl`` (None: not listed)."""
    st = sidecar_status(ctl, sidecar)
    return None if st is None else bool(st["connected"])


def test_check_counts_streams_held_by_another_control_process(cluster: Cluster, store: str) -> None:
    """Two control processes share one store; a sidecar watches through B. Asked of A,
    the sidecar is connected (and `meshlayer check` passes); once its stream on B
    closes, A says so too."""
    a = start_control(cluster.tmp, store, procs=cluster.procs)
    b = start_control(cluster.tmp, store, procs=cluster.procs)
    catalog = meshed_service(cluster, b, "catalog")
    sid = config_of(catalog)["control"]["sidecar"]
    wait_for("sync", lambda: in_sync(b, catalog))
    wait_for("A to list the sidecar", lambda: connected(a, sid) is not None)
    assert connected(a, sid) is True
    res = run_meshlayer(["check", "--control", a.url, "--wait", "3"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"sidecar {sid} at version" in res.stdout
    assert connected(b, sid) is True

    # a registration whose only stream (on B) closes: A stops counting it
    reg = {"service": "probe", "address": "127.0.0.1:9", "ttl": 30, "sidecar": "probe-1"}
    assert a.api("POST", "/v1/registry", reg)[0] == 200
    assert connected(a, "probe-1") is False
    watch = b.watch("probe-1")
    _, _, snap = watch.event()
    ident = a.api("GET", "/v1/status")[1]["store"]["id"]  # one store, one identity
    assert ident and snap["store"] == ident == b.api("GET", "/v1/status")[1]["store"]["id"]
    wait_for("A to see probe-1's stream", lambda: connected(a, "probe-1"))
    watch.close()
    wait_for(
        "A to see it closed",
        lambda: connected(a, "probe-1") is False,
        timeout=5,
    )
    versions = {int(a.api("GET", "/v1/status")[1]["version"]) for _ in range(2)}
    watch = b.watch("probe-1")  # stream records are not mesh changes
    watch.event()
    wait_for("A to see probe-1's stream", lambda: connected(a, "probe-1"))
    assert int(a.api("GET", "/v1/status")[1]["version"]) in versions
    watch.close()


def copy_sqlite(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite store (WAL included): the same store, as it
    was at this moment."""
    import sqlite3

    with sqlite3.connect(src) as s, sqlite3.connect(dst) as d:
        s.backup(d)
    s.close()
    d.close()


def test_versions_never_go_back_within_a_store_but_follow_a_new_store(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A control process started on an old copy of the store (same identity, lower
    version) is ignored; a new, empty store (another identity) is followed at once."""
    db = tmp_path / "control.db"
    ctl = start_control(cluster.tmp, f"sqlite:{db}", procs=cluster.procs)
    state = tmp_path / "client-state"
    client = cluster.sidecar(None, control=ctl.url, extra=[*FAST, "--state-dir", str(state)])
    apply(ctl, service_doc("early"))
    wait_for("sync", lambda: in_sync(ctl, client))
    copy_sqlite(db, tmp_path / "old.db")
    for i in range(6):  # far enough ahead that the copy's own lease bumps stay behind
        high = apply(ctl, service_doc(f"later-{i}"))
    wait_for("sync", lambda: in_sync(ctl, client))
    ident = ctl.api("GET", "/v1/status")[1]["store"]["id"]
    assert config_of(client)["control"]["store"] == ident
    assert json.loads((state / "config.json").read_text())["store"] == ident  # saved copy

    ctl.kill()
    old = start_control(
        cluster.tmp, f"sqlite:{tmp_path / 'old.db'}", port=ctl.port, procs=cluster.procs
    )
    assert old.api("GET", "/v1/status")[1]["store"]["id"] == ident
    wait_for(
        "the sidecar to ignore the old copy",
        lambda: "ignoring snapshot version" in client.proc.log(),
    )
    wait_for("it to reconnect", lambda: config_of(client)["control"]["connected"])
    assert mesh_version(old) < high
    time.sleep(0.5)
    view = config_of(client)
    assert int(view["version"]) == high and "later-5" in view["services"]

    old.kill()
    fresh = start_control(
        cluster.tmp, f"sqlite:{tmp_path / 'new.db'}", port=ctl.port, procs=cluster.procs
    )
    new_ident = fresh.api("GET", "/v1/status")[1]["store"]["id"]
    assert new_ident and new_ident != ident
    wait_for("the sidecar to follow the new store", lambda: in_sync(fresh, client))
    view = config_of(client)
    assert int(view["version"]) < high and "later-5" not in view["services"]
    assert view["control"]["store"] == new_ident
    assert "NEW STORE" in client.proc.log()


def test_sidecar_without_config_or_control_refuses_to_start(tmp_path: Path) -> None:
    res = run_meshlayer(["sidecar", "--service", "x"])
    assert res.returncode == 2
    assert "--config" in res.stderr and "--control" in res.stderr
    res = run_meshlayer(["sidecar", "--service", "x", "--control", "https://h:1"])
    assert res.returncode == 2 and "--control" in res.stderr


def reported_version(ctl: Control, sidecar: str) -> int | None:
    """The version ``sidecar`` last reported applied, per ``GET /v1/status``."""
    st = sidecar_status(ctl, sidecar)
    return None if st is None else int(st["applied"])


def test_the_control_plane_ends_with_the_last_version_of_a_burst(
    cluster: Cluster, ctl: Control
) -> None:
    """Versions pushed milliseconds apart are each applied and reported; the reports
    go one at a time, newest next, so the control plane ends with the last one (two
    reports sent at once could arrive swapped and leave the older one, until the next
    push: ``make demo`` once waited 20 s on a gateway shown at 9 that had applied 10)."""
    client = cluster.sidecar(None, control=ctl.url, extra=FAST)
    wait_for("sync", lambda: in_sync(ctl, client))
    me = config_of(client)["control"]["sidecar"]
    threads = [
        threading.Thread(
            target=apply,
            args=(ctl, service_doc(f"svc{i}", spec={"loadBalancer": "round-robin"})),
        )
        for i in range(12)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last = mesh_version(ctl)
    wait_for("the sidecar to apply the last version", lambda: in_sync(ctl, client), timeout=10)
    wait_for("its report", lambda: reported_version(ctl, me) == last, timeout=5)
