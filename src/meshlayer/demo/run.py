"""``meshlayer demo``: a small shop on the mesh, some traffic, a summary.

What runs (each a process of its own, all on 127.0.0.1)::

    curl / load generator
          │  Host: frontend
          ▼
    edge sidecar ──► frontend sidecar ──► frontend app
                                             │ GET http://catalog/items, http://reviews/reviews/ID
                                             ▼ (through the frontend sidecar's outbound listener)
                     catalog-1 sidecar ──► catalog-1 app
                     catalog-2 sidecar ──► catalog-2 app
                     reviews-1 sidecar ──► reviews-1 app

Every sidecar reads the same static config (``mesh.yaml``), whose endpoints
are the sidecars' inbound listeners; the apps only know service names.

Port layout, from ``--port-base`` B (default 18000): instance ``i`` owns the
block ``B + 10*i`` and uses its first four ports::

    i  instance     +0 outbound   +1 inbound   +2 app     +3 admin
    0  edge         B+0 (entry)   B+1          (unused)   B+3
    1  frontend-1   B+10          B+11         B+12       B+13
    2  catalog-1    B+20          B+21         B+22       B+23
    3  catalog-2    B+30          B+31         B+32       B+33
    4  reviews-1    B+40          B+41         B+42       B+43

So with the defaults the entry point is ``http://127.0.0.1:18000`` (the edge
sidecar's outbound listener) and e.g. catalog-2's sidecar admin is
``http://127.0.0.1:18033/metrics``. All these ports must be free.

The state directory ``./.meshlayer/demo/`` gets the config and one log per
process (``<instance>.log`` for apps, ``<instance>-sidecar.log`` for sidecars).

Flow: check ports, write the config, start everything, wait for each app's
``/healthz`` and each sidecar's ``/ready``, send ``--requests`` requests with
``--concurrency`` clients through the edge, print per service (from the
sidecars' inbound metrics) requests, success rate (status below 500) and
p50/p99, the same measured end to end by the load generator, and the split
between the catalog replicas. Then, unless ``--exit``, say where to point curl
and stay up until Ctrl-C or SIGTERM. Every child is stopped by its PID
(SIGTERM, SIGKILL if it lingers). Exit code: 0; 1 if something failed to start
or died, or (with ``--exit``) if any request failed; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import meshlayer

HOST = "127.0.0.1"
STATE_DIR = Path(".meshlayer") / "demo"
CONFIG_NAME = "mesh.yaml"
SLOT = 10
"""Ports per instance block (four used)."""
READY_TIMEOUT = 20.0
"""Seconds each process gets to become ready."""
STOP_TIMEOUT = 10.0
"""Seconds children get to exit after SIGTERM before SIGKILL."""
SIDECAR_GRACE = 3.0
"""``--grace`` of the demo's sidecars (nothing is in flight when they stop)."""
SERVICES = ("frontend", "catalog", "reviews")
"""The rows of the summary table, in call-graph order."""


@dataclass(frozen=True)
class Instance:
    """One instance of a service: an app (except the edge) and its sidecar."""

    name: str
    service: str
    slot: int
    has_app: bool = True

    def outbound(self, base: int) -> int:
        return base + SLOT * self.slot

    def inbound(self, base: int) -> int:
        return base + SLOT * self.slot + 1

    def app(self, base: int) -> int:
        return base + SLOT * self.slot + 2

    def admin(self, base: int) -> int:
        return base + SLOT * self.slot + 3

    def ports(self, base: int) -> list[tuple[int, str]]:
        """The ports this instance listens on, with what each is for."""
        out = [
            (self.outbound(base), f"{self.name} sidecar outbound"),
            (self.inbound(base), f"{self.name} sidecar inbound"),
            (self.admin(base), f"{self.name} sidecar admin"),
        ]
        if self.has_app:
            out.append((self.app(base), f"{self.name} app"))
        return sorted(out)


EDGE = Instance("edge", "edge", 0, has_app=False)
INSTANCES = (
    EDGE,
    Instance("frontend-1", "frontend", 1),
    Instance("catalog-1", "catalog", 2),
    Instance("catalog-2", "catalog", 3),
    Instance("reviews-1", "reviews", 4),
)
PORT_SPAN = SLOT * (len(INSTANCES) - 1) + 4
"""Ports from the base up to the last one used."""


class Stop(Exception):
    """SIGTERM (or SIGINT) asked the demo to stop."""


class DemoError(Exception):
    """Something the user should read; the demo stops and exits 1."""


# -- config ---------------------------------------------------------------------


def render_config(base: int) -> str:
    """The mesh's static config: every service and its sidecars' inbound listeners."""
    docs = [
        "# Written by `meshlayer demo`; every sidecar of the demo reads this file.\n"
        "# Endpoints are the sidecars' inbound listeners (meshed: true, the default)."
    ]
    for service in SERVICES:
        replicas = [i for i in INSTANCES if i.service == service]
        lines = [
            "apiVersion: meshlayer/v1",
            "kind: Service",
            f"metadata: {{name: {service}}}",
            "spec:",
        ]
        if len(replicas) > 1:
            lines.append("  loadBalancer: p2c-ewma")
        lines.append("  endpoints:")
        for inst in replicas:
            lines.append(f'    - {{address: "{HOST}:{inst.inbound(base)}"}}  # {inst.name}')
        docs.append("\n".join(lines))
    return docs[0] + "\n" + "\n---\n".join(docs[1:]) + "\n"


# -- processes ------------------------------------------------------------------


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, children get SIGTERM if the demo dies without cleaning up (e.g. SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


class Child:
    """A child process started by the demo, its output in a log file."""

    def __init__(self, label: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.label = label
        self.log = log
        self._fh: IO[bytes] = log.open("wb")
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own session: a Ctrl-C reaches the demo only, which then stops every child.
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        self._fh.flush()
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def close(self) -> None:
        self._fh.close()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(meshlayer.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def app_argv(inst: Instance, base: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meshlayer.demo.services",
        inst.service,
        "--port",
        str(inst.app(base)),
        "--replica",
        inst.name,
        "--outbound",
        f"{HOST}:{inst.outbound(base)}",
    ]


def sidecar_argv(inst: Instance, base: int, config: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meshlayer",
        "sidecar",
        "--service",
        inst.service,
        "--app",
        f"{HOST}:{inst.app(base)}",
        "--inbound",
        f"{HOST}:{inst.inbound(base)}",
        "--outbound",
        f"{HOST}:{inst.outbound(base)}",
        "--admin",
        f"{HOST}:{inst.admin(base)}",
        "--config",
        str(config),
        "--grace",
        str(SIDECAR_GRACE),
        "--log-level",
        "warning",
    ]


def busy_ports(base: int) -> list[tuple[int, str]]:
    """The demo's ports something else already listens on (or we may not bind)."""
    busy = []
    for inst in INSTANCES:
        for port, what in inst.ports(base):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((HOST, port))
                except OSError:
                    busy.append((port, what))
    return busy


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- metrics --------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """The samples of a Prometheus text exposition: (name, labels, value)."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        yield m.group(1), dict(_LABEL.findall(m.group(2) or "")), value


@dataclass
class RouteStats:
    """Requests one or more sidecars took in for a service: status classes and a histogram."""

    statuses: Counter[str] = field(default_factory=Counter)
    buckets: dict[float, float] = field(default_factory=dict)
    """Cumulative counts by upper bound (``le``), +Inf included."""

    @classmethod
    def from_metrics(cls, text: str, service: str) -> RouteStats:
        """The inbound requests to ``service`` in one sidecar's /metrics, all sources summed."""
        st = cls()
        for name, labels, value in parse_metrics(text):
            if labels.get("direction") != "inbound" or labels.get("destination") != service:
                continue
            if name == "meshlayer_requests_total":
                st.statuses[labels.get("status_class", "?")] += int(value)
            elif name == "meshlayer_request_duration_seconds_bucket" and "le" in labels:
                le = float(labels["le"])  # "+Inf" parses as inf
                st.buckets[le] = st.buckets.get(le, 0.0) + value
        return st

    def __add__(self, other: RouteStats) -> RouteStats:
        buckets = dict(self.buckets)
        for le, n in other.buckets.items():
            buckets[le] = buckets.get(le, 0.0) + n
        return RouteStats(self.statuses + other.statuses, buckets)

    def __sub__(self, other: RouteStats) -> RouteStats:
        statuses: Counter[str] = Counter()
        for k, v in self.statuses.items():
            statuses[k] = v - other.statuses.get(k, 0)
        buckets = {le: n - other.buckets.get(le, 0.0) for le, n in self.buckets.items()}
        return RouteStats(statuses, buckets)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return self.total - self.statuses.get("5xx", 0)

    def quantile(self, q: float) -> float | None:
        """Seconds, interpolated within the bucket as Prometheus' ``histogram_quantile``."""
        bounds = sorted(self.buckets)
        if not bounds or self.buckets[bounds[-1]] <= 0:
            return None
        rank = q * self.buckets[bounds[-1]]
        lower, below = 0.0, 0.0
        for le in bounds:
            count = self.buckets[le]
            if count >= rank:
                if math.isinf(le):
                    return lower  # beyond the last finite bound: the best we can say
                if count == below:
                    return le
                return lower + (le - lower) * (rank - below) / (count - below)
            lower, below = le, count
        return lower


# -- load -----------------------------------------------------------------------


@dataclass
class LoadResult:
    """What the load generator saw, end to end through the edge."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    catalog_replicas: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if status < 500)

    def merge(self, other: LoadResult) -> None:
        self.latencies.extend(other.latencies)
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        self.catalog_replicas.update(other.catalog_replicas)

    def quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class LoadGenerator:
    """``total`` GETs of the frontend through the edge, ``concurrency`` keep-alive clients."""

    def __init__(self, port: int, total: int, concurrency: int) -> None:
        self.port = port
        self.total = total
        self.concurrency = max(1, min(concurrency, total))
        self.result = LoadResult()
        self.done = 0
        self._issued = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._started = time.perf_counter()
        for n in range(self.concurrency):
            t = threading.Thread(target=self._worker, name=f"load-{n}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, tick: Callable[[int], None], interval: float = 0.2) -> LoadResult:
        """Wait for the workers, calling ``tick(done)`` every ``interval`` seconds."""
        while any(t.is_alive() for t in self._threads):
            time.sleep(interval)
            tick(self.done)
        for t in self._threads:
            t.join()
        self.result.elapsed = time.perf_counter() - self._started
        return self.result

    def _next(self) -> bool:
        with self._lock:
            if self._stop.is_set() or self._issued >= self.total:
                return False
            self._issued += 1
            return True

    def _worker(self) -> None:
        mine = LoadResult()
        conn: http.client.HTTPConnection | None = None
        try:
            while self._next():
                if conn is None:
                    conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
                started = time.perf_counter()
                try:
                    conn.request("GET", "/", headers={"Host": "frontend"})
                    resp = conn.getresponse()
                    body = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    mine.errors[type(e).__name__] += 1
                    conn.close()
                    conn = None
                else:
                    mine.latencies.append(time.perf_counter() - started)
                    mine.statuses[resp.status] += 1
                    if resp.status == 200:
                        mine.catalog_replicas[_catalog_replica(body)] += 1
                    if resp.will_close:
                        conn.close()
                        conn = None
                with self._lock:
                    self.done += 1
        finally:
            if conn is not None:
                conn.close()
            with self._lock:
                self.result.merge(mine)


def _catalog_replica(body: bytes) -> str:
    try:
        served = json.loads(body)["served_by"]["catalog"]
    except (ValueError, KeyError, TypeError):
        return "?"
    return str(served)


# -- output ---------------------------------------------------------------------


def _ms(seconds: float | None, approx: bool = False) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000.0
    text = f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"
    return ("~" if approx else "") + text + " ms"


def _rate(ok: int, total: int) -> str:
    if total == 0:
        return "-"
    # Rounded down: anything short of every request never shows as 100.0%.
    return f"{math.floor(ok * 1000 / total) / 10:.1f}%"


def render_table(
    per_service: dict[str, RouteStats],
    replicas: dict[str, int],
    load: LoadResult,
) -> str:
    head = f"  {'service':<12}{'replicas':>9}{'requests':>10}{'success':>9}{'p50':>11}{'p99':>11}"
    rows = [head, "  " + "-" * (len(head) - 2)]
    for service in SERVICES:
        st = per_service[service]
        n = sum(1 for i in INSTANCES if i.service == service)
        rows.append(
            f"  {service:<12}{n:>9}{st.total:>10}{_rate(st.ok, st.total):>9}"
            f"{_ms(st.quantile(0.5), True):>11}{_ms(st.quantile(0.99), True):>11}"
        )
    rows.append(
        f"  {'end to end':<12}{'-':>9}{load.total:>10}{_rate(load.ok, load.total):>9}"
        f"{_ms(load.quantile(0.5)):>11}{_ms(load.quantile(0.99)):>11}"
    )
    rows.append("")
    rows.append("  service rows: each service's sidecars, inbound requests (p50/p99 interpolated")
    rows.append("  from histogram buckets); end to end: the load generator, through the edge.")
    rate = load.total / load.elapsed if load.elapsed > 0 else 0.0
    rows.append(
        f"  {load.total} requests in {load.elapsed:.1f}s ({rate:.0f} req/s); "
        "success = answered with a status below 500."
    )
    if load.errors or any(s >= 500 for s in load.statuses):
        failures = [f"{n}x HTTP {s}" for s, n in sorted(load.statuses.items()) if s >= 500]
        failures += [f"{n}x {e}" for e, n in sorted(load.errors.items())]
        rows.append("  failed: " + ", ".join(failures))
    rows.append("")
    total = sum(replicas.values())
    agree = all(load.catalog_replicas.get(name, 0) == n for name, n in replicas.items())
    rows.append(
        "  catalog replicas (their sidecars' counts"
        + ("; the frontend's answers agree):" if agree else "):")
    )
    for name, n in replicas.items():
        share = n / total if total else 0.0
        bar = "#" * round(share * 40)
        line = f"    {name:<11}{n:>7}{share:>8.1%}  {bar}"
        if not agree:
            line += f"   (frontend answers: {load.catalog_replicas.get(name, 0)})"
        rows.append(line)
    return "\n".join(rows)


def render_howto(base: int, state: Path, catalog_1_pid: int) -> str:
    entry = f"http://{HOST}:{EDGE.outbound(base)}"
    frontend, catalog = INSTANCES[1], INSTANCES[2]
    lines = [
        "The mesh is up. Enter it through the edge sidecar:",
        f"  curl -H 'Host: frontend' {entry}/",
        f"  curl -x {entry} 'http://frontend/shop?item=3'",
        f"  curl -x {entry} http://catalog/items          # any service, by name",
        "Look inside:",
        f"  curl http://{HOST}:{frontend.admin(base)}/metrics    # frontend-1's sidecar",
        f"  curl http://{HOST}:{catalog.admin(base)}/config     # catalog-1's sidecar",
        "Break something:",
        f"  kill {catalog_1_pid}    # catalog-1's app: the mesh retries and routes around it",
        f"Config and logs: {state}{os.sep}   (port layout: pydoc meshlayer.demo.run)",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


# -- the demo -------------------------------------------------------------------


class Demo:
    """The demo's children and what it knows about them."""

    def __init__(self, base: int, state: Path, out: IO[str]) -> None:
        self.base = base
        self.state = state
        self.out = out
        self.config = state / CONFIG_NAME
        self.children: list[tuple[Instance, str, Child]] = []
        self._env = _child_env()

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def start_all(self) -> None:
        self.config.write_text(render_config(self.base))
        for inst in INSTANCES:
            if inst.has_app:
                argv = app_argv(inst, self.base)
                log = self.state / f"{inst.name}.log"
                self.children.append((inst, "app", Child(f"{inst.name} app", argv, log, self._env)))
            argv = sidecar_argv(inst, self.base, self.config)
            log = self.state / f"{inst.name}-sidecar.log"
            child = Child(f"{inst.name} sidecar", argv, log, self._env)
            self.children.append((inst, "sidecar", child))

    def wait_ready(self) -> None:
        for inst in INSTANCES:
            b = self.base
            if inst.has_app:
                where = (
                    f"app :{inst.app(b)}, sidecar in :{inst.inbound(b)} "
                    f"out :{inst.outbound(b)} admin :{inst.admin(b)}"
                )
            else:
                where = f"entry :{inst.outbound(b)}, sidecar admin :{inst.admin(b)}"
            self.say(f"starting {inst.name:<10} ({where}) ... ", end="")
            started = time.monotonic()
            for _, kind, child in self.children:
                if child.label.startswith(inst.name + " "):
                    port = inst.app(b) if kind == "app" else inst.admin(b)
                    path = "/healthz" if kind == "app" else "/ready"
                    self._wait(child, port, path)
            self.say(f"ready ({time.monotonic() - started:.1f}s)")

    def _wait(self, child: Child, port: int, path: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer"
        while True:
            if not child.running():
                self.say("failed")
                raise DemoError(
                    f"{child.label} (pid {child.pid}) exited with code {child.popen.returncode} "
                    f"before it was ready; the end of {child.log}:\n{child.tail()}"
                )
            try:
                status, _ = http_get(port, path, timeout=1.0)
                if status == 200:
                    return
                last = f"GET {path} answered {status}"
            except (OSError, http.client.HTTPException) as e:
                last = f"GET {path}: {e}"
            if time.monotonic() > deadline:
                self.say("failed")
                raise DemoError(
                    f"{child.label} (pid {child.pid}) was not ready after {READY_TIMEOUT:.0f}s "
                    f"({last}); the end of {child.log}:\n{child.tail()}"
                )
            time.sleep(0.05)

    def check_children(self) -> None:
        for _, _, child in self.children:
            if not child.running():
                raise DemoError(
                    f"{child.label} (pid {child.pid}) exited with code {child.popen.returncode}; "
                    f"the end of {child.log}:\n{child.tail()}"
                )

    def scrape(self) -> dict[str, RouteStats]:
        """Inbound stats of every app instance, from its sidecar, by instance name."""
        stats = {}
        for inst in INSTANCES:
            if not inst.has_app:
                continue
            status, body = http_get(inst.admin(self.base), "/metrics", timeout=5.0)
            if status != 200:
                raise DemoError(f"{inst.name} sidecar: GET /metrics answered {status}")
            stats[inst.name] = RouteStats.from_metrics(body.decode(errors="replace"), inst.service)
        return stats

    def stop_all(self) -> None:
        """SIGTERM every child by PID, wait, SIGKILL stragglers."""
        for _, _, child in self.children:
            if child.running():
                with contextlib.suppress(ProcessLookupError):
                    child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for _, _, child in self.children:
            try:
                child.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.label} (pid {child.pid}) ignored SIGTERM; killing it")
                child.popen.kill()
                child.popen.wait(5)
                child.close()
                continue
            child.close()
            code = child.popen.returncode
            if code not in (0, -signal.SIGTERM):
                self.say(f"note: {child.label} exited with code {code} (see {child.log})")

    def run_load(self, total: int, concurrency: int) -> tuple[dict[str, RouteStats], LoadResult]:
        before = self.scrape()
        gen = LoadGenerator(EDGE.outbound(self.base), total, concurrency)
        self.say(
            f"sending {total} requests through the edge to the frontend, "
            f"{gen.concurrency} concurrent clients"
        )
        tty = self.out.isatty()
        shown = [0]

        def tick(done: int) -> None:
            if tty:
                self.say(f"\r  {done}/{total} ({done * 100 // total}%)", end="")
            else:
                quarter = done * 4 // total
                while shown[0] < quarter:
                    shown[0] += 1
                    self.say(f"  {total * shown[0] // 4}/{total} ({shown[0] * 25}%)")

        gen.start()
        try:
            result = gen.wait(tick)
        except BaseException:
            gen.stop()
            raise
        tick(gen.done)
        if tty:
            self.say()
        # The last answers are counted by the sidecars as they finish: settle briefly.
        deadline = time.monotonic() + 2.0
        while True:
            after = self.scrape()
            frontend = sum((after[i] - before[i]).total for i in after if i.startswith("frontend"))
            if frontend >= result.ok or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return {name: after[name] - before[name] for name in after}, result

    def stay_up(self) -> None:
        """Until a signal: report children that exit (say, a replica killed to try the mesh)."""
        gone: set[int] = set()
        while True:
            for _, _, child in self.children:
                if child.pid not in gone and not child.running():
                    gone.add(child.pid)
                    self.say(
                        f"{child.label} (pid {child.pid}) exited with code "
                        f"{child.popen.returncode}; the rest keeps running (log: {child.log})"
                    )
            if len(gone) == len(self.children):
                raise DemoError("every process of the demo has exited")
            time.sleep(0.5)

    def app_pid(self, name: str) -> int:
        for inst, kind, child in self.children:
            if inst.name == name and kind == "app":
                return child.pid
        raise KeyError(name)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def run_demo_cli(args: argparse.Namespace) -> int:
    """Run the demo as ``meshlayer demo`` does; the exit code."""
    base: int = args.port_base
    total: int = args.requests
    concurrency: int = args.concurrency
    if total < 1 or concurrency < 1:
        print("meshlayer demo: --requests and --concurrency must be at least 1", file=sys.stderr)
        return 2
    if not 1024 <= base <= 65535 - PORT_SPAN:
        print(
            f"meshlayer demo: --port-base must be 1024-{65535 - PORT_SPAN} "
            f"(the demo uses ports BASE to BASE+{PORT_SPAN - 1})",
            file=sys.stderr,
        )
        return 2
    busy = busy_ports(base)
    if busy:
        what = "; ".join(f"port {p} ({w})" for p, w in busy)
        print(
            f"meshlayer demo: {what}: already in use on {HOST}. Is another demo running? "
            f"Pick another block with --port-base (it uses ports {base}-{base + PORT_SPAN - 1}).",
            file=sys.stderr,
        )
        return 1

    state = STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    demo = Demo(base, state, sys.stdout)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        demo.start_all()
        demo.wait_ready()
        per_instance, load = demo.run_load(total, concurrency)
        demo.check_children()
        per_service = {
            service: sum(
                (per_instance[i.name] for i in INSTANCES if i.service == service), RouteStats()
            )
            for service in SERVICES
        }
        replicas = {i.name: per_instance[i.name].total for i in INSTANCES if i.service == "catalog"}
        demo.say()
        demo.say(render_table(per_service, replicas, load))
        demo.say()
        if args.exit:
            code = 0 if load.ok == load.total else 1
        else:
            demo.say(render_howto(base, state, demo.app_pid("catalog-1")))
            demo.stay_up()
    except Stop as e:
        demo.say(f"\n{e} received: stopping the demo")
    except DemoError as e:
        print(f"meshlayer demo: {e}", file=sys.stderr)
        code = 1
    finally:
        for sig in previous:  # no second interruption halfway through the cleanup
            signal.signal(sig, signal.SIG_IGN)
        started = len(demo.children)
        demo.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started:
            demo.say(f"stopped {started} processes")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshlayer.demo.run``: the same as ``meshlayer demo``."""
    from meshlayer.cli.main import main as cli_main

    return cli_main(["demo", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
