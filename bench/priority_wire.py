#!/usr/bin/env python3
"""The wire case of the priority benchmark: class marks and the qos tree on a shaped link.

Theory of operation. Two network namespaces, ``a`` (the client side) and ``b``
(the server side), are joined by a veth pair (10.231.0.1 ↔ 10.231.0.2; private
addresses that exist only inside them, the host's interfaces are never
touched). Everything runs inside them::

    ns a                                              ns b
    load worker ──lo──► client sidecar ══veth-a══► server sidecar ──lo──► app
    (bulk + critical)   (outbound, marks its  ◄══veth-b══ (inbound, marks   (counts body
                         upstream sockets)                 its accepted       bytes, serves
                                                           sockets)           downloads)

Both directions are bottlenecks: the egress of ``veth-a`` (requests, uploads)
and the egress of ``veth-b`` (responses, downloads) are each shaped to
20 Mbit/s. Four bulk flows are *uploads* (``POST`` with a 1 MiB body,
``x-meshlayer-priority: batch``): they cross veth-a on the client sidecar's
upstream connections -- the sockets its per-class pools mark with the class's
DSCP and SO_PRIORITY before connect. Four more are *downloads* (``GET`` of a
1 MiB body, batch): they cross veth-b from the server sidecar's *accepted*
sockets, which the sidecar re-marks with the class of the request they carry
once it is classified (the client sidecar's per-class pools keep one class per
connection, so it happens once per connection). The critical calls (``GET``,
``x-meshlayer-priority: critical``, a few hundred bytes each way, Poisson
arrivals at 50/s, open loop: latency counts from the intended send time) cross
veth-a on the client sidecar's critical pool and come back over veth-b on the
server sidecar's matching accepted sockets, marked EF both ways.

Phases, each with fresh load (a worker process in ``a``) after a warm-up:

- ``unloaded/qos``   -- ``meshlayer net qos apply --dev veth-a --rate 20mbit``
  in ns a and the same on veth-b in ns b; critical calls only: the baseline p99;
- ``loaded/qos``     -- the same trees, the bulk flows (uploads and downloads)
  plus the critical calls;
- ``loaded/qos/prio-off`` -- the same, with both sidecars restarted with
  ``--priority off`` (one pool per service, every socket, accepted or
  connected, with the ``default`` class's marks, i.e. DSCP 0): what the trees
  do without the sidecars' per-class marks;
- ``unloaded/fifo``, ``loaded/fifo`` -- ``meshlayer net qos clear``, then the
  same 20 Mbit/s HTB shaper with a single FIFO band on both veths (a veth
  without a qdisc has no bottleneck at all, so "no qos" means one queue for
  everyone).

Upload throughput is the body bytes the app received during the measured
window (the app appends ``monotonic-time bytes`` to a file every 50 ms;
CLOCK_MONOTONIC is shared by all namespaces); download throughput is the body
bytes the worker received in the window; each as a share of the shaped rate.
That is goodput: Ethernet, IP and TCP headers (about 4.5 % at full-size
segments) count against the shaper's rate but not here. The trees' per-band
counters (``net qos show --json``) are read before and after each phase, so
the table also shows which band the bytes went through, per direction: the
marks as the qdisc saw them.

Targets (issue 5): with the trees, critical p99 loaded ≤ unloaded p99 + 2 ms
while bulk ≥ 90 % of 20 Mbit/s (each direction); without them, critical p99
grows tenfold or more. ``--direct`` bypasses the sidecars (the worker marks its
own sockets, the app its accepted ones, and the worker talks to the app): a
check of the harness and the trees alone. ``--down-flows 0`` is the upload-only
case of before.

The link is the bottleneck, not a CPU: the processes together use a few per
cent of one, may run on every CPU, and run under SCHED_FIFO (``chrt``) so that
other load on a shared machine does not show in their tails (it did: with the
normal scheduler, an unloaded p99 of 60 ms on a busy host; ``--no-rt`` to see
it). Every process is started by this script and stopped by its PID (SIGTERM,
then SIGKILL), the namespaces are deleted in ``finally`` (and on SIGTERM), and
every wait is bounded. Needs root, ``ip`` and ``tc`` (Debian iproute2).

Run (from the repository root)::

    .venv/bin/python bench/priority_wire.py               # 20 s per phase
    .venv/bin/python bench/priority_wire.py --quick       # 6 s per phase
    .venv/bin/python bench/priority_wire.py --markdown    # also a table for RESULTS.md

``bench/priority.py`` reaches it through :func:`add_wire_arguments` and
:func:`run_wire_case` (rows) plus :func:`wire_report` (the table).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent

RATE = "20mbit"
RATE_BPS = 20_000_000
A_ADDR, B_ADDR = "10.231.0.1", "10.231.0.2"
DEV_A, DEV_B = "veth-a", "veth-b"
APP_PORT = 8080  # in ns b (all ports live in the namespaces: no clash with the host)
INBOUND_PORT = 15006
OUTBOUND_PORT = 15001
ADMIN_PORT = 15090
SERVICE = "wire-server"
UPLOAD_BYTES = 1 << 20
DOWNLOAD_BYTES = 1 << 20
CHUNK = 64 * 1024
CRITICAL_BODY = b"c" * 200
MAX_CRITICAL_CONNS = 512
CALL_TIMEOUT = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
RT_PRIORITY = 10  # SCHED_FIFO priority of the bench's processes with --rt (the default)

TARGET_ADDED_P99_MS = 2.0
TARGET_BULK_SHARE = 0.90
TARGET_FIFO_GROWTH = 10.0

PHASES = ("unloaded/qos", "loaded/qos", "loaded/qos/prio-off", "unloaded/fifo", "loaded/fifo")
"""All phases, in the order they run (the prio-off one restarts both sidecars)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- namespaces


def wire_unavailable() -> str:
    """Why the wire case cannot run here, or "" when it can."""
    if os.geteuid() != 0:
        return "needs root (ip netns add, tc)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs the ip and tc commands (Debian package iproute2)"
    return ""


def _run(
    argv: Sequence[str], timeout: float = 20.0, check: bool = True, stderr: bool = False
) -> str:
    """Run to completion; returns stdout (and stderr after it with ``stderr``)."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(argv)} did not finish within {timeout:g} s") from None
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.stdout}")
    return done.stdout + done.stderr if stderr else done.stdout


class Namespaces:
    """``a`` and ``b`` joined by ``veth-a``/``veth-b`` with static neighbours."""

    def __init__(self) -> None:
        tag = f"mlw{os.getpid() % 100000}"
        self.a, self.b = f"{tag}a", f"{tag}b"
        self.created: list[str] = []

    def create(self) -> None:
        for ns in (self.a, self.b):
            _run(["ip", "netns", "add", ns])
            self.created.append(ns)
        _run(
            [
                "ip",
                "-n",
                self.a,
                "link",
                "add",
                DEV_A,
                "type",
                "veth",
                "peer",
                "name",
                DEV_B,
                "netns",
                self.b,
            ]
        )
        for ns, dev, addr in ((self.a, DEV_A, A_ADDR), (self.b, DEV_B, B_ADDR)):
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for ns, dev, peer_ns, peer_dev, addr in (
            (self.a, DEV_A, self.b, DEV_B, B_ADDR),
            (self.b, DEV_B, self.a, DEV_A, A_ADDR),
        ):
            link = json.loads(_run(["ip", "-n", peer_ns, "-j", "link", "show", "dev", peer_dev]))
            mac = str(link[0]["address"])
            _run(
                [
                    "ip",
                    "-n",
                    ns,
                    "neigh",
                    "replace",
                    addr,
                    "lladdr",
                    mac,
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ]
            )

    def remove(self) -> None:
        for ns in reversed(self.created):
            _run(["ip", "netns", "del", ns], check=False)
        self.created.clear()

    def exec(
        self, ns: str, argv: Sequence[str], timeout: float = 30.0, stderr: bool = False
    ) -> str:
        """Run to completion in ``ns``; raises RuntimeError on failure."""
        return _run(["ip", "netns", "exec", ns, *argv], timeout, stderr=stderr)

    def tc_show(self, what: str) -> str:
        return self.exec(self.a, ["tc", what, "show", "dev", DEV_A], 10)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class Proc:
    """A process this benchmark started in a namespace (``ip netns exec`` execs it: same PID)."""

    name: str
    popen: subprocess.Popen[bytes]
    logfile: Path

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


def spawn(ns: str, name: str, argv: Sequence[str], workdir: Path, rt: bool = False) -> Proc:
    """Start ``argv`` in ``ns``; ``rt``: under SCHED_FIFO (``chrt``), ahead of other load."""
    logfile = workdir / f"{name}.log"
    prefix = ["chrt", "--fifo", str(RT_PRIORITY)] if rt else []
    with logfile.open("wb") as out:
        popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, *prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(),
            cwd=str(REPO),
        )
    return Proc(name, popen, logfile)


# ------------------------------------------------------------------------------ qdiscs


def links(nss: Namespaces) -> tuple[tuple[str, str], tuple[str, str]]:
    """The two shaped egresses as (namespace, device): up (veth-a), down (veth-b)."""
    return (nss.a, DEV_A), (nss.b, DEV_B)


def apply_qos(nss: Namespaces) -> str:
    """``meshlayer net qos apply`` on both veths; returns what it printed on veth-a."""
    printed = []
    for ns, dev in links(nss):
        argv = [sys.executable, "-m", "meshlayer", "net", "qos", "apply", "--dev", dev]
        printed.append(nss.exec(ns, [*argv, "--rate", RATE], stderr=True))
    return printed[0]


def apply_fifo(nss: Namespaces) -> None:
    """``net qos clear``, then the same HTB shaper with one FIFO band (handle 2:), both veths."""
    tc = ["tc"]
    for ns, dev in links(nss):
        nss.exec(ns, [sys.executable, "-m", "meshlayer", "net", "qos", "clear", "--dev", dev])
        nss.exec(
            ns, [*tc, "qdisc", "add", "dev", dev, "root", "handle", "2:", "htb", "default", "1"]
        )
        nss.exec(
            ns,
            [
                *tc,
                "class",
                "add",
                "dev",
                dev,
                "parent",
                "2:",
                "classid",
                "2:1",
                "htb",
                "rate",
                RATE,
                "ceil",
                RATE,
            ],
        )
        nss.exec(ns, [*tc, "qdisc", "add", "dev", dev, "parent", "2:1", "handle", "21:", "pfifo"])


def remove_fifo(nss: Namespaces) -> None:
    for ns, dev in links(nss):
        nss.exec(ns, ["tc", "qdisc", "del", "dev", dev, "root"])


def describe_tree(nss: Namespaces, notes: str) -> str:
    """What the tree on veth-a actually is: root, leaf kinds, filter count, apply's notes."""
    qdiscs = json.loads(nss.exec(nss.a, ["tc", "-j", "qdisc", "show", "dev", DEV_A]) or "[]")
    root: dict[str, Any] = next((q for q in qdiscs if q.get("root")), {})
    leaves = sorted({str(q.get("kind")) for q in qdiscs if not q.get("root")})
    classes = nss.tc_show("class").count(" leaf ")  # the bands (the inner class has none)
    filters = nss.tc_show("filter")
    u32 = filters.count("flowid")
    basic = filters.count("basic")
    parts = [
        f"{root.get('kind')} {root.get('handle')} {classes} band{'' if classes == 1 else 's'}",
        f"{'/'.join(leaves) or 'no'} leaves",
        f"{u32} u32 DSCP filters" + (f", {basic} basic SO_PRIORITY filters" if basic else ""),
    ]
    kept = [line.removeprefix("note: ") for line in notes.splitlines() if "note:" in line]
    return "; ".join(parts + kept)


def band_bytes(nss: Namespaces, ns: str, dev: str) -> dict[str, int]:
    """Bytes sent per band of ``dev``'s qos tree (by class name); {} without the tree."""
    out = nss.exec(
        ns, [sys.executable, "-m", "meshlayer", "net", "qos", "show", "--dev", dev, "--json"]
    )
    view = json.loads(out[out.index("{") :])
    if not view.get("tree"):
        return {}
    return {str(b["class"]): int(b["sent_bytes"]) for b in view["bands"]}


# ----------------------------------------------------------------------------- config


def mesh_config() -> str:
    """The Service both sidecars read (the server sidecar's own, the client's destination).

    Admission is unlimited on both sides and retries are off: the link is what is
    measured, and one upload is one request on it.
    """
    return (
        "apiVersion: meshlayer/v1\nkind: Service\n"
        f"metadata: {{name: {SERVICE}}}\nspec:\n"
        "  loadBalancer: round-robin\n"
        f'  endpoints:\n    - {{address: "{B_ADDR}:{INBOUND_PORT}", meshed: true}}\n'
        "  timeouts: {request: 60s, idle: 60s}\n"
        "  retries: {attempts: 0}\n"
        "  inbound: {concurrency: unlimited}\n"
        "  outbound: {concurrency: unlimited}\n"
    )


# ---------------------------------------------------------------------------- driver


@dataclass
class Stack:
    """The namespaces and the processes of one run."""

    nss: Namespaces
    workdir: Path
    config: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    rt: bool = False
    """Run every process under SCHED_FIFO (see ``--no-rt``)."""

    def start(self, key: str, ns: str, argv: list[str]) -> None:
        self.procs[key] = spawn(ns, key, argv, self.workdir, self.rt)

    def stop(self, key: str) -> None:
        proc = self.procs.pop(key, None)
        if proc is not None:
            proc.stop()

    def stop_all(self) -> None:
        for key in list(self.procs)[::-1]:
            self.stop(key)

    def check_alive(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")


def sidecar_argv(service: str, inbound: str, config: Path, extra: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meshlayer",
        "sidecar",
        "--service",
        service,
        "--app",
        f"127.0.0.1:{APP_PORT}",
        "--inbound",
        inbound,
        "--outbound",
        f"127.0.0.1:{OUTBOUND_PORT}",
        "--admin",
        f"127.0.0.1:{ADMIN_PORT}",
        "--config",
        str(config),
        "--grace",
        "1",
        "--log-level",
        "warning",
        *extra,
    ]


def start_client_sidecar(stack: Stack, priority: str | None) -> None:
    extra = ["--priority", priority] if priority else []
    argv = sidecar_argv("wire-client", f"127.0.0.1:{INBOUND_PORT}", stack.config, extra)
    stack.start("sidecar-client", stack.nss.a, argv)


def start_server_sidecar(stack: Stack, priority: str | None) -> None:
    extra = ["--priority", priority] if priority else []
    argv = sidecar_argv(SERVICE, f"{B_ADDR}:{INBOUND_PORT}", stack.config, extra)
    stack.start("sidecar-server", stack.nss.b, argv)


def start_stack(stack: Stack, direct: bool) -> None:
    nss = stack.nss
    stats = stack.workdir / "app-stats.txt"
    stack.start(
        "app",
        nss.b,
        [sys.executable, str(HERE), "app", "--port", str(APP_PORT), "--stats", str(stats)]
        + (["--mark"] if direct else []),
    )
    if direct:
        return
    start_server_sidecar(stack, None)
    start_client_sidecar(stack, None)


def run_phase(stack: Stack, args: argparse.Namespace, bulk: int, down: int) -> dict[str, Any]:
    """One worker run in ns a; returns its JSON plus the app's bulk (upload) goodput."""
    out = stack.workdir / f"worker-{time.monotonic_ns()}.json"
    argv = [
        sys.executable,
        str(HERE),
        "load",
        "--bulk",
        str(bulk),
        "--down",
        str(down),
        "--rate",
        str(args.wire_critical_rate),
        "--warmup",
        str(args.wire_warmup),
        "--duration",
        str(args.wire_duration),
        "--out",
        str(out),
    ]
    if args.wire_direct:
        argv.append("--direct")
    ticks = {k: cpu_ticks(p.popen.pid) for k, p in stack.procs.items()}
    started = time.monotonic()
    worker = spawn(stack.nss.a, "worker", argv, stack.workdir, stack.rt)
    limit = args.wire_warmup + args.wire_duration + CALL_TIMEOUT + 30
    try:
        worker.popen.wait(limit)
    except subprocess.TimeoutExpired:
        worker.stop(1)
        raise RuntimeError(
            f"load worker did not finish within {limit:.0f} s:\n{worker.tail()}"
        ) from None
    finally:
        worker.stop(1)
    if worker.popen.returncode != 0 or not out.exists():
        stack.check_alive()
        raise RuntimeError(f"load worker failed ({worker.popen.returncode}):\n{worker.tail()}")
    wall = time.monotonic() - started
    result: dict[str, Any] = json.loads(out.read_text())
    result["cpu"] = {
        k: 100 * (cpu_ticks(p.popen.pid) - ticks.get(k, 0)) / CLK_TCK / wall
        for k, p in stack.procs.items()
    }
    result["cpu"]["worker"] = result.pop("worker_cpu")
    t0, t1 = result["t0"], result["t1"]
    got = None
    deadline = time.monotonic() + 2.0  # the app writes a sample every 50 ms: wait for one past t1
    while got is None and time.monotonic() < deadline:
        got = app_bytes_between(stack.workdir / "app-stats.txt", t0, t1)
        if got is None:
            time.sleep(0.05)
    result["bulk_bps"] = None if got is None else got * 8 / (t1 - t0)
    result["down_bps"] = result["down_bytes"] * 8 / result["down_seconds"]
    return result


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (0 when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def app_bytes_between(stats: Path, t0: float, t1: float) -> float | None:
    """Body bytes the app received between two monotonic times (interpolated)."""
    series: list[tuple[float, int]] = []
    for line in stats.read_text().split("\n")[:-1]:  # the last piece may be half written
        parts = line.split()
        if len(parts) >= 2:
            series.append((float(parts[0]), int(parts[1])))

    def at(t: float) -> float | None:
        for (ta, ba), (tb, bb) in itertools.pairwise(series):
            if ta <= t <= tb:
                return ba + (bb - ba) * ((t - ta) / (tb - ta) if tb > ta else 0.0)
        return None

    a, b = at(t0), at(t1)
    return None if a is None or b is None else b - a


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def make_row(
    phase: str, tree: str, result: dict[str, Any], bands: dict[str, int], bands_down: dict[str, int]
) -> dict[str, Any]:
    lat = result["latencies_ms"]
    bulk = result.get("bulk_bps")
    down = result["down_bps"] if result["down"] else None
    return {
        "phase": phase,
        "qdisc": tree,
        "bulk_flows": result["bulk"],
        "critical_sent": result["sent"],
        "critical_ok": len(lat),
        "critical_failed": result["failed"],
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else None,
        "bulk_mbps": None if bulk is None else bulk / 1e6,
        "bulk_share": None if bulk is None else bulk / RATE_BPS,
        "bulk_uploads": result["uploads"],
        "bulk_errors": result["bulk_errors"],
        "down_flows": result["down"],
        "down_mbps": None if down is None else down / 1e6,
        "down_share": None if down is None else down / RATE_BPS,
        "downloads": result["downloads"],
        "band_bytes": bands,
        "band_bytes_down": bands_down,
        "statuses": result["statuses"],
        "cpu_percent": {k: round(v, 1) for k, v in result["cpu"].items()},
    }


def run_wire_case(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the wire case; one row per phase (see the module docstring).

    ``args`` carries the options of :func:`add_wire_arguments` (missing ones take
    their defaults). Raises RuntimeError when a process or a command fails.
    """
    defaults = vars(add_wire_arguments(argparse.ArgumentParser()).parse_args([]))
    for key, value in defaults.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    if args.wire_quick:
        args.wire_warmup, args.wire_duration = min(args.wire_warmup, 2.0), 6.0
    why = wire_unavailable()
    if why:
        raise RuntimeError(f"the wire case {why}")
    phases = [p.strip() for p in args.wire_phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise RuntimeError(f"unknown wire phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    if "loaded/qos/prio-off" in phases and args.wire_direct:
        log("wire: skipping loaded/qos/prio-off (--direct: no sidecars)")
        phases.remove("loaded/qos/prio-off")
    phases.sort(key=PHASES.index)

    rows: list[dict[str, Any]] = []
    nss = Namespaces()
    workdir = Path(tempfile.mkdtemp(prefix="meshlayer-wire-"))
    rt = args.wire_rt and shutil.which("chrt") is not None
    stack = Stack(nss, workdir, workdir / "mesh.yaml", rt=rt)
    prev = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    affinity = os.sched_getaffinity(0)
    # The link is the bottleneck here, not a CPU: the processes may use every CPU (a
    # caller such as bench/priority.py may have pinned itself, and children inherit it).
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    try:
        stack.config.write_text(mesh_config())
        nss.create()
        start_stack(stack, args.wire_direct)
        path = "direct (no sidecars)" if args.wire_direct else "through the sidecars"
        sched = "SCHED_FIFO" if rt else "normal scheduling"
        log(f"wire: namespaces {nss.a}/{nss.b}, {path}, {sched}, work dir {workdir}")
        current = ""
        tree = ""
        for phase in phases:
            want = "fifo" if phase.endswith("fifo") else "qos"
            if want != current:
                if current == "fifo":
                    remove_fifo(nss)
                if want == "qos":
                    tree = describe_tree(nss, apply_qos(nss))
                else:
                    apply_fifo(nss)
                    tree = describe_tree(nss, "") + " (one FIFO band, no filters)"
                current = want
            if phase.endswith("prio-off"):
                stack.stop("sidecar-client")
                stack.stop("sidecar-server")
                start_server_sidecar(stack, "off")
                start_client_sidecar(stack, "off")
            loaded = phase.startswith("loaded")
            bulk = args.wire_flows if loaded else 0
            down = args.wire_down_flows if loaded else 0
            log(f"wire: {phase} ({bulk}+{down} bulk flows, {args.wire_duration:g} s) ...")
            before = [band_bytes(nss, *link) for link in links(nss)]
            result = run_phase(stack, args, bulk, down)
            after = [band_bytes(nss, *link) for link in links(nss)]
            moved = [{k: a[k] - b.get(k, 0) for k in a} for a, b in zip(after, before, strict=True)]
            row = make_row(phase, tree, result, *moved)
            rows.append(row)
            log("  " + _row_line(row))
            stack.check_alive()
    except Exception:
        for proc in stack.procs.values():
            log(f"--- {proc.name} log tail ---\n{proc.tail()}")
        raise
    finally:
        stack.stop_all()
        nss.remove()
        signal.signal(signal.SIGTERM, prev)
        os.sched_setaffinity(0, affinity)
        if args.wire_keep_tmp:
            log(f"wire: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _exit_on_sigterm(*_: object) -> None:
    sys.exit(143)  # runs the finally blocks: processes stopped, namespaces removed


def _row_line(row: dict[str, Any]) -> str:
    return (
        f"critical p50 {_ms(row['p50_ms'])} p99 {_ms(row['p99_ms'])} ms "
        f"({row['critical_ok']}/{row['critical_sent']} ok), up {_mbps(row)}, "
        f"down {_mbps(row, 'down')}; CPU % "
        + " ".join(f"{k} {v:.0f}" for k, v in row["cpu_percent"].items())
    )


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _mbps(row: dict[str, Any], way: str = "bulk") -> str:
    if not row.get(f"{way}_flows") or row.get(f"{way}_mbps") is None:
        return "—"
    return f"{row[f'{way}_mbps']:.2f} Mbit/s ({row[f'{way}_share'] * 100:.1f} %)"


# ---------------------------------------------------------------------------- report


def wire_checks(rows: Sequence[dict[str, Any]]) -> list[tuple[bool | None, str]]:
    """The issue's targets as (verdict, text); None: the phases needed were not run."""
    by = {r["phase"]: r for r in rows}
    out: list[tuple[bool | None, str]] = []
    base, loaded, fifo = by.get("unloaded/qos"), by.get("loaded/qos"), by.get("loaded/fifo")
    if base and loaded and base["p99_ms"] is not None and loaded["p99_ms"] is not None:
        limit = base["p99_ms"] + TARGET_ADDED_P99_MS
        ok = loaded["p99_ms"] <= limit and loaded["critical_failed"] == 0
        out.append(
            (
                ok,
                f"qos: critical p99 loaded {loaded['p99_ms']:.2f} ms <= unloaded "
                f"{base['p99_ms']:.2f} + {TARGET_ADDED_P99_MS:g} ms "
                f"(failed calls: {loaded['critical_failed']})",
            )
        )
    else:
        out.append((None, "qos: critical p99 target needs unloaded/qos and loaded/qos"))
    for way, name in (("bulk", "upload"), ("down", "download")):
        if loaded and loaded.get(f"{way}_share") is not None:
            share = loaded[f"{way}_share"]
            out.append(
                (
                    share >= TARGET_BULK_SHARE,
                    f"qos: bulk {name} goodput {loaded[f'{way}_mbps']:.2f} Mbit/s = "
                    f"{share * 100:.1f} % of {RATE} >= {TARGET_BULK_SHARE * 100:.0f} %",
                )
            )
        else:
            out.append((None, f"qos: bulk {name} throughput target needs loaded/qos"))
    if base and fifo and base["p99_ms"] and fifo["p99_ms"] is not None:
        growth = fifo["p99_ms"] / base["p99_ms"]
        ok = growth >= TARGET_FIFO_GROWTH
        out.append(
            (
                ok,
                f"fifo: critical p99 loaded {fifo['p99_ms']:.1f} ms = {growth:.0f}x "
                f"the unloaded p99 with qos (>= {TARGET_FIFO_GROWTH:g}x)",
            )
        )
    else:
        out.append((None, "fifo: growth target needs unloaded/qos and loaded/fifo"))
    return out


HEADERS = (
    "phase",
    "bulk up+down",
    "critical ok/sent",
    "p50 ms",
    "p99 ms",
    "max ms",
    "up Mbit/s",
    "down Mbit/s",
    "up bytes by band (crit/def/batch)",
    "down bytes by band",
)


def _by_band(bands: dict[str, int]) -> str:
    if not bands:
        return "—"
    return "/".join(_size(bands.get(k, 0)) for k in ("critical", "default", "batch"))


def _rate_cell(row: dict[str, Any], way: str) -> str:
    if not row.get(f"{way}_flows") or row.get(f"{way}_mbps") is None:
        return "—"
    return f"{row[f'{way}_mbps']:.2f} ({row[f'{way}_share'] * 100:.1f} %)"


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        row["phase"],
        f"{row['bulk_flows']}+{row.get('down_flows', 0)}",
        f"{row['critical_ok']}/{row['critical_sent']}",
        _ms(row["p50_ms"]),
        _ms(row["p99_ms"]),
        _ms(row["max_ms"]),
        _rate_cell(row, "bulk"),
        _rate_cell(row, "down"),
        _by_band(row["band_bytes"]),
        _by_band(row.get("band_bytes_down", {})),
    ]


def _size(n: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def wire_report(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The table, the trees used and the PASS/FAIL lines."""
    cells = [_cells(r) for r in rows]
    lines: list[str] = []
    if markdown:
        lines.append("| " + " | ".join(HEADERS) + " |")
        lines.append("|" + "---|" * len(HEADERS))
        lines += ["| " + " | ".join(c) + " |" for c in cells]
    else:
        widths = [max(len(x) for x in col) for col in zip(HEADERS, *cells, strict=False)]
        for line in (HEADERS, *cells):
            lines.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    trees = dict.fromkeys(r["qdisc"] for r in rows)
    lines.append("")
    lines += [f"tree: {t}" for t in trees]
    lines.append("")
    for ok, text in wire_checks(rows):
        lines.append(f"{'info' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")
    return "\n".join(lines)


def add_wire_arguments(
    p: argparse.ArgumentParser, prefix: str = "--wire-"
) -> argparse.ArgumentParser:
    """The wire case's options (``prefix``: ``--wire-`` in bench/priority.py, ``--`` here)."""
    p.add_argument(
        f"{prefix}duration",
        dest="wire_duration",
        type=float,
        default=20.0,
        help="measured seconds per phase (default: %(default)s)",
    )
    p.add_argument(
        f"{prefix}warmup",
        dest="wire_warmup",
        type=float,
        default=3.0,
        help="seconds of load before measuring (default: %(default)s)",
    )
    p.add_argument(
        f"{prefix}flows",
        dest="wire_flows",
        type=int,
        default=4,
        help="bulk batch-class upload flows (default: %(default)s)",
    )
    p.add_argument(
        f"{prefix}down-flows",
        dest="wire_down_flows",
        type=int,
        default=4,
        help="bulk batch-class download flows (default: %(default)s)",
    )
    p.add_argument(
        f"{prefix}critical-rate",
        dest="wire_critical_rate",
        type=float,
        default=50.0,
        help="critical calls per second, Poisson (default: %(default)s)",
    )
    p.add_argument(
        f"{prefix}phases",
        dest="wire_phases",
        default=",".join(PHASES),
        help="comma-separated subset of %(default)s",
    )
    p.add_argument(
        f"{prefix}direct",
        dest="wire_direct",
        action="store_true",
        help="no sidecars: the worker marks its own sockets",
    )
    p.add_argument(
        f"{prefix}no-rt",
        dest="wire_rt",
        action="store_false",
        help="run the processes under the normal scheduler, not SCHED_FIFO (chrt): "
        "then other load on the machine shows in the tails",
    )
    p.add_argument(
        f"{prefix}quick",
        dest="wire_quick",
        action="store_true",
        help="6 s phases with a 2 s warm-up",
    )
    p.add_argument(
        f"{prefix}keep-tmp",
        dest="wire_keep_tmp",
        action="store_true",
        help="keep the work dir (configs, logs, app stats)",
    )
    return p


# ------------------------------------------------------------------ app (runs in ns b)


def app_main(argv: Sequence[str]) -> int:
    """A tiny HTTP/1.1 server: counts request body bytes, answers small (``/download``:
    1 MiB); stats to a file. ``--mark``: marks each accepted socket with its requests'
    class, as a sidecar does (for ``--direct``)."""
    import httptools

    from meshlayer.config.model import DEFAULT_PRIORITY_CLASSES
    from meshlayer.proxy.netmarks import remark

    p = argparse.ArgumentParser(prog="priority_wire.py app")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--mark", action="store_true")
    a = p.parse_args(argv)
    classes = {c.name.encode(): c for c in DEFAULT_PRIORITY_CLASSES}
    total = [0]
    download = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (
        DOWNLOAD_BYTES,
        b"d" * DOWNLOAD_BYTES,
    )
    ok_small = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"
    ok_critical = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (
        len(CRITICAL_BODY),
        CRITICAL_BODY,
    )

    class App(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.transport: asyncio.Transport | None = None
            self.url = b""
            self.cls = b""
            self.marked: Any = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                if self.transport is not None:
                    self.transport.close()

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() == b"x-meshlayer-priority":
                self.cls = value

        def on_body(self, body: bytes) -> None:
            total[0] += len(body)

        def on_message_complete(self) -> None:
            if self.transport is None:
                return
            marks = classes.get(self.cls)
            if a.mark and marks is not None and marks is not self.marked:
                sock = self.transport.get_extra_info("socket")
                if sock is not None:
                    remark(sock, self.marked, marks)
                self.marked = marks
            if self.url.startswith(b"/upload"):
                self.transport.write(ok_small)
            elif self.url.startswith(b"/download"):
                self.transport.write(download)
            else:
                self.transport.write(ok_critical)
            if not self.parser.should_keep_alive():
                self.transport.close()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(App, "0.0.0.0", a.port, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        with open(a.stats, "a", buffering=1) as fh:
            while not stop.is_set():
                fh.write(f"{time.monotonic():.4f} {total[0]}\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.05)
        server.close()

    _loop_run(serve())
    return 0


def _loop_run(coro: Any) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


# ---------------------------------------------------------- load worker (runs in ns a)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, int]:
    """Read a response head with a Content-Length; returns (status, length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(lines[0].split()[1]), length


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response (Content-Length or chunked); returns the status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


@dataclass
class Worker:
    """Bulk uploads and open-loop critical calls against one target."""

    host: str
    port: int
    direct: bool
    sent: int = 0
    failed: int = 0
    uploads: int = 0
    downloads: int = 0
    down_bytes: int = 0
    """Download body bytes received inside the measured window (``t0``..``t1``)."""
    t0: float = 0.0
    t1: float = 0.0
    bulk_errors: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    open_conns: int = 0

    async def connect(self, cls: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if not self.direct:
            return await asyncio.open_connection(self.host, self.port)
        import socket

        from meshlayer.config.model import DEFAULT_PRIORITY_CLASSES
        from meshlayer.proxy.netmarks import marked_socket

        marks = {c.name: c for c in DEFAULT_PRIORITY_CLASSES}[cls]
        sock = marked_socket(socket.AF_INET, marks)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    def head(self, method: str, path: str, cls: str, length: int | None) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {SERVICE}", f"x-meshlayer-priority: {cls}"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def _bulk_loop(
        self,
        stop: asyncio.Event,
        one: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[int]],
    ) -> None:
        """Batch-class requests by ``one`` (its status) on one keep-alive connection
        after another until ``stop``; a non-200 or a broken connection counts as a bulk
        error and pauses a little."""
        while not stop.is_set():
            writer = None
            try:
                reader, writer = await self.connect("batch")
                while not stop.is_set():
                    if await one(reader, writer) != 200:
                        self.bulk_errors += 1
                        await asyncio.sleep(0.05)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                self.bulk_errors += 1
                await asyncio.sleep(0.1)
            finally:
                if writer is not None:
                    writer.close()

    async def bulk(self, stop: asyncio.Event) -> None:
        head = self.head("POST", "/upload", "batch", UPLOAD_BYTES)
        chunk = b"b" * CHUNK

        async def upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
            writer.write(head)
            left = UPLOAD_BYTES
            while left > 0:
                piece = chunk if left >= CHUNK else chunk[:left]
                writer.write(piece)
                left -= len(piece)
                await writer.drain()
            status = await read_response(reader)
            self.uploads += 1
            return status

        await self._bulk_loop(stop, upload)

    async def download(self, stop: asyncio.Event) -> None:
        head = self.head("GET", "/download", "batch", None)

        async def download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
            writer.write(head)
            status, left = await read_head(reader)
            while left > 0:
                piece = await reader.read(min(left, CHUNK))
                if not piece:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(piece)
                now = time.monotonic()
                if self.t0 <= now <= self.t1:
                    self.down_bytes += len(piece)
            self.downloads += 1
            return status

        await self._bulk_loop(stop, download)

    async def call(self, intended: float, record: bool) -> None:
        conn = None
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                if self.idle:
                    conn = self.idle.pop()
                elif self.open_conns < MAX_CRITICAL_CONNS:
                    self.open_conns += 1
                    try:
                        conn = await self.connect("critical")
                    except BaseException:
                        self.open_conns -= 1
                        raise
                else:
                    while not self.idle:
                        await asyncio.sleep(0.001)
                    conn = self.idle.pop()
                conn[1].write(self.head("GET", "/critical", "critical", None))
                status = await read_response(conn[0])
            done = time.monotonic()
            self.idle.append(conn)
            conn = None
            if record:
                self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
                if status == 200:
                    self.latencies.append((done - intended) * 1000)
                else:
                    self.failed += 1
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
            if record:
                self.failed += 1
                key = type(exc).__name__
                self.statuses[key] = self.statuses.get(key, 0) + 1
        finally:
            if conn is not None:
                conn[1].close()
                self.open_conns -= 1

    async def ready(self, limit: float = 20.0) -> None:
        deadline = time.monotonic() + limit
        last = ""
        while time.monotonic() < deadline:
            try:
                reader, writer = await self.connect("critical")
                try:
                    writer.write(self.head("GET", "/critical", "critical", None))
                    async with asyncio.timeout(2):
                        status = await read_response(reader)
                finally:
                    writer.close()
                if status == 200:
                    return
                last = f"status {status}"
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
        raise RuntimeError(f"no 200 from {self.host}:{self.port} within {limit:g} s: {last}")


async def load_run(a: argparse.Namespace) -> dict[str, Any]:
    host, port = (B_ADDR, APP_PORT) if a.direct else ("127.0.0.1", OUTBOUND_PORT)
    w = Worker(host, port, a.direct)
    await w.ready()
    stop = asyncio.Event()
    start = time.monotonic()
    t0 = w.t0 = start + a.warmup
    t1 = w.t1 = t0 + a.duration
    bulk = [asyncio.create_task(w.bulk(stop)) for _ in range(a.bulk)]
    bulk += [asyncio.create_task(w.download(stop)) for _ in range(a.down)]
    rng = random.Random(a.seed)
    calls: set[asyncio.Task[None]] = set()
    intended = start
    cpu0 = 0.0
    while True:
        if cpu0 == 0.0 and time.monotonic() >= t0:
            cpu0 = time.process_time()
        intended += rng.expovariate(a.rate)
        if intended >= t1:
            break
        delay = intended - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        record = intended >= t0
        w.sent += record
        task = asyncio.create_task(w.call(intended, record))
        calls.add(task)
        task.add_done_callback(calls.discard)
    await asyncio.sleep(max(0.0, t1 - time.monotonic()))
    t_end = time.monotonic()
    cpu = 100 * (time.process_time() - cpu0) / (t_end - t0)
    if calls:
        await asyncio.wait(calls, timeout=CALL_TIMEOUT + 1)
    stop.set()
    for task in bulk:
        task.cancel()
    await asyncio.gather(*bulk, return_exceptions=True)
    return {
        "t0": t0,
        "t1": t_end,
        "bulk": a.bulk,
        "sent": w.sent,
        "failed": w.failed,
        "latencies_ms": w.latencies,
        "statuses": w.statuses,
        "uploads": w.uploads,
        "down": a.down,
        "downloads": w.downloads,
        "down_bytes": w.down_bytes,
        "down_seconds": t1 - t0,
        "bulk_errors": w.bulk_errors,
        "worker_cpu": cpu,
    }


def load_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="priority_wire.py load")
    p.add_argument("--bulk", type=int, default=4)
    p.add_argument("--down", type=int, default=4)
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--direct", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    result: dict[str, Any] = {}

    async def go() -> None:
        result.update(await load_run(a))

    _loop_run(go())
    Path(a.out).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    internal: dict[str, Callable[[Sequence[str]], int]] = {"app": app_main, "load": load_main}
    if argv and argv[0] in internal:
        return internal[argv[0]](argv[1:])
    p = argparse.ArgumentParser(
        description="The wire case of the priority benchmark: DSCP marks and the qos tree "
        "on a 20 Mbit/s veth between two network namespaces (see the module docstring).",
    )
    add_wire_arguments(p, prefix="--")
    p.add_argument("--json", metavar="FILE", help="write the rows here")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = p.parse_args(argv)
    rows = run_wire_case(args)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\nwire case — {when}, {platform.release()}, {args.wire_flows} upload + "
        f"{args.wire_down_flows} download bulk flows, "
        f"critical {args.wire_critical_rate:g}/s, {args.wire_duration:g} s per phase"
        + (", direct (no sidecars)" if args.wire_direct else ", through the sidecars")
        + (", SCHED_FIFO" if args.wire_rt else "")
    )
    print(wire_report(rows))
    if args.markdown:
        print()
        print(wire_report(rows, markdown=True))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"when": when, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
