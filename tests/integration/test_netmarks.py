"""Socket marks on real sockets, on the wire, and the ``meshlayer net qos`` tree.

Loopback tests read the marks back from connected sockets. The namespace
tests build two network namespaces joined by a veth (private addresses that
exist only inside them; the host's interfaces are never touched), send
marked UDP from one side and read the IP headers on the other with an
AF_PACKET socket, then install the qos tree on the sending veth and watch
each class's band counter count exactly that class's packets.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshlayer.config.model import DEFAULT_PRIORITY_CLASSES, PriorityClass
from meshlayer.proxy.netmarks import (
    MarkError,
    SocketMarks,
    apply_marks,
    marked_socket,
    read_marks,
)
from tests.support.netns import B_V4, B_V6, DEV_A, DEV_B, NetnsPair
from tests.support.procs import ROOT, Cluster, run_meshlayer

PORT = 40999
KERNEL_CC = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def _listener(family: socket.AddressFamily, host: str) -> socket.socket:
    srv = socket.socket(family, socket.SOCK_STREAM)
    try:
        srv.bind((host, 0))
    except OSError as exc:
        srv.close()
        pytest.skip(f"no {host} here: {exc}")
    srv.listen(8)
    return srv


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_marks_read_back_from_connected_sockets(family: socket.AddressFamily, host: str) -> None:
    srv = _listener(family, host)
    custom = PriorityClass("gold", 70, dscp=34, so_priority=3, congestion_control="reno")
    with srv:
        for cls in (*DEFAULT_PRIORITY_CLASSES, custom):
            with socket.socket(family, socket.SOCK_STREAM) as s:
                apply_marks(s, cls, strict=True)
                s.connect(srv.getsockname()[:2])
                peer, _ = srv.accept()
                peer.close()
                want_cc = cls.congestion_control or KERNEL_CC
                assert read_marks(s) == SocketMarks(cls.dscp, cls.so_priority, want_cc), cls.name
    with marked_socket(family, custom, strict=True) as m:  # what the pool will use
        assert not m.getblocking()
        assert read_marks(m) == SocketMarks(34, 3, "reno")
    with socket.socket(family, socket.SOCK_DGRAM) as u:
        apply_marks(u, custom, strict=True)  # no congestion control on UDP
        assert read_marks(u) == SocketMarks(34, 3, None)


def test_refused_congestion_control_warns_once_and_keeps_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    odd = SocketMarks(10, 2, "nosuchcc")
    caplog.set_level(logging.WARNING, "meshlayer.netmarks")
    for _ in range(3):
        with socket.socket() as s:
            apply_marks(s, odd)
            assert read_marks(s) == SocketMarks(10, 2, KERNEL_CC)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "'nosuchcc'" in warnings[0] and "tcp_allowed_congestion_control" in warnings[0]
    with socket.socket() as s, pytest.raises(MarkError, match="nosuchcc"):
        apply_marks(s, odd, strict=True)


def _without(caps: str) -> list[str]:
    """Run a command as root without these capabilities (``net_admin,net_raw``)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop capabilities")
    drop = ",".join(f"-{cap}" for cap in caps.split(","))
    return ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", "--"]


def test_so_priority_above_6_needs_net_admin() -> None:
    code = (
        "from meshlayer.proxy.netmarks import *\nimport socket\n"
        "s = socket.socket()\napply_marks(s, SocketMarks(0, 6, None), strict=True)\n"
        "try:\n    apply_marks(s, SocketMarks(0, 7, None), strict=True)\n"
        "except MarkError as exc:\n    print(exc)\n"
        "from meshlayer.config.model import PriorityClass\n"
        "print(class_mark_problems([PriorityClass('x', 1, so_priority=9)]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(
        [*_without("net_admin,net_raw"), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "SO_PRIORITY 7 needs CAP_NET_ADMIN or CAP_NET_RAW" in done.stdout
    assert "PriorityClass/x: soPriority: 9 needs CAP_NET_ADMIN" in done.stdout


# --- network namespaces -------------------------------------------------------------


SNIFFER = """
import json, select, socket, struct, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3))  # ETH_P_ALL
s.bind(({dev!r}, 0))
print("ready", flush=True)
seen = {{}}
deadline = time.monotonic() + 8
while time.monotonic() < deadline and len(seen) < {want}:
    if not select.select([s], [], [], 0.2)[0]:
        continue
    data, addr = s.recvfrom(4096)
    if addr[1] == 0x0800 and data[9] == 17:
        hl = (data[0] & 0x0F) * 4
        tclass, udp = data[1], data[hl:]
    elif addr[1] == 0x86DD and data[6] == 17:
        tclass, udp = ((data[0] & 0x0F) << 4) | (data[1] >> 4), data[40:]
    else:
        continue
    if struct.unpack("!H", udp[2:4])[0] == {port}:
        seen[udp[8:].decode()] = tclass >> 2
print(json.dumps(seen), flush=True)
"""

SENDER = """
import socket
from meshlayer.config.model import DEFAULT_PRIORITY_CLASSES
from meshlayer.proxy.netmarks import apply_marks
for cls in DEFAULT_PRIORITY_CLASSES:
    for fam, dst in ((socket.AF_INET, {b4!r}), (socket.AF_INET6, {b6!r})):
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            apply_marks(s, cls, strict=True)
            for _ in range({count}):
                s.sendto(f"{{cls.name}}-{{fam.name}}".encode(), (dst, {port}))
for fam, dst in ((socket.AF_INET, {b4!r}), (socket.AF_INET6, {b6!r})):
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        for _ in range({count}):
            s.sendto(f"plain-{{fam.name}}".encode(), (dst, {port}))
"""


def _send(netns: NetnsPair, count: int) -> None:
    code = SENDER.format(b4=B_V4, b6=B_V6, port=PORT, count=count)
    done = netns.python(netns.a, code)
    assert done.returncode == 0, done.stderr


def test_dscp_seen_on_the_wire(netns: NetnsPair) -> None:
    sniffer = netns.popen_python(netns.b, SNIFFER.format(dev=DEV_B, want=8, port=PORT))
    try:
        assert sniffer.stdout is not None
        assert sniffer.stdout.readline().strip() == "ready", (
            sniffer.stderr and sniffer.stderr.read()
        )
        _send(netns, 2)
        out, err = sniffer.communicate(timeout=15)
    finally:
        if sniffer.poll() is None:
            sniffer.kill()
            sniffer.wait(5)
    seen = json.loads(out.splitlines()[-1])
    assert seen == {
        "critical-AF_INET": 46,
        "critical-AF_INET6": 46,
        "default-AF_INET": 0,
        "default-AF_INET6": 0,
        "batch-AF_INET": 8,
        "batch-AF_INET6": 8,
        "plain-AF_INET": 0,
        "plain-AF_INET6": 0,
    }, err


def _bands(netns: NetnsPair) -> dict[str, dict[str, object]]:
    done = netns.meshlayer(netns.a, ["net", "qos", "show", "--dev", DEV_A, "--json"])
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["tree"] is True, view
    return {str(b["class"]): b for b in view["bands"]}


def test_qos_tree_applied_classifies_and_clears(netns: NetnsPair) -> None:
    apply = ["net", "qos", "apply", "--dev", DEV_A, "--rate", "50mbit"]
    done = netns.meshlayer(netns.a, apply)
    assert done.returncode == 0, done.stderr
    assert "1:10 critical: rate 30Mbit ceil 50Mbit prio 0" in done.stdout
    again = netns.meshlayer(netns.a, apply)  # applying twice gives the same tree
    assert again.returncode == 0, again.stderr

    qdiscs = json.loads(netns.run(netns.a, ["tc", "-j", "qdisc", "show", "dev", DEV_A]).stdout)
    root = [q for q in qdiscs if q.get("root")]
    assert [(q["kind"], q["handle"]) for q in root] == [("htb", "1:")]
    leaves = sorted(q["parent"] for q in qdiscs if not q.get("root"))
    assert leaves == ["1:10", "1:11", "1:12"]
    classes = netns.run(netns.a, ["tc", "class", "show", "dev", DEV_A]).stdout
    for classid in ("1:1 ", "1:10 ", "1:11 ", "1:12 "):
        assert f"class htb {classid}" in classes
    filters = netns.run(netns.a, ["tc", "filter", "show", "dev", DEV_A]).stdout
    assert "flowid 1:10" in filters and "flowid 1:12" in filters

    before = _bands(netns)
    assert before["critical"]["sent_packets"] == 0 and before["batch"]["sent_packets"] == 0
    _send(netns, 5)
    after = _bands(netns)
    # 5 v4 + 5 v6 datagrams per class; unmarked traffic (and ARP, ND) goes to default.
    assert after["critical"]["sent_packets"] == 10
    assert after["batch"]["sent_packets"] == 10
    assert int(str(after["default"]["sent_packets"])) >= 20
    assert after["default"]["default"] is True

    table = netns.meshlayer(netns.a, ["net", "qos", "show", "--dev", DEV_A])
    assert table.returncode == 0, table.stderr
    assert "critical" in table.stdout and "default *" in table.stdout

    cleared = netns.meshlayer(netns.a, ["net", "qos", "clear", "--dev", DEV_A])
    assert cleared.returncode == 0 and "removed" in cleared.stdout, cleared.stderr
    qdiscs = json.loads(netns.run(netns.a, ["tc", "-j", "qdisc", "show", "dev", DEV_A]).stdout)
    assert all(q["kind"] != "htb" for q in qdiscs), qdiscs
    gone = netns.meshlayer(netns.a, ["net", "qos", "show", "--dev", DEV_A, "--json"])
    assert json.loads(gone.stdout)["tree"] is False
    again = netns.meshlayer(netns.a, ["net", "qos", "clear", "--dev", DEV_A])
    assert again.returncode == 0 and "no qos tree" in again.stdout

    # Someone else's root qdisc: clear leaves it alone, apply replaces it.
    assert (
        netns.run(
            netns.a, ["tc", "qdisc", "add", "dev", DEV_A, "root", "handle", "5:", "pfifo"]
        ).returncode
        == 0
    )
    foreign = netns.meshlayer(netns.a, ["net", "qos", "clear", "--dev", DEV_A])
    assert foreign.returncode == 1 and "pfifo 5:, not a meshlayer qos tree" in foreign.stderr
    assert netns.meshlayer(netns.a, apply).returncode == 0
    assert _bands(netns)["critical"]["sent_packets"] == 0


def test_qos_without_net_admin_says_so(netns: NetnsPair) -> None:
    drop = _without("net_admin")
    for action in (["apply", "--rate", "10mbit"], ["clear"]):
        argv = [*drop, sys.executable, "-m", "meshlayer", "net", "qos", *action, "--dev", DEV_A]
        done = netns.run(netns.a, argv)
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "meshlayer net qos needs CAP_NET_ADMIN (run as root)" in done.stderr
    qdiscs = json.loads(netns.run(netns.a, ["tc", "-j", "qdisc", "show", "dev", DEV_A]).stdout)
    assert all(q["kind"] != "htb" for q in qdiscs)


def test_qos_missing_device_and_bad_rate(netns: NetnsPair) -> None:
    done = netns.meshlayer(
        netns.a, ["net", "qos", "apply", "--dev", "nosuchdev", "--rate", "1gbit"]
    )
    assert done.returncode == 1 and "no network interface 'nosuchdev'" in done.stderr
    done = netns.meshlayer(netns.a, ["net", "qos", "apply", "--dev", DEV_A, "--rate", "fast"])
    assert done.returncode == 2 and "rate 'fast'" in done.stderr


def test_qos_without_tc_names_the_package(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path), PYTHONPATH=str(ROOT / "src"))
    for action in (["apply", "--rate", "10mbit"], ["show"], ["clear"]):
        done = subprocess.run(
            [sys.executable, "-m", "meshlayer", "net", "qos", *action, "--dev", "mlq-none0"],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
            check=False,
        )
        assert done.returncode == 1, (action, done.stderr)
        assert "install the Debian package iproute2" in done.stderr, (action, done.stderr)


def test_qos_help_and_dry_run() -> None:
    for argv in (["net"], ["net", "qos"], *(["net", "qos", a] for a in ("apply", "show", "clear"))):
        done = run_meshlayer([*argv, "--help"])
        assert done.returncode == 0 and "usage: meshlayer" in done.stdout, argv
    dry = run_meshlayer(["net", "qos", "apply", "--dev", "eth9", "--rate", "1gbit", "--dry-run"])
    assert dry.returncode == 0, dry.stderr
    assert "tc qdisc add dev eth9 root handle 1: htb default 11" in dry.stdout
    assert "u32 match ip dsfield 0xb8 0xfc flowid 1:10" in dry.stdout


def test_qos_classes_file(tmp_path: Path) -> None:
    f = tmp_path / "classes.yaml"
    f.write_text(
        "apiVersion: meshlayer/v1\nkind: PriorityClass\nmetadata: {name: gold}\n"
        "spec: {rank: 75, weight: 20, dscp: AF41}\n"
    )
    argv = ["net", "qos", "apply", "--dev", "eth9", "--rate", "1gbit", "--classes", str(f)]
    dry = run_meshlayer([*argv, "--dry-run"])
    assert dry.returncode == 0, dry.stderr
    assert "u32 match ip dsfield 0x88 0xfc flowid 1:11" in dry.stdout  # gold is second by rank
    f.write_text(f.read_text().replace("AF41", "AF51"))
    bad = run_meshlayer([*argv, "--dry-run"])
    assert bad.returncode == 2 and "(PriorityClass/gold): spec.dscp" in bad.stderr


def test_sidecar_warns_about_marks_it_cannot_apply(cluster: Cluster) -> None:
    config = (
        "apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: catalog}\n"
        "spec: {endpoints: [{address: '127.0.0.1:9'}]}\n---\n"
        "apiVersion: meshlayer/v1\nkind: PriorityClass\nmetadata: {name: batch}\n"
        "spec: {rank: 5, dscp: LE, congestionControl: nosuchcc}\n"
    )
    sc = cluster.sidecar(config)
    status, body = sc.admin_get("/config")
    assert status == 200
    classes = json.loads(body)["priorityClasses"]
    assert list(classes) == ["critical", "default", "batch"]
    assert classes["batch"]["congestionControl"] == "nosuchcc" and classes["batch"]["dscp"] == 1
    log = sc.proc.log()
    assert "PriorityClass/batch: congestionControl: TCP congestion control 'nosuchcc'" in log
    assert log.count("'nosuchcc'") == 1
