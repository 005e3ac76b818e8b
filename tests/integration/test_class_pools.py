"""Per-class upstream pools and socket marks, through real sidecars.

The test upstream's ``/peer`` says which port a request came from, so each
class's connection is known by its port; ``ss --tos -i`` then reads that
socket's marks (TOS byte, ``class_id`` = SO_PRIORITY, congestion control)
from the kernel, on the sidecar's side. The wire test runs the sidecar and
the upstream in two network namespaces joined by a veth and reads the DSCP
of every TCP segment (SYN included) off the upstream's interface with an
AF_PACKET socket.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.netns import B_V4, DEV_B, NetnsPair, env
from tests.support.procs import (
    ROOT,
    Cluster,
    Proc,
    Sidecar,
    Upstream,
    free_port,
    request,
    service_yaml,
)

HEADER = "x-meshlayer-priority"
BATCH_RENO = (
    "---\napiVersion: meshlayer/v1\nkind: PriorityClass\nmetadata: {name: batch}\n"
    "spec: {rank: 10, weight: 10, dscp: CS1, soPriority: 1, congestionControl: reno}\n"
)
DEFAULT_AF21 = (
    "---\napiVersion: meshlayer/v1\nkind: PriorityClass\nmetadata: {name: default}\n"
    "spec: {rank: 50, weight: 30, dscp: AF21, soPriority: 2}\n"
)
KERNEL_CC = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
# what ss shows of each class's sockets: (TOS byte, SO_PRIORITY, congestion control)
WANT = {
    "critical": (0xB8, 6, KERNEL_CC),
    "default": (0, 0, KERNEL_CC),
    "batch": (0x20, 1, "reno"),
}


def _ss_marks(local_port: int, remote_port: int) -> tuple[int, int, str]:
    """(TOS or IPv6 traffic class, class_id, congestion control) of the established
    socket local→remote."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (Debian package iproute2)")
    out = subprocess.run(
        [
            "ss",
            "-tinH",
            "--tos",
            "state",
            "established",
            f"( sport = :{local_port} and dport = :{remote_port} )",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    tos = re.search(r"\btclass:(0x[0-9a-f]+|0)\b", out) or re.search(
        r"\btos:(0x[0-9a-f]+|0)\b", out
    )
    class_id = re.search(r"\bclass_id:(0x[0-9a-f]+|0)\b", out)
    cc = re.search(r"^\s+(\w+) wscale:", out, re.M)
    assert tos and class_id and cc, out
    return int(tos.group(1), 0), int(class_id.group(1), 0), cc.group(1)


def _peer(port: int, cls: str | None, host: str = "catalog") -> int:
    headers = {HEADER: cls} if cls else {}
    status, _, body = request(port, path="/peer", host=host, headers=headers)
    assert status == 200, body
    return int(json.loads(body)["port"])


def _start(cluster: Cluster, extra: list[str], spec: str = "") -> tuple[Upstream, Sidecar]:
    up = cluster.upstream("catalog")
    config = service_yaml("catalog", [up.address], spec=spec) + BATCH_RENO
    sc = cluster.sidecar(
        config + (DEFAULT_AF21 if "off" in extra else ""),
        service="web",
        app=up.address,  # inbound: the same upstream plays the local app
        extra=extra,
    )
    return up, sc


def test_each_class_gets_its_own_pool_and_marks(cluster: Cluster) -> None:
    up, sc = _start(cluster, ["--access-log"])
    for listener, direction in ((sc.outbound, "outbound"), (sc.inbound, "inbound")):
        ports = {cls: _peer(listener, cls) for cls in WANT}
        again = {cls: _peer(listener, cls) for cls in WANT}
        assert ports == again, "a class reuses its own keep-alive connection"
        assert len(set(ports.values())) == 3, ports
        assert _peer(listener, None) == ports["default"]  # no class: the service's default
        for cls, port in ports.items():
            assert _ss_marks(port, up.port) == WANT[cls], (direction, cls)
        for cls, n in (("critical", 2), ("default", 3), ("batch", 2)):
            got = sc.metric(
                "meshlayer_requests_total", direction=direction, priority=cls, status_class="2xx"
            )
            assert got == n, (direction, cls, got)
            count = sc.metric(
                "meshlayer_request_duration_seconds_count", direction=direction, priority=cls
            )
            assert count == n, (direction, cls, count)
    for cls in WANT:
        assert (
            sc.metric("meshlayer_upstream_pool_connections", service="catalog", priority=cls) == 1
        )
        assert (
            sc.metric("meshlayer_upstream_pool_connections", service="web(app)", priority=cls) == 1
        )
    status, body = sc.admin_get("/config")
    assert status == 200
    view = json.loads(body)["priority"]
    assert view["mode"] == "on"
    assert [(c["index"], c["name"], c["pool"]) for c in view["classes"]] == [
        (0, "critical", "critical"),
        (1, "default", "default"),
        (2, "batch", "batch"),
    ]
    assert view["classes"][2]["marks"] == {
        "dscp": 8,
        "tos": "0x20",
        "soPriority": 1,
        "congestionControl": "reno",
    }
    assert view["classes"][1]["marks"] is None and view["notApplied"] == []
    log = sc.proc.log()
    assert 'inbound "GET /peer HTTP/1.1" 200' in log and " prio=batch rid=" in log


def test_ipv6_endpoint_sockets_carry_the_traffic_class(cluster: Cluster) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no ::1 here: {exc}")
    port = free_port()
    proc = Proc(
        f"upstream-v6-{port}",
        [sys.executable, "-m", "tests.support.upstream_app", "--host", "::1", "--port", str(port)],
        cluster.tmp,
    )
    cluster.procs.append(proc)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("::1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.popen.poll() is None, proc.log()
            time.sleep(0.02)
    sc = cluster.sidecar(service_yaml("catalog", [f"[::1]:{port}"]) + BATCH_RENO, service="web")
    for cls, want in WANT.items():
        assert _ss_marks(_peer(sc.outbound, cls), port) == want, cls


def test_marked_connects_by_name_and_failed_ones_free_their_slot(cluster: Cluster) -> None:
    up = cluster.upstream("named")
    dead = free_port()  # nothing listens there
    config = (
        service_yaml("named", [f"localhost:{up.port}"])
        + "---\n"
        + service_yaml("dead", [f"127.0.0.1:{dead}"], spec=LIMITS)
    )
    sc = cluster.sidecar(config, service="web")
    port = _peer(sc.outbound, "critical", host="named")  # resolved, then marked and connected
    assert _ss_marks(port, up.port) == WANT["critical"]
    for _ in range(2):  # the second would overflow if the failed connect kept its slot
        status, headers, _ = request(sc.outbound, host="dead", headers={HEADER: "critical"})
        assert status == 503 and headers["x-meshlayer-error"] == "connect-failure"
    assert sc.metric("meshlayer_upstream_pool_connections", service="dead") == 0


def _stuck_batch(sc: Sidecar, up: Upstream) -> tuple[threading.Thread, list[int]]:
    """A batch request the upstream holds for 2 s, on the only batch connection."""
    result: list[int] = []

    def run() -> None:
        result.append(
            request(sc.outbound, path="/delay/2000", host="catalog", headers={HEADER: "batch"})[0]
        )

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and up.stats()["requests"] < 1:
        time.sleep(0.02)
    assert up.stats()["requests"] >= 1
    return t, result


def _client_sends(client: http.client.HTTPConnection, cls: str | None) -> None:
    client.request("GET", "/", headers={"Host": "catalog", **({HEADER: cls} if cls else {})})
    resp = client.getresponse()
    resp.read()
    assert resp.status == 200


def test_accepted_sockets_carry_the_class_of_their_response(cluster: Cluster) -> None:
    """The response bytes leave on the listener's accepted socket: it gets the class's
    marks once classified, and is re-marked when a later request's class differs."""
    up, sc = _start(cluster, [])
    for listener in (sc.outbound, sc.inbound):
        client = http.client.HTTPConnection("127.0.0.1", listener, timeout=10)
        try:
            client.connect()
            assert client.sock is not None
            port = client.sock.getsockname()[1]
            assert _ss_marks(listener, port) == WANT["default"]  # accepted: the defaults
            for cls in ("batch", "batch", "critical", "default", "batch", None):
                _client_sends(client, cls)
                want = WANT[cls or "default"]  # no class: the service's default
                assert _ss_marks(listener, port) == want, (listener, cls)
        finally:
            client.close()
    # priority off: every accepted socket carries the default class's marks
    sc2 = cluster.sidecar(
        service_yaml("catalog", [up.address]) + DEFAULT_AF21,
        service="web2",
        extra=["--priority", "off"],
    )
    client = http.client.HTTPConnection("127.0.0.1", sc2.outbound, timeout=10)
    try:
        _client_sends(client, "batch")
        assert client.sock is not None
        port = client.sock.getsockname()[1]
        assert _ss_marks(sc2.outbound, port) == (0x48, 2, KERNEL_CC)
    finally:
        client.close()


LIMITS = "circuitBreaker: {maxConnections: 1, maxPendingRequests: 0}"


def test_critical_is_answered_while_batch_holds_its_connection(cluster: Cluster) -> None:
    up, sc = _start(cluster, [], spec=LIMITS)
    t, result = _stuck_batch(sc, up)
    t0 = time.monotonic()
    status, headers, _ = request(sc.outbound, host="catalog", headers={HEADER: "batch"})
    assert status == 503 and headers["x-meshlayer-error"] == "overflow"  # batch's pool is full
    for cls in ("critical", "default"):
        status, _, _ = request(sc.outbound, host="catalog", headers={HEADER: cls})
        assert status == 200, cls
    assert time.monotonic() - t0 < 1.2  # long before the batch request ends
    assert not result, "the batch request is still on its connection"
    t.join(10)
    assert result == [200]


def test_priority_off_is_one_pool_with_the_default_marks(cluster: Cluster) -> None:
    up, sc = _start(cluster, ["--priority", "off"])
    ports = {cls: _peer(sc.outbound, cls) for cls in WANT}
    assert len(set(ports.values())) == 1, ports  # one keep-alive connection for all classes
    assert _ss_marks(ports["critical"], up.port) == (0x48, 2, KERNEL_CC)  # default: AF21, 2
    status, _, body = request(
        sc.outbound, path="/headers", host="catalog", headers={HEADER: "batch"}
    )
    assert status == 200
    assert [HEADER, "batch"] in json.loads(body)["headers"]  # the class is still forwarded
    assert sc.metric("meshlayer_upstream_pool_connections", service="catalog", priority="*") == 1
    status, body = sc.admin_get("/config")
    view = json.loads(body)["priority"]
    assert view["mode"] == "off (FIFO)" and {c["pool"] for c in view["classes"]} == {"*"}
    # with one pool, a critical request waits behind batch: here it overflows at once
    sc2 = cluster.sidecar(
        service_yaml("catalog", [up.address], spec=LIMITS),
        service="web2",
        extra=["--priority", "off"],
    )
    t, result = _stuck_batch(sc2, up)
    status, headers, _ = request(sc2.outbound, host="catalog", headers={HEADER: "critical"})
    assert status == 503 and headers["x-meshlayer-error"] == "overflow"
    t.join(10)
    assert result == [200]


def _established(dport: int) -> set[int]:
    """Local ports of the established TCP connections to ``dport``."""
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( dport = :{dport} )"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return {int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def test_mtls_sockets_carry_marks_and_follow_class_changes(cluster: Cluster) -> None:
    from tests.integration.security.mesh import sidecar_view, start_mesh, wait_identity

    mesh = start_mesh(cluster)
    up = cluster.upstream("b")
    b = mesh.sidecar("b", up.address)
    a = mesh.sidecar("a", "127.0.0.1:9")
    wait_identity(b)
    wait_identity(a, ("b",))
    shipped = {**WANT, "batch": (0x20, 1, KERNEL_CC)}

    def call(cls: str) -> tuple[int, int]:
        """(a's port to b's inbound, b's port to its app) of a new or reused connection."""
        before = _established(b.inbound)
        status, _, body = request(a.outbound, path="/peer", host="b", headers={HEADER: cls})
        assert status == 200, body
        new = _established(b.inbound) - before
        assert len(new) <= 1, new
        return (new.pop() if new else 0), int(json.loads(body)["port"])

    meshed: dict[str, int] = {}
    app: dict[str, int] = {}
    for cls in shipped:
        meshed[cls], app[cls] = call(cls)
        assert meshed[cls], f"{cls} got a connection of its own"
        assert _ss_marks(meshed[cls], b.inbound) == shipped[cls], ("mTLS", cls)
        assert _ss_marks(app[cls], up.port) == shipped[cls], ("b's app", cls)
    assert call("critical") == (0, app["critical"])  # reused, on both sidecars

    # New marks for batch, pushed by the control plane: batch gets a new pool (the old
    # one's idle connection is closed); the other classes keep theirs.
    spec = {"rank": 10, "weight": 10, "dscp": "AF11", "soPriority": 1, "congestionControl": "reno"}
    mesh.apply(
        {
            "apiVersion": "meshlayer/v1",
            "kind": "PriorityClass",
            "metadata": {"name": "batch"},
            "spec": spec,
        }
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        views = [sidecar_view(sc)["priority"]["classes"][2]["marks"] for sc in (a, b)]
        if all(v and v["dscp"] == 10 for v in views):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the new batch class did not arrive: {views}")
    port, app_port = call("batch")
    assert port and port != meshed["batch"] and app_port != app["batch"]
    assert _ss_marks(port, b.inbound) == (0x28, 1, "reno")
    assert _ss_marks(app_port, up.port) == (0x28, 1, "reno")
    assert meshed["batch"] not in _established(b.inbound)  # the retired pool closed it
    assert call("critical") == (0, app["critical"])  # kept across the reload


def test_priority_flag_help_and_validation() -> None:
    from tests.support.procs import run_meshlayer

    done = run_meshlayer(["sidecar", "--help"])
    assert done.returncode == 0
    assert "--priority {on,off}" in done.stdout and "FIFO" in done.stdout
    bad = run_meshlayer(["sidecar", "--service", "x", "--config", "none.yaml", "--priority", "no"])
    assert bad.returncode == 2 and "invalid choice: 'no'" in bad.stderr


# --- on the wire, between two network namespaces --------------------------------------


UP_PORT, OUT_PORT, IN_PORT, ADMIN_PORT = 18080, 15001, 15006, 15090

SNIFFER = """
import json, select, socket, struct, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
s.bind(({dev!r}, 0))
print("ready", flush=True)
seen = {{}}  # source port -> [dscp values], "syn:<port>" -> dscp of its SYN
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    if not select.select([s], [], [], 0.1)[0]:
        continue
    data = s.recv(4096)
    if data[9] != 6:
        continue
    hl = (data[0] & 0x0F) * 4
    sport, dport = struct.unpack("!HH", data[hl:hl + 4])
    if dport == {port}:
        seen.setdefault(str(sport), []).append(data[1] >> 2)
        if data[hl + 13] & 0x02:
            seen["syn:%d" % sport] = data[1] >> 2
        if data[hl + 13] & 0x01 and "fin:%d" % sport not in seen:
            seen["fin:%d" % sport] = 1
    if sum(k.startswith("fin:") for k in seen) >= {want}:
        break
print(json.dumps(seen), flush=True)
"""

WAIT_UPSTREAM = """
import socket, time
deadline = time.monotonic() + 15
while True:
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
"""

CLIENT = """
import http.client, json, time
deadline = time.monotonic() + 15
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", {admin}, timeout=2)
        c.request("GET", "/ready")
        if c.getresponse().status == 200:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        raise SystemExit("sidecar not ready")
    time.sleep(0.05)
ports = {{}}
for cls in ("critical", "default", "batch"):
    for _ in range(3):
        c = http.client.HTTPConnection("127.0.0.1", {out}, timeout=5)
        c.request("POST", "/peer", body=b"x" * 3000, headers={{"Host": "catalog",
                  "x-meshlayer-priority": cls}})
        r = c.getresponse()
        assert r.status == 200, r.read()
        ports[cls] = json.loads(r.read())["port"]
        c.close()
print(json.dumps(ports), flush=True)
"""


def test_dscp_of_each_class_on_the_wire(netns: NetnsPair, tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(service_yaml("catalog", [f"{B_V4}:{UP_PORT}"]) + BATCH_RENO)
    procs: list[subprocess.Popen[bytes]] = []

    def start(ns: str, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(),
            cwd=str(ROOT),
        )
        procs.append(proc)
        return proc

    sniffer = netns.popen_python(netns.b, SNIFFER.format(dev=DEV_B, port=UP_PORT, want=3))
    try:
        assert sniffer.stdout is not None
        assert sniffer.stdout.readline().strip() == "ready"
        start(
            netns.b,
            ["-m", "tests.support.upstream_app", "--host", "0.0.0.0", "--port", str(UP_PORT)],
            "upstream",
        )
        sidecar = start(
            netns.a,
            [
                "-m",
                "meshlayer",
                "sidecar",
                "--service",
                "web",
                "--config",
                str(config),
                "--outbound",
                f"127.0.0.1:{OUT_PORT}",
                "--inbound",
                f"127.0.0.1:{IN_PORT}",
                "--admin",
                f"127.0.0.1:{ADMIN_PORT}",
                "--grace",
                "1",
            ],
            "sidecar",
        )
        waited = netns.python(netns.b, WAIT_UPSTREAM.format(port=UP_PORT))  # over its lo
        assert waited.returncode == 0, waited.stderr
        done = netns.python(netns.a, CLIENT.format(admin=ADMIN_PORT, out=OUT_PORT))
        assert done.returncode == 0, done.stderr + (tmp_path / "sidecar.log").read_text()
        ports = json.loads(done.stdout.splitlines()[-1])
        sidecar.terminate()  # closing its pools sends each connection's FIN
        sidecar.wait(10)
        out, err = sniffer.communicate(timeout=30)
    finally:
        for proc in [sniffer, *procs]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    seen = json.loads(out.splitlines()[-1])
    dscp = {"critical": 46, "default": 0, "batch": 8}
    for cls, port in ports.items():
        values = seen.get(str(port))
        assert values, (cls, port, seen, err)
        assert seen[f"syn:{port}"] == dscp[cls], (cls, "the SYN already carries the mark")
        assert set(values) == {dscp[cls]}, (cls, values)
        assert len(values) >= 5  # SYN, the head and body segments, ACKs, FIN
