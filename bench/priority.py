#!/usr/bin/env python3
"""Request prioritization past saturation: meshlayer with priority, meshlayer FIFO, nginx.

The proof of issue 5 as a benchmark (not a timed test).  What runs, per mode::

    prioload ──► client-side proxy ──► server-side proxy ──► app (the bottleneck)
    (CPU 1)      (CPU 0)                (CPU 0)               (CPU 0)

* ``priority`` -- two meshlayer sidecars (``--priority on``): the client's outbound
  listener with its admission to the app's service (``spec.outbound.concurrency:
  adaptive``, ``--outbound-concurrency``; the default is ``unlimited``), and the app's
  inbound listener with its admission queue (``spec.inbound.concurrency`` at its
  default, ``adaptive``).  Admission at the caller sheds what the destination cannot
  take before it crosses to the destination's sidecar, whose CPU is the app's (DAGOR's
  collaborative admission, by each caller's own measure); the inbound side still
  guards the app from callers that do not;
* ``fifo``     -- the same two sidecars with ``--priority off`` (one class, one queue);
* ``nginx``    -- nginx as both proxies (1 worker each, upstream keep-alive): FIFO.

The app (bench/prio_app.py ``--role leaf``) burns a fixed amount of CPU per request
(``--cost-ms``, on the thread's CPU clock) with ONE worker in arrival order, so its
capacity is well defined; it is naive on purpose (a request whose client left is
still worked on).  Services and proxies are pinned to CPU 0, the load generator and
this driver to CPU 1.

Other work on a shared machine: the proxies and the load generator run under
SCHED_FIFO (``--rt``; they block on I/O and never spin, and the kernel's RT
throttling keeps 5 % for the rest), the apps at nice -20 (``--nice``; an app that
spins must not be real-time, it would starve its own proxies) set on the app's
session, which is what counts under the kernel's autogroup scheduling.  Before each
run the driver waits (bounded, ``--quiet-wait``) for CPU 0 to go idle.  The table
shows "CPU0 other%" (CPU 0 busy outside this benchmark's processes: that includes
the loopback network's softirq work, and other work filling CPU 0's idle gaps),
"app starved%" (how long the bottleneck app waited for CPU 0 beyond the time our
own proxies ran: other work taking the app's CPU) and "CPU1 wait%" (the load
generator waiting for CPU 1).  A run whose app was starved more than 5 % is redone
once (``--retries``).  Sidecars run with retries off (``retries: {attempts: 0}``):
one client request is at most one app request in every mode.

The load (bench/prioload.c, compiled here with gcc): open-loop Poisson arrivals,
20 % ``x-meshlayer-priority: critical`` and 80 % ``batch``, up to ``--conns``
keep-alive connections, latency from each request's INTENDED send time (no
coordinated omission), a client timeout (``--timeout``; the client gives up, closes
the connection and opens another), bounded in duration and count, one record per
request.  Success = a 2xx answer within the timeout.  Latency percentiles are over
successful requests; failures show in the success column (shed = 503 with
``x-meshlayer-error: shed`` is not told apart from other 503s here: any non-2xx,
timeout or broken connection is a failure).

Method:

1. **Capacity C**: first the saturated service rate mu through the meshlayer FIFO
   path (8 requests kept in flight for a few seconds: completions/s), then
   open-loop probes at 0.95, 0.9, ... x mu; C is the first rate whose run
   succeeds >= 99.5 % with p99 <= ``--c-bound-ms``.  (``--capacity N`` skips this.)
2. **Main table**: for each load 0.5, 1, 1.5, 2, 3 x C, every mode in turn
   (interleaved, each on freshly started processes, with a short warm-up at
   0.5 x C that is not recorded): per class success %, p50/p99, and goodput
   (successful requests/s, both classes) against C.
3. **Targets at 2 x C** (PASS/FAIL, evaluated for every mode, meant for
   ``priority``): critical success >= 99.5 %; critical p99 <= 2 x its p99 at
   0.5 x C; goodput >= 90 % of C.
4. **Call-graph case**: client -> A -> B twice per request (A: bench/prio_app.py
   ``--role caller``, forwarding the class with meshlayer.propagation; B the same
   leaf as above), each service with its sidecar (nginx: one nginx per sidecar).
   C_graph is measured like C (with twice the p99 bound: two calls per request);
   then 0.25 x C_graph ("unloaded") and 2 x C_graph
   (B offered twice its capacity).  Targets: end-to-end critical p99 at 2x <=
   2.5 x unloaded; and the **wasted share**: B records the parent request id of
   every call it served, the client knows which parents failed; the share of B's
   work spent on calls whose parent failed is printed.
5. ``--wire``: the wire case (bench/priority_wire.py, namespaces, needs root).

A plot of per-class p50/p99 against load for the three modes goes to
``bench/out/priority.png`` (matplotlib is pip-installed into the running
interpreter's environment when missing; ``--no-plot`` skips it), raw results to
``bench/out/priority.json``.  nginx and gcc are installed from Debian when
missing.  Every process is started here and stopped by its PID (process group).

Run (from the repository root)::

    .venv/bin/python bench/priority.py            # ~7 minutes
    .venv/bin/python bench/priority.py --quick    # ~4 minutes, short runs
    .venv/bin/python bench/priority.py --modes priority,nginx --levels 0.5,2 --no-graph
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overhead import (
    CLK_TCK,
    NGINX_COMMON,
    Proc,
    build_of,
    cpu_ticks,
    free_port,
    install_tools,
    log,
    meshlayer_python,
    process_tree,
    spawn,
    table,
    wait_http_200,
    workdir,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
PRIOLOAD_SRC = HERE / "prioload.c"
APP = HERE / "prio_app.py"

ALL_MODES = ("priority", "fifo", "nginx")
LEVELS = (0.5, 1.0, 1.5, 2.0, 3.0)
CLASSES = ("critical", "batch")
APP_HOST = "app"

# targets (issue 5), evaluated at 2 x C
TARGET_CRIT_SUCCESS = 99.5  # %
TARGET_CRIT_P99_RATIO = 2.0  # x its p99 at 0.5 x C
TARGET_GOODPUT = 0.90  # x C
TARGET_GRAPH_P99_RATIO = 2.5  # x unloaded
CAPACITY_SUCCESS = 99.5  # % a capacity probe must reach
GRAPH_UNLOADED = 0.25  # x C_graph: the "unloaded" load of the call-graph case
RT_PRIORITY = 10  # SCHED_FIFO priority of proxies and load generator with --rt
STARVED_PCT = 5.0  # a run whose app waited this long (% of it) for other work is redone

MESH_SERVICE = """\
apiVersion: meshlayer/v1
kind: Service
metadata: {{name: {name}}}
spec:
  loadBalancer: round-robin
  retries: {{attempts: 0}}
  inbound: {{concurrency: {concurrency}}}
  outbound: {{concurrency: {out_concurrency}}}
  endpoints:
    - {{address: "127.0.0.1:{port}", meshed: true}}
"""

NGINX_SERVER = """\
    upstream {name} {{
        server 127.0.0.1:{upstream};
        keepalive 1024;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


# --------------------------------------------------------------------------- tools


def ensure_tools() -> dict[str, str]:
    """Paths of nginx, gcc and taskset; apt-get install the missing ones."""
    return install_tools({"nginx": "nginx", "gcc": "gcc"}, ("taskset", "nice", "chrt"))


def ensure_matplotlib() -> bool:
    """Import matplotlib, pip-installing it into this interpreter's environment if missing."""
    try:
        import matplotlib
    except ImportError:
        log("installing matplotlib into this environment (pip) ...")
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"]
        if subprocess.run(cmd).returncode != 0:
            log("matplotlib could not be installed: no plot")
            return False
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return False
    return True


def sidecar_has_priority_flag(python: str) -> bool:
    out = subprocess.run(
        [python, "-m", "meshlayer", "sidecar", "--help"], capture_output=True, text=True
    )
    return "--priority" in out.stdout


# ---------------------------------------------------------------------- topology


@dataclass
class Env:
    tools: dict[str, str]
    tmp: Path
    python: str
    prioload: Path
    svc_cpu: int
    load_cpu: int
    cost_ms: float
    conns: int
    timeout: float
    priority_flag: bool
    quiet_wait: float
    nice: int
    rt: bool
    concurrency: str = "adaptive"
    """``spec.inbound.concurrency`` of the meshlayer sidecars (``--inbound-concurrency``)."""
    out_concurrency: str = "adaptive"
    """``spec.outbound.concurrency`` of the services (``--outbound-concurrency``)."""

    def service(self, name: str, port: int) -> str:
        """The ``Service`` document of ``name`` (its sidecar's inbound on ``port``)."""
        return MESH_SERVICE.format(
            name=name, port=port, concurrency=self.concurrency, out_concurrency=self.out_concurrency
        )

    def pin(self, cmd: list[str], cpu: int | None = None, rt: bool = False) -> list[str]:
        """``cmd`` on the services' CPU (or ``cpu``), at the benchmark's nice level, or
        under SCHED_FIFO when ``rt`` (proxies, load generator) and ``--rt`` is on."""
        cpu = self.svc_cpu if cpu is None else cpu
        if rt and self.rt:
            prefix = [self.tools["chrt"], "--fifo", str(RT_PRIORITY)]
        elif self.nice:
            prefix = [self.tools["nice"], "-n", str(self.nice)]
        else:
            prefix = []
        return [*prefix, self.tools["taskset"], "-c", str(cpu), *cmd]


@dataclass
class Stack:
    """The processes of one mode's topology, the port the load goes to, and its Host."""

    mode: str
    port: int
    authority: str
    procs: list[Proc] = field(default_factory=list)
    leaf_port: int = 0
    """The bottleneck app's own port (its /__stats)."""
    leaf_pid: int = 0
    """The bottleneck app's process."""
    admins: dict[str, int] = field(default_factory=dict)
    """Sidecar admin ports by service (meshlayer modes)."""

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop(timeout=3.0)

    def pids(self) -> list[int]:
        return [pid for p in self.procs for pid in process_tree(p.pid)]

    def check(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited ({p.popen.returncode}):\n{p.log_tail()}")


def start_app(env: Env, stack: Stack, name: str, *flags: str) -> int:
    port = free_port()
    cmd = [env.python, str(APP), "--port", str(port), *flags]
    proc = spawn(name, env.pin(cmd), env.tmp)
    stack.procs.append(proc)
    if env.nice:
        renice_autogroup(proc.pid, env.nice)
    return port


def renice_autogroup(pid: int, nice: int) -> None:
    """Give the process's session (its own: ``spawn`` starts one) the nice level ``nice``.

    With the kernel's autogroup scheduling each session is one scheduling group
    and a process's own nice level only counts inside it; against other sessions'
    work it is the group's nice level that counts.
    """
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")


def start_nginx(env: Env, stack: Stack, name: str, routes: Sequence[tuple[int, int]]) -> None:
    """One nginx (1 worker) proxying each (listen port, upstream port) pair."""
    body = "".join(
        NGINX_SERVER.format(name=f"u{i}", port=port, upstream=up)
        for i, (port, up) in enumerate(routes)
    )
    conf = env.tmp / f"{name}.conf"
    conf.write_text(NGINX_COMMON.format(dir=env.tmp, name=name, body=body))
    err = env.tmp / f"{name}.error.log"
    cmd = [env.tools["nginx"], "-p", f"{env.tmp}/", "-e", str(err), "-c", str(conf)]
    stack.procs.append(spawn(name, env.pin(cmd, rt=True), env.tmp))


def start_sidecar(
    env: Env, stack: Stack, mode: str, service: str, config: Path, app: int, inbound: int,
    outbound: int,
) -> None:  # fmt: skip
    admin = free_port()
    cmd = [
        env.python, "-m", "meshlayer", "sidecar",
        "--service", service,
        "--app", f"127.0.0.1:{app}",
        "--inbound", f"127.0.0.1:{inbound}",
        "--outbound", f"127.0.0.1:{outbound}",
        "--admin", f"127.0.0.1:{admin}",
        "--config", str(config),
        "--grace", "0.5",
        "--log-level", "warning",
    ]  # fmt: skip
    if env.priority_flag:
        cmd += ["--priority", "off" if mode == "fifo" else "on"]
    proc = spawn(f"sidecar-{service}-{mode}", env.pin(cmd, rt=True), env.tmp)
    stack.procs.append(proc)
    wait_http_200(proc, admin, "localhost", "/ready")
    stack.admins[service] = admin


def start_chain(env: Env, mode: str) -> Stack:
    """client proxy -> server proxy -> leaf app."""
    stack = Stack(mode, free_port(), APP_HOST)
    try:
        stack.leaf_port = start_app(env, stack, "app", "--role", "leaf", "--cost-ms",
                                    str(env.cost_ms))  # fmt: skip
        stack.leaf_pid = stack.procs[-1].pid
        inbound = free_port()
        if mode == "nginx":
            start_nginx(env, stack, "nginx-server", [(inbound, stack.leaf_port)])
            start_nginx(env, stack, "nginx-client", [(stack.port, inbound)])
        else:
            cfg = env.tmp / f"chain-{mode}.yaml"
            text = env.service(APP_HOST, inbound)
            cfg.write_text(text)
            start_sidecar(env, stack, mode, APP_HOST, cfg, stack.leaf_port, inbound, free_port())
            start_sidecar(env, stack, mode, "client", cfg, 9, free_port(), stack.port)
        wait_http_200(stack.procs[-1], stack.port, APP_HOST)
    except BaseException:
        stack.stop()
        raise
    return stack


def start_graph(env: Env, mode: str) -> Stack:
    """client proxy -> A's proxy -> A -> A's proxy -> B's proxy -> B (twice per request)."""
    stack = Stack(mode, free_port(), "a")
    try:
        b_in, a_in, a_out = free_port(), free_port(), free_port()
        stack.leaf_port = start_app(env, stack, "app-b", "--role", "leaf", "--cost-ms",
                                    str(env.cost_ms))  # fmt: skip
        stack.leaf_pid = stack.procs[-1].pid
        a_port = start_app(env, stack, "app-a", "--role", "caller", "--upstream",
                           f"127.0.0.1:{a_out}", "--authority", "b", "--calls", "2")  # fmt: skip
        if mode == "nginx":
            start_nginx(env, stack, "nginx-b", [(b_in, stack.leaf_port)])
            start_nginx(env, stack, "nginx-a", [(a_in, a_port), (a_out, b_in)])
            start_nginx(env, stack, "nginx-client", [(stack.port, a_in)])
        else:
            cfg = env.tmp / f"graph-{mode}.yaml"
            cfg.write_text(env.service("a", a_in) + "---\n" + env.service("b", b_in))
            start_sidecar(env, stack, mode, "b", cfg, stack.leaf_port, b_in, free_port())
            start_sidecar(env, stack, mode, "a", cfg, a_port, a_in, a_out)
            start_sidecar(env, stack, mode, "client", cfg, 9, free_port(), stack.port)
        wait_http_200(stack.procs[-1], stack.port, "a")
    except BaseException:
        stack.stop()
        raise
    return stack


# ------------------------------------------------------------------------ load


@dataclass
class ClassStats:
    sent: int = 0
    ok: int = 0
    timeouts: int = 0
    connfail: int = 0
    non2xx: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def success(self) -> float | None:
        return 100.0 * self.ok / self.sent if self.sent else None


@dataclass
class Run:
    mode: str
    rate: float
    level: float  # x C
    duration: float
    classes: dict[str, ClassStats]
    goodput: float
    diag: dict[str, Any]
    statuses: list[int] = field(default_factory=list, repr=False)
    """Per request (index = x-bench-id): HTTP status, 0 timeout, -1 broken, -2 none."""


def pctl(sorted_vals: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(-(-q * len(sorted_vals) // 1)) - 1))
    return sorted_vals[k]


def run_load(
    env: Env, stack: Stack, rate: float, duration: float, *, seed: int = 1, conns: int = 0,
    timeout: float = 0.0, drain: float | None = None, ids: bool = False, level: float = 0.0,
) -> Run:  # fmt: skip
    records = env.tmp / "records.txt"
    timeout = timeout or env.timeout
    cmd = [
        str(env.prioload),
        "--port", str(stack.port),
        "--authority", stack.authority,
        "--rate", f"{rate:.3f}",
        "--duration", f"{duration:.3f}",
        "--conns", str(conns or env.conns),
        "--critical", "0.2",
        "--timeout", f"{timeout:.3f}",
        "--seed", str(seed),
        "--records", str(records),
    ]  # fmt: skip
    if drain is not None:
        cmd += ["--drain", f"{drain:.3f}"]
    if ids:
        cmd.append("--ids")
    cmd = env.pin(cmd, env.load_cpu, rt=True)
    limit = duration + (timeout if drain is None else drain) + 30
    if env.quiet_wait > 0:
        idle_busy = wait_quiet(env.svc_cpu, env.quiet_wait)
        if idle_busy >= 10.0:
            log(f"  note: CPU {env.svc_cpu} is {idle_busy:.0f} % busy with other work")
    pids = stack.pids()
    others = [p for p in pids if p != stack.leaf_pid]
    t0, busy0, ours0 = time.monotonic(), cpu_busy_ticks(env.svc_cpu), cpu_ticks(pids)
    oth0, wait0 = cpu_ticks(others), sched_wait_ns(stack.leaf_pid)
    with AdmissionSampler(stack.admins) as sampler:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    wall = time.monotonic() - t0
    busy, ours = cpu_busy_ticks(env.svc_cpu) - busy0, cpu_ticks(pids) - ours0
    oth, wait = cpu_ticks(others) - oth0, sched_wait_ns(stack.leaf_pid) - wait0
    if proc.returncode != 0:
        raise RuntimeError(f"prioload failed ({proc.returncode}): {proc.stderr.strip()}")
    diag: dict[str, Any] = json.loads(proc.stdout)
    diag["svc_cpu_busy_pct"] = 100.0 * busy / CLK_TCK / wall
    diag["svc_cpu_foreign_pct"] = max(0.0, 100.0 * (busy - ours) / CLK_TCK / wall)
    diag["admission"] = sampler.summary()
    # the app waited for its CPU longer than our other processes ran: something else ran
    diag["app_starved_pct"] = max(0.0, 100.0 * (wait / 1e9 - oth / CLK_TCK) / wall)
    lat: dict[str, list[float]] = {c: [] for c in CLASSES}
    stats = {c: ClassStats() for c in CLASSES}
    statuses: list[int] = []
    for line in records.read_text().splitlines():
        k, st, us = line.split()
        cls, status = CLASSES[int(k)], int(st)
        statuses.append(status)
        s = stats[cls]
        s.sent += 1
        if 200 <= status < 300:
            s.ok += 1
            lat[cls].append(int(us) / 1000.0)
        elif status == 0:
            s.timeouts += 1
        elif status < 0:
            s.connfail += 1
        else:
            s.non2xx += 1
    for cls in CLASSES:
        vals = sorted(lat[cls])
        stats[cls].p50_ms, stats[cls].p99_ms = pctl(vals, 0.50), pctl(vals, 0.99)
    goodput = sum(s.ok for s in stats.values()) / duration
    return Run(stack.mode, rate, level, duration, stats, goodput, diag, statuses)


class AdmissionSampler:
    """Reads the sidecars' concurrency limits and shed counters once a second."""

    LINE = re.compile(r"^(meshlayer_concurrency_limit|meshlayer_shed_total)\{([^}]*)\} (\S+)")
    LABEL = re.compile(r'(\w+)="([^"]*)"')

    def __init__(self, admins: dict[str, int]) -> None:
        self.admins = admins
        self.limits: dict[str, list[float]] = {}
        self.shed: dict[str, float] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AdmissionSampler:
        if self.admins:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.admins:
            self.done.set()
            self.thread.join(5)
            self._sample()  # the shed totals at the end

    def _run(self) -> None:
        while not self.done.wait(1.0):
            self._sample()

    def _sample(self) -> None:
        for admin in self.admins.values():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                m = self.LINE.match(line)
                if m is None:
                    continue
                labels = dict(self.LABEL.findall(m.group(2)))
                value = float(m.group(3))
                if m.group(1) == "meshlayer_concurrency_limit":
                    key = f"{labels.get('service', '?')} {labels.get('direction', '?')}"
                    self.limits.setdefault(key, []).append(value)
                else:
                    key = " ".join(labels.get(k, "?") for k in ("direction", "service", "priority"))
                    self.shed[key] = value

    def summary(self) -> dict[str, Any]:
        """Per "service direction": the limit's min/median/max; shed totals by
        direction/class."""
        return {
            "limit": {
                svc: [min(v), statistics.median(v), max(v)] for svc, v in self.limits.items() if v
            },
            "shed": {k: v for k, v in self.shed.items() if v},
        }


def sched_wait_ns(pid: int) -> int:
    """Time ``pid`` has spent runnable but waiting for a CPU (/proc/PID/schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def cpu_busy_ticks(cpu: int) -> int:
    """Non-idle clock ticks of one CPU so far (user, nice, system, irq, softirq, steal)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            f = [int(x) for x in line.split()[1:9]]
            return f[0] + f[1] + f[2] + f[5] + f[6] + f[7]
    return 0


def wait_quiet(cpu: int, limit: float, pct: float = 10.0) -> float:
    """Wait (at most ``limit`` s) until ``cpu`` is busy under ``pct`` % for 0.5 s.

    Called between runs, when this benchmark's own processes are idle, so what
    keeps the CPU busy is other load on the machine.  Returns the last busy %.
    """
    deadline = time.monotonic() + limit
    while True:
        b0, t0 = cpu_busy_ticks(cpu), time.monotonic()
        time.sleep(0.5)
        busy = 100.0 * (cpu_busy_ticks(cpu) - b0) / CLK_TCK / (time.monotonic() - t0)
        if busy < pct or time.monotonic() >= deadline:
            return busy


def saturated_rate(env: Env, stack: Stack, seconds: float) -> float:
    """Completions/s with 8 requests kept in flight (the service rate mu)."""
    run = run_load(env, stack, 20000, seconds, conns=8, timeout=60, drain=0)
    return sum(s.ok for s in run.classes.values()) / seconds


def measure_capacity(
    env: Env, start: Callable[[Env, str], Stack], mode: str, bound_ms: float,
    probe_s: float, what: str,
) -> tuple[float, list[dict[str, Any]]]:  # fmt: skip
    """C: the highest probed rate with >= 99.5 % success and p99 <= bound_ms."""
    probes: list[dict[str, Any]] = []
    with running(start, env, mode) as stack:
        mu = saturated_rate(env, stack, max(2.0, probe_s))
    log(f"{what}: saturated service rate mu = {mu:,.0f} req/s through meshlayer {mode}")
    probes.append({"rate": mu, "kind": "saturated"})
    chosen = 0.0
    for f in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5):
        rate = f * mu
        with running(start, env, mode) as stack:
            run = run_load(env, stack, rate, probe_s, seed=7)
        ok = sum(s.ok for s in run.classes.values())
        sent = sum(s.sent for s in run.classes.values())
        lat = [s.p99_ms for s in run.classes.values() if s.p99_ms is not None]
        p99 = max(lat) if lat else None
        success = 100.0 * ok / sent if sent else 0.0
        good = success >= CAPACITY_SUCCESS and p99 is not None and p99 <= bound_ms
        probes.append({"rate": rate, "fraction": f, "success": success, "p99_ms": p99})
        log(
            f"  probe {f:.2f} x mu = {rate:,.0f}/s: success {success:.2f} %, p99 "
            f"{'—' if p99 is None else f'{p99:.1f}'} ms -> {'ok' if good else 'too much'}"
        )
        if good:
            chosen = rate
            break
    if chosen == 0.0:
        chosen = 0.5 * mu
        log(f"{what}: no probe met the bound; C = 0.5 x mu")
    return chosen, probes


@contextlib.contextmanager
def running(start: Callable[[Env, str], Stack], env: Env, mode: str) -> Iterator[Stack]:
    stack = start(env, mode)
    try:
        yield stack
        stack.check()
    finally:
        stack.stop()


def fetch_json(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


# --------------------------------------------------------------------- report


def admission_note(run: Run) -> str:
    """``; app inbound limit min/median/max ...; shed ... N`` (meshlayer runs)."""
    adm = run.diag.get("admission") or {}
    parts = []
    for key, (lo, med, hi) in adm.get("limit", {}).items():
        parts.append(f"{key} limit {lo:g}/{med:g}/{hi:g}")
    shed = adm.get("shed", {})
    if shed:
        parts.append("shed " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(shed.items())))
    return "; " + "; ".join(parts) if parts else ""


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def main_table(runs: Sequence[Run], capacity: float) -> str:
    rows = []
    for r in runs:
        c, b = r.classes["critical"], r.classes["batch"]
        rows.append(
            [
                f"{r.level:g} x C",
                r.mode,
                f"{r.rate:,.0f}",
                fmt(c.success, 2),
                fmt(c.p50_ms),
                fmt(c.p99_ms),
                fmt(b.success, 2),
                fmt(b.p50_ms),
                fmt(b.p99_ms),
                f"{r.goodput:,.0f}",
                f"{100 * r.goodput / capacity:.0f}%",
                fmt(r.diag.get("svc_cpu_foreign_pct"), 0),
                fmt(r.diag.get("app_starved_pct"), 1),
                fmt(cpu_wait(r.diag), 0),
            ]
        )
    headers = [
        "load", "mode", "offered/s",
        "crit ok %", "crit p50 ms", "crit p99 ms",
        "batch ok %", "batch p50 ms", "batch p99 ms",
        "goodput/s", "vs C", "CPU0 other%", "app starved%", "CPU1 wait%",
    ]  # fmt: skip
    return table(headers, rows)


def cpu_wait(diag: dict[str, Any]) -> float | None:
    """Share of the run the load generator waited for CPU 1 (other load on the machine)."""
    elapsed = float(diag.get("elapsed_s") or 0)
    if elapsed <= 0:
        return None
    return 100.0 * float(diag.get("runqueue_wait_ms", 0)) / (1000.0 * elapsed)


def find(runs: Sequence[Run], mode: str, level: float) -> Run | None:
    for r in runs:
        if r.mode == mode and abs(r.level - level) < 1e-9:
            return r
    return None


def verdict(ok: bool | None) -> str:
    return "info" if ok is None else ("PASS" if ok else "FAIL")


def target_lines(runs: Sequence[Run], capacity: float, modes: Sequence[str]) -> list[str]:
    lines = []
    for mode in modes:
        at2, base = find(runs, mode, 2.0), find(runs, mode, 0.5)
        if at2 is None:
            lines.append(f"info  {mode}: 2 x C not measured")
            continue
        crit = at2.classes["critical"]
        s = crit.success
        lines.append(
            f"{verdict(None if s is None else s >= TARGET_CRIT_SUCCESS)}  {mode}: critical "
            f"success at 2 x C >= {TARGET_CRIT_SUCCESS} %: {fmt(s, 2)} %"
        )
        b99 = base.classes["critical"].p99_ms if base else None
        if b99 is None or crit.p99_ms is None:
            lines.append(f"info  {mode}: critical p99 ratio needs 0.5 x C and 2 x C")
        else:
            ok = crit.p99_ms <= TARGET_CRIT_P99_RATIO * b99
            lines.append(
                f"{verdict(ok)}  {mode}: critical p99 at 2 x C <= {TARGET_CRIT_P99_RATIO:g} x "
                f"its p99 at 0.5 x C: {crit.p99_ms:.1f} ms vs {TARGET_CRIT_P99_RATIO:g} x "
                f"{b99:.1f} ms ({crit.p99_ms / b99:.2f}x)"
            )
        g = at2.goodput / capacity
        lines.append(
            f"{verdict(g >= TARGET_GOODPUT)}  {mode}: goodput at 2 x C >= "
            f"{TARGET_GOODPUT:.0%} of C: {at2.goodput:,.0f}/s = {g:.0%} of {capacity:,.0f}/s"
        )
    return lines


@dataclass
class GraphResult:
    mode: str
    unloaded: Run
    loaded: Run
    b_calls: int
    b_wasted: int
    a_failed: int

    @property
    def wasted_pct(self) -> float | None:
        return 100.0 * self.b_wasted / self.b_calls if self.b_calls else None


def graph_table(results: Sequence[GraphResult], c_graph: float) -> str:
    rows = []
    for g in results:
        u, lo = g.unloaded.classes["critical"], g.loaded.classes["critical"]
        ratio = lo.p99_ms / u.p99_ms if lo.p99_ms and u.p99_ms else None
        rows.append(
            [
                g.mode,
                fmt(u.p99_ms),
                fmt(lo.success, 2),
                fmt(lo.p50_ms),
                fmt(lo.p99_ms),
                "—" if ratio is None else f"{ratio:.2f}x",
                fmt(g.loaded.classes["batch"].success, 2),
                f"{g.loaded.goodput:,.0f}",
                f"{100 * g.loaded.goodput / c_graph:.0f}%",
                f"{g.b_calls:,}",
                fmt(g.wasted_pct, 1),
                fmt(max(g.unloaded.diag["app_starved_pct"], g.loaded.diag["app_starved_pct"]), 1),
            ]
        )
    headers = [
        "mode", "unloaded crit p99 ms", "crit ok %", "crit p50 ms", "crit p99 ms",
        "p99 vs unloaded", "batch ok %", "goodput/s", "vs C_graph", "B calls served",
        "B work wasted %", "app starved%",
    ]  # fmt: skip
    return table(headers, rows)


def graph_lines(results: Sequence[GraphResult]) -> list[str]:
    lines = []
    for g in results:
        u, lo = g.unloaded.classes["critical"].p99_ms, g.loaded.classes["critical"].p99_ms
        if u is None or lo is None:
            lines.append(f"info  {g.mode}: call graph critical p99 not measured")
        else:
            ok = lo <= TARGET_GRAPH_P99_RATIO * u
            lines.append(
                f"{verdict(ok)}  {g.mode}: call graph critical p99 at 2 x C_graph <= "
                f"{TARGET_GRAPH_P99_RATIO:g} x unloaded: {lo:.1f} ms vs "
                f"{TARGET_GRAPH_P99_RATIO:g} x {u:.1f} ms"
            )
        lines.append(
            f"info  {g.mode}: B work on requests whose parent failed: {fmt(g.wasted_pct, 1)} % "
            f"({g.b_wasted:,} of {g.b_calls:,} calls)"
        )
    return lines


def plot(runs: Sequence[Run], modes: Sequence[str], capacity: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    colors = {"priority": "tab:green", "fifo": "tab:orange", "nginx": "tab:blue"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, cls in zip(axes[:2], CLASSES, strict=True):
        for mode in modes:
            rs = sorted((r for r in runs if r.mode == mode), key=lambda r: r.level)
            xs = [r.level for r in rs]
            for q, style in (("p50_ms", "--"), ("p99_ms", "-")):
                ys = [getattr(r.classes[cls], q) for r in rs]
                pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o",
                            color=colors.get(mode), label=f"{mode} {q[:3]}")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel(f"offered load (x C, C = {capacity:,.0f} req/s)")
        ax.set_ylabel("latency of successful requests (ms)")
        ax.set_title(f"{cls}: p50 (dashed), p99 (solid)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    for mode in modes:
        rs = sorted((r for r in runs if r.mode == mode), key=lambda r: r.level)
        for cls, style in (("critical", "-"), ("batch", ":")):
            pts = [(r.level, r.classes[cls].success) for r in rs]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, marker="o", color=colors.get(mode),
                        label=f"{mode} {cls}")  # fmt: skip
    ax.set_xlabel("offered load (x C)")
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 101)
    ax.set_title("success: critical (solid), batch (dotted)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("meshlayer priority vs FIFO vs nginx past saturation (20 % critical, 80 % batch)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Prioritization past saturation: meshlayer priority vs FIFO vs nginx.",
        epilog="The method is described in the module docstring of bench/priority.py.",
    )
    p.add_argument("--quick", action="store_true", help="short runs (about 4 minutes)")
    p.add_argument("--duration", type=float, help="seconds per run (default: 10, quick: 4)")
    p.add_argument("--warmup", type=float, help="warm-up seconds (default: 1, quick: 0.5)")
    p.add_argument("--modes", default=",".join(ALL_MODES), help="subset of %(default)s")
    p.add_argument("--levels", default=",".join(f"{x:g}" for x in LEVELS),
                   help="loads as multiples of C (default: %(default)s)")  # fmt: skip
    p.add_argument("--capacity", type=float, default=0.0, help="C in req/s (skip measuring)")
    p.add_argument("--graph-capacity", type=float, default=0.0,
                   help="C_graph in A-requests/s (skip measuring)")  # fmt: skip
    p.add_argument("--c-bound-ms", type=float, default=50.0,
                   help="p99 bound that defines C (default: %(default)s ms)")  # fmt: skip
    p.add_argument("--probe", type=float, help="seconds per capacity probe (default: 4, quick: 2)")
    p.add_argument("--cost-ms", type=float, default=1.5, help="app CPU per request (default 1.5)")
    p.add_argument(
        "--inbound-concurrency",
        default="adaptive",
        help="spec.inbound.concurrency of the meshlayer sidecars: adaptive (default), N, unlimited",
    )
    p.add_argument(
        "--outbound-concurrency",
        default="adaptive",
        help="spec.outbound.concurrency of the services (admission at the caller's sidecar): "
        "adaptive (default here; meshlayer's own default is unlimited), N, unlimited",
    )
    p.add_argument("--conns", type=int, default=2000, help="client connections (default 2000)")
    p.add_argument("--timeout", type=float, default=1.0, help="client timeout s (default 1)")
    p.add_argument("--no-graph", action="store_true", help="skip the call-graph case")
    p.add_argument("--no-main", action="store_true", help="skip the main table (and C)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--wire", action="store_true", help="also run the wire case (root, netns)")
    p.add_argument("--plot", default=str(OUT / "priority.png"), help="PNG path")
    p.add_argument("--json", default=str(OUT / "priority.json"), help="raw results path")
    p.add_argument("--svc-cpu", type=int, default=0, help="CPU of services and proxies")
    p.add_argument("--load-cpu", type=int, default=1, help="CPU of the load generator")
    p.add_argument("--quiet-wait", type=float, default=3.0,
                   help="before each run, wait up to this many seconds for the services' "
                   "CPU to be idle (other load on the machine; default: %(default)s)")  # fmt: skip
    p.add_argument("--nice", type=int, default=-20,
                   help="nice level of every process started (default: %(default)s, so other "
                   "work on the machine gets little of the pinned CPUs; 0: unchanged)")  # fmt: skip
    p.add_argument("--rt", action=argparse.BooleanOptionalAction, default=True,
                   help="proxies and load generator under SCHED_FIFO (chrt), apps at --nice "
                   "(default: on when root)")  # fmt: skip
    p.add_argument("--retries", type=int, default=1,
                   help=f"runs redone when other work starved the app > {STARVED_PCT:g} %% "
                   "of the time (default: %(default)s; the table shows the last)")  # fmt: skip
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    try:
        from priority_wire import add_wire_arguments

        add_wire_arguments(p)
    except ImportError:
        pass
    args = p.parse_args(argv)
    for name, full, quick in (("duration", 10.0, 4.0), ("warmup", 1.0, 0.5), ("probe", 4.0, 2.0)):
        if getattr(args, name) is None:  # --quick sets only what was not given
            setattr(args, name, quick if args.quick else full)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(ALL_MODES):
        p.error(f"--modes: choose among {', '.join(ALL_MODES)}")
    try:
        args.levels = [float(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        p.error("--levels: comma-separated numbers")
    if not args.levels or min(args.levels) <= 0:
        p.error("--levels: positive multiples of C")
    if args.duration <= 0 or args.cost_ms <= 0 or args.timeout <= 0:
        p.error("--duration, --cost-ms and --timeout must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tools = ensure_tools()
    python = meshlayer_python()
    modes: list[str] = args.modes
    if python is None:
        log("meshlayer is not importable (pip install -e .): nginx only")
        modes = [m for m in modes if m == "nginx"]
        python = sys.executable
    cpus = os.sched_getaffinity(0)
    if not {args.svc_cpu, args.load_cpu} <= cpus or args.svc_cpu == args.load_cpu:
        raise SystemExit(f"need two distinct CPUs among {sorted(cpus)} (--svc-cpu/--load-cpu)")
    os.sched_setaffinity(0, {args.load_cpu})
    if (args.nice < 0 or args.rt) and os.geteuid() != 0:
        log("not root: processes keep the default scheduling (--nice 0 --no-rt)")
        args.nice, args.rt = 0, False
    flag = sidecar_has_priority_flag(python)
    if not flag:
        log("note: this meshlayer sidecar has no --priority flag: 'fifo' runs like 'priority'")
    can_plot = not args.no_plot and ensure_matplotlib()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t_start = time.monotonic()
    prev = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "date": started}
    with workdir(args.keep_tmp) as tmp:
        prioload = tmp / "prioload"
        subprocess.run(
            [tools["gcc"], "-O2", "-Wall", "-o", str(prioload), str(PRIOLOAD_SRC), "-lm"],
            check=True,
        )
        env = Env(tools, tmp, python, prioload, args.svc_cpu, args.load_cpu, args.cost_ms,
                  args.conns, args.timeout, flag, args.quiet_wait, args.nice, args.rt,
                  args.inbound_concurrency, args.outbound_concurrency)  # fmt: skip
        try:
            report = run_all(env, args, modes, results)
        finally:
            signal.signal(signal.SIGTERM, prev)
    elapsed = time.monotonic() - t_start
    print()
    print(
        f"meshlayer priority benchmark — {started}, {elapsed / 60:.1f} min; app {args.cost_ms:g} "
        f"ms CPU/request, concurrency 1; services + proxies on CPU {args.svc_cpu}, load on CPU "
        f"{args.load_cpu}; {args.duration:g} s per run, client timeout {args.timeout:g} s, "
        f"{args.conns} connections; sidecars' concurrency: inbound "
        f"{args.inbound_concurrency}, outbound {args.outbound_concurrency}; "
        f"meshlayer build: {build_of(python)}"
    )
    print(report)
    if can_plot and results.get("main"):
        runs = [Run(**{**r, "classes": {k: ClassStats(**v) for k, v in r["classes"].items()}})
                for r in results["main"]]  # fmt: skip
        plot(runs, modes, results["capacity"], Path(args.plot))
        print(f"\nplot: {args.plot}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"raw results: {args.json}")
    return 0


def run_json(run: Run) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(run).items() if k != "statuses"}


def run_all(env: Env, args: argparse.Namespace, modes: list[str], results: dict[str, Any]) -> str:
    parts: list[str] = []
    c_mode = "fifo" if env.priority_flag else "priority"
    if not args.no_main:
        if args.capacity > 0:
            capacity, probes = args.capacity, list[dict[str, Any]]()
            c_mode = "given (--capacity)"
        else:
            capacity, probes = measure_capacity(
                env, start_chain, c_mode, args.c_bound_ms, args.probe, "C"
            )
        results["capacity"], results["capacity_probes"] = capacity, probes
        log(f"C = {capacity:,.0f} req/s")
        runs: list[Run] = []
        for level in args.levels:
            for mode in modes:
                rate = level * capacity
                log(f"{level:g} x C = {rate:,.0f}/s, {mode} ...")
                run, _ = measured(env, args, start_chain, mode, rate, level, 0.5 * capacity)
                c, b = run.classes["critical"], run.classes["batch"]
                log(
                    f"  critical ok {fmt(c.success, 2)} % p99 {fmt(c.p99_ms)} ms; batch ok "
                    f"{fmt(b.success, 2)} % p99 {fmt(b.p99_ms)} ms; goodput {run.goodput:,.0f}/s"
                    f"{admission_note(run)}"
                )
                runs.append(run)
        results["main"] = [run_json(r) for r in runs]
        parts.append(
            f"C = {capacity:,.0f} req/s (meshlayer {c_mode} path, success >= "
            f"{CAPACITY_SUCCESS} % and p99 <= {args.c_bound_ms:g} ms)"
        )
        parts.append(main_table(runs, capacity))
        lag = max(float(r.diag.get("send_lag_p99_us", 0)) for r in runs) / 1000
        waits = [r for r in runs if r.diag.get("conn_waits")]
        parts.append(f"load generator send lag p99 (worst run): {lag:.2f} ms")
        for r in waits:
            parts.append(
                f"note: {r.level:g} x C {r.mode}: {r.diag['conn_waits']:,} requests found all "
                f"{r.diag['connections']:,} connections busy and waited in the load generator "
                "(their latency still counts from the intended send time)"
            )
        notes = [(r, admission_note(r)) for r in runs]
        if any(n for _, n in notes):
            parts.append("")
            parts.append("Admission in the meshlayer runs (sidecar /metrics, read once a second)")
            parts.extend(f"  {r.level:g} x C {r.mode}:{n.lstrip(';')}" for r, n in notes if n)
        parts.append("")
        parts.append("Targets at 2 x C (issue 5; meant for 'priority', the others for contrast)")
        parts.extend("  " + line for line in target_lines(runs, capacity, modes))
    if not args.no_graph:
        parts.append("")
        parts.extend(run_graph(env, args, modes, results, c_mode))
    if args.wire:
        parts.append("")
        parts.extend(run_wire(args, results))
    return "\n".join(parts)


def measured(
    env: Env, args: argparse.Namespace, start: Callable[[Env, str], Stack], mode: str,
    rate: float, level: float, warm_rate: float, ids: bool = False,
) -> tuple[Run, tuple[list[int], list[int]]]:  # fmt: skip
    """One measurement on fresh processes after a warm-up; redone (``--retries``) when
    other work starved the app.  Also returns the leaf's recorded parent ids before and
    after the run (``ids``: the call-graph case)."""
    parents: tuple[list[int], list[int]] = ([], [])
    for attempt in range(1 + args.retries):
        with running(start, env, mode) as stack:
            if args.warmup > 0:
                run_load(env, stack, warm_rate, args.warmup, seed=99, drain=0.5)
            first = fetch_json(stack.leaf_port, "/__stats")["parents"] if ids else []
            run = run_load(env, stack, rate, args.duration, seed=int(level * 100) + 1,
                           ids=ids, level=level)  # fmt: skip
            if ids:
                time.sleep(0.2)
                parents = (first, fetch_json(stack.leaf_port, "/__stats")["parents"])
        run.diag["attempt"] = attempt + 1
        starved = float(run.diag["app_starved_pct"])
        if starved <= STARVED_PCT:
            break
        log(f"  the app was starved {starved:.1f} % of the run by other work")
    return run, parents


def run_graph(
    env: Env, args: argparse.Namespace, modes: list[str], results: dict[str, Any], c_mode: str
) -> list[str]:
    if args.graph_capacity > 0:
        c_graph, probes = args.graph_capacity, list[dict[str, Any]]()
    else:
        c_graph, probes = measure_capacity(
            env, start_graph, c_mode, 2 * args.c_bound_ms, args.probe, "C_graph"
        )
    results["graph_capacity"], results["graph_probes"] = c_graph, probes
    graph: list[GraphResult] = []
    for mode in modes:
        log(f"call graph, {mode}: {GRAPH_UNLOADED:g} x and 2 x C_graph ({c_graph:,.0f}/s) ...")
        unloaded, _ = measured(env, args, start_graph, mode, GRAPH_UNLOADED * c_graph,
                               GRAPH_UNLOADED, 0.5 * c_graph)  # fmt: skip
        loaded, (first, last) = measured(env, args, start_graph, mode, 2 * c_graph, 2.0,
                                         0.5 * c_graph, ids=True)  # fmt: skip
        before, served = set(first), last
        # the warm-up's calls carry no ids; any parent id seen before the run is not ours
        calls = [p for p in served if p not in before and 0 <= p < len(loaded.statuses)]
        wasted = sum(1 for p in calls if not 200 <= loaded.statuses[p] < 300)
        failed = sum(1 for s in loaded.statuses if not 200 <= s < 300)
        g = GraphResult(mode, unloaded, loaded, len(calls), wasted, failed)
        graph.append(g)
        log(
            f"  critical p99 {fmt(unloaded.classes['critical'].p99_ms)} -> "
            f"{fmt(loaded.classes['critical'].p99_ms)} ms, ok "
            f"{fmt(loaded.classes['critical'].success, 2)} %; B wasted {fmt(g.wasted_pct)} %"
        )
    results["graph"] = [
        {
            "mode": g.mode,
            "unloaded": run_json(g.unloaded),
            "loaded": run_json(g.loaded),
            "b_calls": g.b_calls,
            "b_wasted": g.b_wasted,
            "wasted_pct": g.wasted_pct,
        }
        for g in graph
    ]
    return [
        f"Call graph: client -> A -> B x2 (sequential), C_graph = {c_graph:,.0f} A-requests/s "
        f"(B serves 2 calls per A request); unloaded = {GRAPH_UNLOADED:g} x C_graph, loaded = "
        "2 x C_graph",
        graph_table(graph, c_graph),
        "",
        *("  " + line for line in graph_lines(graph)),
    ]


def run_wire(args: argparse.Namespace, results: dict[str, Any]) -> list[str]:
    try:
        from priority_wire import run_wire_case, wire_report
    except ImportError:
        return ["wire case: bench/priority_wire.py not found"]
    try:
        rows = run_wire_case(args)
    except RuntimeError as exc:
        return [f"wire case not run: {exc}"]
    results["wire"] = rows
    return ["Wire case (bench/priority_wire.py)", wire_report(rows)]


if __name__ == "__main__":
    raise SystemExit(main())
