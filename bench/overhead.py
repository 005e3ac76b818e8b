#!/usr/bin/env python3
"""Proxy overhead benchmark: meshlayer's sidecar side by side with nginx and haproxy.

What is compared, in one run, against the same upstream:

* ``direct``    -- the load generator talks to the upstream itself (the baseline);
* ``meshlayer`` -- through one meshlayer sidecar: its outbound listener, routing by
  ``Host: upstream`` to a ``meshed: false`` endpoint; the build installed (``make``
  compiles the hot path with mypyc; the header says which build ran);
* ``meshlayer-pure`` -- the same sidecar from a copy of the sources without the
  compiled extensions: what plain CPython makes of the same code;
* ``minimal``   -- bench/minimal_forwarder.py: a uvloop + httptools keep-alive
  forwarder with no features, the floor of a Python proxy on this machine (what
  meshlayer costs beyond it is the price of its features);
* ``nginx``     -- nginx as a reverse proxy, 1 worker, upstream keep-alive;
* ``haproxy``   -- haproxy as a reverse proxy, ``nbthread 1``, ``http-reuse always``.

The upstream is a second nginx instance (1 worker) answering every request with a
fixed ``200 ok`` and a Content-Length; it is tiny and fast, so it is not the
bottleneck.  The proxy under test is pinned to CPU 0 (``taskset -c 0``); the
upstream, the load generators and this driver are pinned to CPU 1.

Method, per round and per target (targets are interleaved: round 1 runs direct,
meshlayer, nginx, haproxy; round 2 the same again; ...), each proxy freshly started:

1. start the proxy, wait until a request through it answers 200;
   **idle RSS** = VmRSS of the proxy (nginx: master + worker) before any load;
2. warm up with a short closed-loop wrk run (not recorded);
3. **max req/s**: ``wrk -t1 -c32`` (closed loop) for ``--duration`` seconds.
   **CPU µs/request**: utime+stime of the proxy's processes (from /proc/PID/stat,
   nginx: master + worker) read before and after the wrk run, divided by the
   requests wrk completed.  This is the steadiest figure: it does not depend on
   whether the proxy or CPU 1 (load generator + upstream) saturates first;
4. **latency** at fixed open-loop rates (2,000 and 5,000 requests/s) with
   ``loadgen`` (bench/loadgen.c, compiled here with ``gcc -O2``): request *i* is
   scheduled at t0 + i/rate over 64 keep-alive connections, and its latency is
   measured from that intended send time, so a proxy that stalls shows the stall
   as latency instead of hiding it (no coordinated omission).  p50/p99/p99.9;
   "added p99" is a proxy's p99 minus the direct p99 of the same round.
   "send lag p99" is how late loadgen itself sent (actual minus intended send
   time): when it is large, CPU 1 was busy with something else (on a shared or
   virtualised machine) and that run's tail latencies say little about the proxy;
   "CPU1 wait%" (loadgen's run-queue wait from /proc/self/schedstat) says the same
   directly, and runs above 5% are listed.  "conn waits" counts requests that found
   all 64 connections busy (a stalling proxy);
5. **peak RSS** = VmHWM of the proxy's processes after all the load; then stop.

wrk takes whole seconds, so its duration is ``--duration`` rounded (at least 1 s).
Each figure is reported as the median over the rounds, with [min-max], followed by
ratios against nginx and the informational targets for meshlayer.  Nothing here
fails: the targets print PASS/FAIL as information.

nginx, haproxy and wrk are installed from Debian (``apt-get install -y nginx
haproxy wrk``) when missing.  All configs and logs go to a temporary directory;
the benchmark starts every process itself and stops only those.  Traffic stays on
127.0.0.1.

Run (from the repository root)::

    .venv/bin/python bench/overhead.py            # 3 rounds, 5 s per measurement
    .venv/bin/python bench/overhead.py --quick    # 1 round, short measurements
    .venv/bin/python bench/overhead.py --rounds 5 --json bench/out/overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOADGEN_SRC = HERE / "loadgen.c"

ALL_TARGETS = (
    "direct",
    "meshlayer",
    "meshlayer-pure",
    "minimal",
    "nginx",
    "haproxy",
    "mesh-mtls",
    "nginx-tls",
)
# two proxies and one mTLS hop between them: bench/mtls_targets.py
MTLS_TARGETS = ("mesh-mtls", "nginx-tls")
MINIMAL_FORWARDER = HERE / "minimal_forwarder.py"
SERVICE_HOST = "upstream"  # the Host header: the sidecar routes by it
RATES = (2000, 5000)
WRK_THREADS = 1
WRK_CONNECTIONS = 32
LOADGEN_CONNECTIONS = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

# Targets (informational; printed as PASS/FAIL lines)
TARGET_RPS_RATIO = 0.6  # meshlayer req/s >= 0.6 x nginx
TARGET_ADDED_P99_RATIO = 2.0  # meshlayer added p99 @2k/s <= 2 x nginx's added p99
TARGET_IDLE_RSS_MIB = 40.0  # meshlayer idle RSS < 40 MiB
# loadgen waiting for CPU 1 longer than this share of a run marks the run as contended
CONTENDED_WAIT_PCT = 5.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tools


def find_tool(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (nginx lives there)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


def ensure_tools() -> dict[str, str]:
    """Return paths of nginx, haproxy, wrk, gcc, taskset; apt-get install missing ones."""
    packages = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "gcc": "gcc"}
    return install_tools(packages, ("taskset",))


def install_tools(packages: dict[str, str], present: Sequence[str]) -> dict[str, str]:
    """Paths of the tools in ``packages`` (tool -> Debian package; apt-get installs the
    missing ones when root) and of those in ``present`` (assumed installed)."""
    missing = [pkg for tool, pkg in packages.items() if find_tool(tool) is None]
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(
                f"missing tools {missing}: run `apt-get install -y {' '.join(missing)}`"
            )
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        log(f"installing {' '.join(missing)} from Debian ...")
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=True)
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    tools: dict[str, str] = {}
    for tool in (*packages, *present):
        path = find_tool(tool)
        if path is None:
            raise SystemExit(f"{tool} not found")
        tools[tool] = path
    return tools


def tool_versions(tools: dict[str, str]) -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        out = subprocess.run(cmd, capture_output=True, text=True)
        return (out.stdout + out.stderr).strip().splitlines()[0] if out.stdout or out.stderr else ""

    return {
        "nginx": first_line([tools["nginx"], "-v"]),
        "haproxy": first_line([tools["haproxy"], "-v"]),
        "wrk": first_line([tools["wrk"], "--version"]),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def compile_loadgen(gcc: str, outdir: Path) -> Path:
    binary = outdir / "loadgen"
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(binary), str(LOADGEN_SRC)], check=True)
    return binary


def meshlayer_python() -> str | None:
    """An interpreter that can import meshlayer: this one, or the repo's .venv."""
    if importlib.util.find_spec("meshlayer") is not None:
        return sys.executable
    venv = REPO / ".venv" / "bin" / "python"
    if venv.exists():
        probe = subprocess.run([str(venv), "-c", "import meshlayer"], capture_output=True)
        if probe.returncode == 0:
            return str(venv)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------------- processes


def _read_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # fields after "(comm)"; comm may contain spaces or parentheses
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _read_stat(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            tree.append(pid)
            todo.extend(children.get(pid, []))
    return tree


def process_group(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _read_stat(int(entry))
            if fields is not None and int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def cpu_ticks(pids: Sequence[int]) -> int:
    """utime + stime (clock ticks) summed over ``pids``."""
    total = 0
    for pid in pids:
        fields = _read_stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat
    return total


def status_kib(pids: Sequence[int], key: str) -> int:
    """Sum of a ``/proc/PID/status`` memory field (VmRSS, VmHWM) in KiB."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
        if m:
            total += int(m.group(1))
    return total


@dataclass
class Proc:
    """A process this benchmark started (in its own session/process group)."""

    name: str
    popen: subprocess.Popen[bytes]
    logfile: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tree(self) -> list[int]:
        return process_tree(self.pid) if self.popen.poll() is None else []

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal our process, wait, then SIGKILL its process group (ours) if needed."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(5)
        # stragglers (e.g. nginx workers) are in the process group we created
        # with start_new_session, whose id is our child's pid
        for pid in process_group(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def spawn(name: str, cmd: list[str], workdir: Path) -> Proc:
    logfile = workdir / f"{name}.log"
    with logfile.open("wb") as out:
        popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    return Proc(name, popen, logfile)


def http_get(port: int, host: str, path: str = "/", timeout: float = 1.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def wait_http_200(
    proc: Proc | None, port: int, host: str, path: str = "/", limit: float = 20.0
) -> None:
    deadline = time.monotonic() + limit
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
        try:
            status = http_get(port, host, path)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    tail = proc.log_tail() if proc else ""
    raise RuntimeError(f"127.0.0.1:{port}{path} not ready: {last}\n{tail}")


# ------------------------------------------------------------------------ configs

NGINX_COMMON = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}.body;
    proxy_temp_path {dir}/{name}.proxy;
    fastcgi_temp_path {dir}/{name}.fastcgi;
    uwsgi_temp_path {dir}/{name}.uwsgi;
    scgi_temp_path {dir}/{name}.scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
{body}
}}
"""

NGINX_UPSTREAM_BODY = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type text/plain;
        location / {{ return 200 "ok\\n"; }}
    }}
"""

NGINX_PROXY_BODY = """\
    upstream app {{
        server 127.0.0.1:{upstream};
        keepalive 128;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s

frontend fe
    bind 127.0.0.1:{port}
    default_backend app

backend app
    server up 127.0.0.1:{upstream}
"""

MESHLAYER_CFG = """\
apiVersion: meshlayer/v1
kind: Service
metadata: {{name: {service}}}
spec:
  loadBalancer: round-robin
  endpoints:
    - {{address: "127.0.0.1:{upstream}", meshed: false}}
"""


# ------------------------------------------------------------------------- targets


@dataclass
class Running:
    """A target ready to take load: the port to send to and the process (if any)."""

    name: str
    port: int
    proc: Proc | None
    extra: list[Proc] = field(default_factory=list)
    """More proxies of the target (the second hop): measured with ``proc``."""
    aux: list[Proc] = field(default_factory=list)
    """Helpers (a control plane): stopped with the target, not measured."""


@dataclass
class Env:
    tools: dict[str, str]
    workdir: Path
    loadgen: Path
    upstream_port: int
    proxy_cpu: int
    load_cpu: int
    python: str | None

    def pin(self, cpu: int, cmd: list[str]) -> list[str]:
        return [self.tools["taskset"], "-c", str(cpu), *cmd]


def start_nginx(env: Env, name: str, body: str, cpu: int) -> Proc:
    conf = env.workdir / f"{name}.conf"
    conf.write_text(NGINX_COMMON.format(dir=env.workdir, name=name, body=body))
    err = env.workdir / f"{name}.error.log"
    cmd = [env.tools["nginx"], "-p", f"{env.workdir}/", "-e", str(err), "-c", str(conf)]
    return spawn(name, env.pin(cpu, cmd), env.workdir)


def start_upstream(env: Env) -> Proc:
    body = NGINX_UPSTREAM_BODY.format(port=env.upstream_port)
    proc = start_nginx(env, "upstream", body, env.load_cpu)
    wait_http_200(proc, env.upstream_port, SERVICE_HOST)
    return proc


def pure_copy(env: Env) -> Path:
    """A copy of the package without its compiled extensions (made once per run), to
    put first on PYTHONPATH: the sidecar then runs every module from source."""
    root = env.workdir / "pure"
    if not root.exists():
        assert env.python is not None
        probe = "import meshlayer; print(meshlayer.__file__)"
        out = subprocess.run([env.python, "-c", probe], capture_output=True, text=True, check=True)
        src = Path(out.stdout.strip()).parent
        shutil.copytree(src, root / src.name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return root


def build_of(python: str) -> str:
    """Which build of meshlayer ``python`` imports: compiled (mypyc) or pure."""
    probe = "import meshlayer.proxy.exchange as m; print(m.__file__)"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return "not importable"
    return "compiled (mypyc)" if out.stdout.strip().endswith(".so") else "pure Python"


def start_target(env: Env, target: str) -> Running:
    if target == "direct":
        return Running(target, env.upstream_port, None)
    port = free_port()
    if target in MTLS_TARGETS:
        from mtls_targets import start_mtls_target

        return start_mtls_target(env, target, port)
    if target == "nginx":
        body = NGINX_PROXY_BODY.format(port=port, upstream=env.upstream_port)
        proc = start_nginx(env, "nginx", body, env.proxy_cpu)
    elif target == "haproxy":
        cfg = env.workdir / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=port, upstream=env.upstream_port))
        cmd = [env.tools["haproxy"], "-db", "-f", str(cfg)]
        proc = spawn("haproxy", env.pin(env.proxy_cpu, cmd), env.workdir)
    elif target in ("meshlayer", "meshlayer-pure"):
        assert env.python is not None
        cfg = env.workdir / "meshlayer.yaml"
        cfg.write_text(MESHLAYER_CFG.format(service=SERVICE_HOST, upstream=env.upstream_port))
        admin = free_port()
        prefix = [] if target == "meshlayer" else ["env", f"PYTHONPATH={pure_copy(env)}"]
        cmd = [
            *prefix, env.python, "-m", "meshlayer", "sidecar",
            "--service", "bench",
            "--app", f"127.0.0.1:{free_port()}",
            "--inbound", f"127.0.0.1:{free_port()}",
            "--outbound", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{admin}",
            "--config", str(cfg),
            "--grace", "1",
            "--log-level", "warning",
        ]  # fmt: skip
        proc = spawn(target, env.pin(env.proxy_cpu, cmd), env.workdir)
        wait_http_200(proc, admin, "localhost", "/ready")
    elif target == "minimal":
        assert env.python is not None
        cmd = [
            env.python, str(MINIMAL_FORWARDER),
            "--listen", f"127.0.0.1:{port}",
            "--upstream", f"127.0.0.1:{env.upstream_port}",
        ]  # fmt: skip
        proc = spawn("minimal", env.pin(env.proxy_cpu, cmd), env.workdir)
    else:
        raise ValueError(target)
    try:
        wait_http_200(proc, port, SERVICE_HOST)
    except BaseException:
        proc.stop()
        raise
    return Running(target, port, proc)


# -------------------------------------------------------------------- measurements


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    errors: int


def run_wrk(env: Env, port: int, seconds: float) -> WrkResult:
    cmd = env.pin(
        env.load_cpu,
        [
            env.tools["wrk"],
            f"-t{WRK_THREADS}",
            f"-c{WRK_CONNECTIONS}",
            f"-d{max(1, round(seconds))}s",
            "-H",
            f"Host: {SERVICE_HOST}",
            f"http://127.0.0.1:{port}/",
        ],
    )
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or not rps:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    return WrkResult(int(m.group(1)), float(m.group(2)) * scale, float(rps.group(1)), errors)


def run_loadgen(env: Env, port: int, rate: int, seconds: float) -> dict[str, Any]:
    drain = 2.0
    cmd = env.pin(
        env.load_cpu,
        [
            str(env.loadgen),
            "127.0.0.1",
            str(port),
            SERVICE_HOST,
            str(rate),
            str(seconds),
            str(LOADGEN_CONNECTIONS),
            str(drain),
        ],
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + drain + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {proc.stderr.strip()}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@dataclass
class Sample:
    """One target measured in one round."""

    round: int
    target: str
    rps: float = 0.0
    requests: int = 0
    wrk_errors: int = 0
    cpu_us_per_req: float | None = None
    cpu_util: float | None = None  # proxy CPU seconds / wall seconds during wrk
    idle_rss_kib: int | None = None
    peak_rss_kib: int | None = None
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)  # str(rate) -> loadgen


def measure(env: Env, target: str, rnd: int, duration: float, warmup: float) -> Sample:
    sample = Sample(rnd, target)
    running = start_target(env, target)
    try:
        proc = running.proc
        if proc is not None:
            sample.idle_rss_kib = status_kib(_pids(running), "VmRSS")
        if warmup > 0:
            run_wrk(env, running.port, warmup)
        pids = _pids(running)
        t0, c0 = time.monotonic(), cpu_ticks(pids)
        wrk = run_wrk(env, running.port, duration)
        t1, c1 = time.monotonic(), cpu_ticks(pids)
        sample.rps, sample.requests, sample.wrk_errors = wrk.rps, wrk.requests, wrk.errors
        if proc is not None and wrk.requests > 0:
            cpu_s = (c1 - c0) / CLK_TCK
            sample.cpu_us_per_req = cpu_s * 1e6 / wrk.requests
            sample.cpu_util = cpu_s / (t1 - t0)
        for rate in RATES:
            sample.latency[str(rate)] = run_loadgen(env, running.port, rate, duration)
        if proc is not None:
            sample.peak_rss_kib = status_kib(_pids(running), "VmHWM")
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{target} died during the run:\n{proc.log_tail()}")
    finally:
        for p in [running.proc, *running.extra, *running.aux]:
            if p is not None:
                p.stop()
    return sample


def _pids(running: Running) -> list[int]:
    """The processes of a target's proxies (both hops for the mTLS targets)."""
    procs = [running.proc, *running.extra] if running.proc is not None else []
    return [pid for p in procs for pid in p.tree()]


# ------------------------------------------------------------------------ summary


@dataclass
class Stat:
    median: float
    lo: float
    hi: float

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat | None:
        vals = [v for v in values if v is not None]
        if not vals:
            return None
        return cls(statistics.median(vals), min(vals), max(vals))


def samples_of(samples: Sequence[Sample], target: str) -> list[Sample]:
    return [s for s in samples if s.target == target]


def added_p99(samples: Sequence[Sample], target: str, rate: int) -> list[float]:
    """Per round: the target's p99 minus direct's p99 at ``rate``."""
    direct = {s.round: s.latency[str(rate)]["p99_us"] for s in samples_of(samples, "direct")}
    return [
        s.latency[str(rate)]["p99_us"] - direct[s.round]
        for s in samples_of(samples, target)
        if s.round in direct
    ]


def cpu_wait_pct(lg: dict[str, Any]) -> float:
    """Share of a loadgen run it spent runnable but waiting for its CPU (other load)."""
    return 100.0 * float(lg["runqueue_wait_ms"]) / (1000.0 * float(lg["elapsed_s"]))


def contended(samples: Sequence[Sample]) -> list[str]:
    """Latency runs during which CPU 1 was visibly busy with something else."""
    return [
        f"round {s.round} {s.target} @{rate}/s ({cpu_wait_pct(lg):.0f}% waiting)"
        for s in samples
        for rate, lg in s.latency.items()
        if cpu_wait_pct(lg) > CONTENDED_WAIT_PCT
    ]


def summarize(samples: Sequence[Sample], targets: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in targets:
        ss = samples_of(samples, t)
        row: dict[str, Any] = {
            "rps": Stat.of([s.rps for s in ss]),
            "cpu_us_per_req": Stat.of([s.cpu_us_per_req for s in ss]),
            "cpu_util": Stat.of([s.cpu_util for s in ss]),
            "idle_rss_mib": Stat.of(
                [s.idle_rss_kib / 1024 if s.idle_rss_kib else None for s in ss]
            ),
            "peak_rss_mib": Stat.of(
                [s.peak_rss_kib / 1024 if s.peak_rss_kib else None for s in ss]
            ),
            "wrk_errors": sum(s.wrk_errors for s in ss),
        }
        for rate in RATES:
            lat = [s.latency[str(rate)] for s in ss]
            row[f"lat_{rate}"] = {
                "p50_us": Stat.of([x["p50_us"] for x in lat]),
                "p99_us": Stat.of([x["p99_us"] for x in lat]),
                "p999_us": Stat.of([x["p999_us"] for x in lat]),
                "achieved_rps": Stat.of([x["achieved_rps"] for x in lat]),
                "send_lag_p99_us": Stat.of([x["send_lag_p99_us"] for x in lat]),
                "cpu_wait_pct": Stat.of([cpu_wait_pct(x) for x in lat]),
                "conn_waits": sum(int(x["conn_waits"]) for x in lat),
                "errors": sum(int(x["errors"]) for x in lat),
                "added_p99_us": Stat.of(added_p99(samples, t, rate)) if t != "direct" else None,
            }
        out[t] = row
    return out


def fmt_num(v: float, digits: int = 0) -> str:
    return f"{v:,.{digits}f}"


def fmt_stat(st: Stat | None, digits: int = 0, rng: bool = True) -> str:
    if st is None:
        return "—"
    s = fmt_num(st.median, digits)
    if rng and st.lo != st.hi:
        s += f" [{fmt_num(st.lo, digits)}-{fmt_num(st.hi, digits)}]"
    return s


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def scaled(st: Stat | None, k: float) -> Stat | None:
    return None if st is None else Stat(st.median * k, st.lo * k, st.hi * k)


def ratio(a: Stat | None, b: Stat | None) -> float | None:
    if a is None or b is None or b.median == 0:
        return None
    return a.median / b.median


def report(
    summary: dict[str, Any], targets: Sequence[str], rounds: int, noisy: Sequence[str]
) -> str:
    parts: list[str] = []
    rows = []
    for t in targets:
        r = summary[t]
        rows.append(
            [
                t,
                fmt_stat(r["rps"]),
                fmt_stat(r["cpu_us_per_req"], 1),
                fmt_stat(scaled(r["cpu_util"], 100), 0, False),
                fmt_stat(r["idle_rss_mib"], 1),
                fmt_stat(r["peak_rss_mib"], 1),
                str(r["wrk_errors"]),
            ]
        )
    parts.append(
        f"Closed loop (wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}); "
        f"median [min-max] of {rounds} round(s)"
    )
    parts.append(
        table(
            [
                "target",
                "req/s",
                "proxy CPU µs/req",
                "CPU%",
                "idle RSS MiB",
                "peak RSS MiB",
                "errors",
            ],
            rows,
        )
    )
    rows = []
    for t in targets:
        for rate in RATES:
            lat = summary[t][f"lat_{rate}"]
            rows.append(
                [
                    t,
                    fmt_num(rate),
                    fmt_stat(lat["achieved_rps"], 0, False),
                    fmt_stat(lat["p50_us"]),
                    fmt_stat(lat["p99_us"]),
                    fmt_stat(lat["p999_us"]),
                    fmt_stat(lat["added_p99_us"]),
                    fmt_stat(lat["send_lag_p99_us"], 0, False),
                    fmt_stat(lat["cpu_wait_pct"], 0, False),
                    str(lat["conn_waits"]),
                    str(lat["errors"]),
                ]
            )
    parts.append("")
    parts.append(
        f"Open loop (loadgen, {LOADGEN_CONNECTIONS} connections, latency from intended send time)"
    )
    parts.append(
        table(
            [
                "target",
                "rate/s",
                "achieved",
                "p50 µs",
                "p99 µs",
                "p99.9 µs",
                "added p99 µs",
                "send lag p99",
                "CPU1 wait%",
                "conn waits",
                "errors",
            ],
            rows,
        )
    )

    if noisy:
        parts.append(
            f"note: in {len(noisy)} latency run(s) loadgen waited for CPU 1 more than "
            f"{CONTENDED_WAIT_PCT:g}% of the time (other load on the machine); their tails "
            "say little about the proxy — prefer medians of more --rounds:"
        )
        parts.extend(f"  {n}" for n in noisy)

    if "nginx" in summary:
        ng = summary["nginx"]
        rows = []
        for t in targets:
            if t in ("direct", "nginx"):
                continue
            r = summary[t]
            rps_r = ratio(r["rps"], ng["rps"])
            cpu_r = ratio(r["cpu_us_per_req"], ng["cpu_us_per_req"])
            a, b = r[f"lat_{RATES[0]}"]["added_p99_us"], ng[f"lat_{RATES[0]}"]["added_p99_us"]
            rows.append(
                [
                    t,
                    "—" if rps_r is None else f"{rps_r:.2f}x",
                    "—" if cpu_r is None else f"{cpu_r:.2f}x",
                    "—" if a is None else fmt_num(a.median),
                    "—" if b is None else fmt_num(b.median),
                    "—" if (r_ := ratio(a, b)) is None else f"{r_:.2f}x",
                ]
            )
        if rows:
            parts.append("")
            parts.append("Against nginx (medians)")
            parts.append(
                table(
                    [
                        "target",
                        "req/s ratio",
                        "CPU µs/req ratio",
                        f"added p99 @{RATES[0]:,}/s µs",
                        "nginx's",
                        "ratio",
                    ],
                    rows,
                )
            )

    pair = mtls_pair(summary)
    if pair:
        parts.append("")
        parts.extend(pair)

    checks = targets_check(summary)
    if checks:
        parts.append("")
        parts.append("Targets (informational)")
        parts.extend(checks)
    return "\n".join(parts)


def mtls_pair(summary: dict[str, Any]) -> list[str]:
    """mesh-mtls against its like: nginx doing TLS to nginx (both rows are two proxies)."""
    if "mesh-mtls" not in summary or "nginx-tls" not in summary:
        return []
    m, n = summary["mesh-mtls"], summary["nginx-tls"]
    rps_r = ratio(m["rps"], n["rps"])
    cpu_r = ratio(m["cpu_us_per_req"], n["cpu_us_per_req"])
    a, b = m[f"lat_{RATES[0]}"]["added_p99_us"], n[f"lat_{RATES[0]}"]["added_p99_us"]
    row = [
        "mesh-mtls",
        "—" if rps_r is None else f"{rps_r:.2f}x",
        "—" if cpu_r is None else f"{cpu_r:.2f}x",
        "—" if a is None else fmt_num(a.median),
        "—" if b is None else fmt_num(b.median),
        "—" if (r_ := ratio(a, b)) is None else f"{r_:.2f}x",
    ]
    headers = [
        "target",
        "req/s ratio",
        "CPU µs/req ratio",
        f"added p99 @{RATES[0]:,}/s µs",
        "nginx-tls's",
        "ratio",
    ]
    return ["Against nginx-tls (one mTLS hop, two proxies each; medians)", table(headers, [row])]


def targets_check(summary: dict[str, Any]) -> list[str]:
    if "meshlayer" not in summary:
        return ["  info  meshlayer not measured: targets not evaluated"]
    ml, lines = summary["meshlayer"], []

    def verdict(ok: bool | None) -> str:
        return "  info" if ok is None else ("  PASS" if ok else "  FAIL")

    if "nginx" in summary:
        ng = summary["nginx"]
        r = ratio(ml["rps"], ng["rps"])
        ok = None if r is None else r >= TARGET_RPS_RATIO
        shown = "n/a" if r is None else f"{r:.2f}x"
        lines.append(f"{verdict(ok)}  meshlayer req/s >= {TARGET_RPS_RATIO}x nginx: {shown}")
        a = ml[f"lat_{RATES[0]}"]["added_p99_us"]
        b = ng[f"lat_{RATES[0]}"]["added_p99_us"]
        if a is None or b is None:
            lines.append("  info  added p99: needs the direct baseline")
        else:
            ok = a.median <= TARGET_ADDED_P99_RATIO * b.median
            lines.append(
                f"{verdict(ok)}  meshlayer added p99 @{RATES[0]:,}/s <= "
                f"{TARGET_ADDED_P99_RATIO:g}x nginx's: {a.median:,.0f} µs vs "
                f"{TARGET_ADDED_P99_RATIO:g} x {b.median:,.0f} µs"
            )
    else:
        lines.append("  info  nginx not measured: ratio targets not evaluated")
    if "minimal" in summary:
        mn = summary["minimal"]
        r = ratio(ml["rps"], mn["rps"])
        c = ratio(ml["cpu_us_per_req"], mn["cpu_us_per_req"])
        parts = [
            "n/a" if r is None else f"{r:.2f}x its req/s",
            "n/a" if c is None else f"{c:.2f}x its CPU µs/req",
        ]
        if "nginx" in summary:
            rn = ratio(mn["rps"], summary["nginx"]["rps"])
            parts.append("n/a" if rn is None else f"minimal itself {rn:.2f}x nginx req/s")
        lines.append("  info  meshlayer vs the minimal Python forwarder: " + ", ".join(parts))
    if "meshlayer-pure" in summary:
        pu = summary["meshlayer-pure"]
        parts = [f"{pu['cpu_us_per_req'].median:.1f} CPU µs/req" if pu["cpu_us_per_req"] else "n/a"]
        if "nginx" in summary:
            rn = ratio(pu["rps"], summary["nginx"]["rps"])
            parts.append("n/a" if rn is None else f"{rn:.2f}x nginx req/s")
        lines.append("  info  meshlayer from source, nothing compiled: " + ", ".join(parts))
    idle = ml["idle_rss_mib"]
    ok = None if idle is None else idle.median < TARGET_IDLE_RSS_MIB
    shown = "n/a" if idle is None else f"{idle.median:.1f} MiB"
    lines.append(f"{verdict(ok)}  meshlayer idle RSS < {TARGET_IDLE_RSS_MIB:g} MiB: {shown}")
    return lines


def jsonable(obj: Any) -> Any:
    if isinstance(obj, Stat):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Measure the overhead of one meshlayer sidecar next to nginx and haproxy "
            "(req/s, proxy CPU per request, open-loop latency, RSS)."
        ),
        epilog="The method is described in the module docstring of bench/overhead.py.",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument(
        "--duration", type=float, default=5.0, help="seconds per measurement (default: 5)"
    )
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds (default: 1)")
    p.add_argument("--quick", action="store_true", help="1 round, 2 s measurements, short warm-up")
    p.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help="comma-separated subset of %(default)s",
    )
    p.add_argument("--json", metavar="FILE", help="write raw samples and the summary here")
    p.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxy (default: 0)")
    p.add_argument("--load-cpu", type=int, default=1, help="CPU for upstream and load (default: 1)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2.0, 0.5
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(ALL_TARGETS)
    if unknown or not args.targets:
        p.error(f"unknown targets: {sorted(unknown)}")
    if args.rounds < 1 or args.duration <= 0:
        p.error("--rounds must be >= 1 and --duration > 0")
    return args


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="meshlayer-bench-"))
    path.chmod(0o755)  # nginx workers (user nobody) must reach their temp paths
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tools = ensure_tools()
    targets: list[str] = args.targets
    pythonic = {"meshlayer", "meshlayer-pure", "minimal", "mesh-mtls"}
    python = meshlayer_python() if pythonic & set(targets) else None
    if pythonic & set(targets) and python is None:
        log("meshlayer is not importable (pip install -e .): skipping meshlayer and minimal")
        targets = [t for t in targets if t not in pythonic]
    cpus = os.sched_getaffinity(0)
    if not {args.proxy_cpu, args.load_cpu} <= cpus or args.proxy_cpu == args.load_cpu:
        raise SystemExit(f"need two distinct CPUs among {sorted(cpus)} (--proxy-cpu/--load-cpu)")
    os.sched_setaffinity(0, {args.load_cpu})  # keep this driver off the proxy's CPU

    samples: list[Sample] = []
    with workdir(args.keep_tmp) as tmp:
        env = Env(
            tools=tools,
            workdir=tmp,
            loadgen=compile_loadgen(tools["gcc"], tmp),
            upstream_port=free_port(),
            proxy_cpu=args.proxy_cpu,
            load_cpu=args.load_cpu,
            python=python,
        )
        upstream = start_upstream(env)
        stopping: list[Callable[[], None]] = [upstream.stop]
        prev = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            for rnd in range(1, args.rounds + 1):
                for target in targets:
                    log(f"round {rnd}/{args.rounds}: {target} ...")
                    s = measure(env, target, rnd, args.duration, args.warmup)
                    lat = "  ".join(
                        f"@{k}: p50 {v['p50_us']:.0f} p99 {v['p99_us']:.0f} µs"
                        for k, v in s.latency.items()
                    )
                    cpu = f"{s.cpu_us_per_req:.1f}" if s.cpu_us_per_req is not None else "—"
                    log(f"  {s.rps:,.0f} req/s  cpu {cpu} µs/req  {lat}")
                    samples.append(s)
        finally:
            for stop in stopping:
                stop()
            signal.signal(signal.SIGTERM, prev)

    summary = summarize(samples, targets)
    print()
    print(
        f"meshlayer overhead benchmark — {args.rounds} round(s), {args.duration:g} s each, "
        f"proxy on CPU {args.proxy_cpu}, upstream + load on CPU {args.load_cpu}"
        + (f"; meshlayer build: {build_of(python)}" if python is not None else "")
    )
    print(report(summary, targets, args.rounds, contended(samples)))
    if "meshlayer" not in targets:
        print("\n(meshlayer was not included in this run)")
    if args.json:
        data = {
            "args": {k: v for k, v in vars(args).items()},
            "versions": tool_versions(tools),
            "samples": [asdict(s) for s in samples],
            "summary": jsonable(summary),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
