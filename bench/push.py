#!/usr/bin/env python3
"""Config push benchmark: from ``apply`` returning to every watcher holding the version.

What is measured, per store (SQLite, then etcd with a 3-member cluster):

1. start the control plane: with SQLite one ``meshlayer control`` process over
   a database file; with etcd a 3-member etcd cluster on loopback and
   ``--controls`` control processes over it (default 2), the watchers spread
   over them and every apply sent to the first, so a change crosses etcd's
   watch to reach the other process's watchers;
2. connect ``--watchers`` watch clients (default 200). They are lightweight
   asyncio clients of the sidecar's protocol (``GET /v1/watch?sidecar=ID``,
   chunked server-sent events, one ``snapshot`` per version), not full
   sidecars: 200 sidecar processes do not fit a small machine, and the
   figure of interest is the control plane's fan-out. Like sidecars, they
   acknowledge each snapshot (``POST /v1/status/ID``) unless ``--no-ack``;
3. ``--applies`` applies (default 20), ``--interval`` seconds apart, each
   changing one Service. For each apply: **latency** = time from the apply
   answer arriving (200) to a watcher reading a snapshot at that version or
   newer, for every watcher (0 when the snapshot came first). "all" is the
   time until the *last* watcher holds it. One warm-up apply goes first and
   is not counted: right after 200 watchers connect, the control plane is
   still writing their 200 first acknowledgements, and the warm-up's "all"
   is printed apart as "1st" (the first push after a mass connect).

The table prints p50/p99/max of the per-watcher latencies and of "all" per
store. Target (informational): p99 under 500 ms. A watcher that has not got a
version within ``--timeout`` seconds counts as missed.

Run (from the repository root)::

    .venv/bin/python bench/push.py
    .venv/bin/python bench/push.py --watchers 50 --applies 10 --stores sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_P99_MS = 500.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes -------------------------------------------------------------


ADMIN_TOKEN = secrets.token_urlsafe(24)
"""The control processes' admin token (``MESHLAYER_ADMIN_TOKEN``) for the applies."""


class Control:
    """One ``meshlayer control`` process, stopped by PID."""

    def __init__(self, store_url: str, workdir: Path) -> None:
        self.port = free_port()
        self.log = workdir / f"control-{self.port}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        env["MESHLAYER_ADMIN_TOKEN"] = ADMIN_TOKEN
        with self.log.open("wb") as fh:
            self.popen = subprocess.Popen(
                [
                    sys.executable, "-m", "meshlayer", "control",
                    "--listen", f"127.0.0.1:{self.port}",
                    "--store", store_url,
                    "--no-health-checks",
                    "--listen-mtls", "off",
                    "--allow-plaintext-sidecars",  # the watchers are plain HTTP clients
                    "--log-level", "warning",
                ],
                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(workdir),
            )  # fmt: skip

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"control exited:\n{self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                status, _ = await request(self.port, "GET", "/healthz")
                if status == 200:
                    return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"control on {self.port} not ready:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@contextlib.contextmanager
def etcd_cluster(workdir: Path) -> Iterator[str]:
    """A 3-member etcd cluster on loopback; yields its ``etcd://`` URL."""
    sys.path.insert(0, str(ROOT))
    from tests.support.etcd import etcd_binary, start_cluster

    if etcd_binary() is None:
        raise RuntimeError("etcd is not installed (make test installs Debian's etcd-server)")
    cluster = start_cluster(workdir)
    try:
        yield cluster.url + "/meshlayer-bench/"
    finally:
        cluster.stop()


# -- a tiny HTTP client ----------------------------------------------------


async def request(
    port: int, method: str, path: str, body: object = None, timeout: float = 10.0
) -> tuple[int, object]:
    """One request on a fresh connection: (status, parsed JSON body or None)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        data = b"" if body is None else json.dumps(body).encode()
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: control\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Authorization: Bearer {ADMIN_TOKEN}\r\n\r\n".encode()
            + data
        )
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(payload) if payload else None
    except ValueError:
        return status, None


class Acker:
    """Keep-alive connection for a watcher's ``POST /v1/status/ID``."""

    def __init__(self, port: int, sidecar: str) -> None:
        self.port = port
        self.path = f"/v1/status/{sidecar}"
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.pending = 0
        self.task: asyncio.Task[None] | None = None

    def post(self, version: int) -> None:
        """Acknowledge ``version`` without waiting; only the newest waits its turn."""
        self.pending = version
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self.pending:
            version, self.pending = self.pending, 0
            await self.ack(version)

    async def ack(self, version: int) -> None:
        body = json.dumps({"version": version, "error": None}).encode()
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = await asyncio.open_connection("127.0.0.1", self.port)
                reader, writer = self.conn
                writer.write(
                    f"POST {self.path} HTTP/1.1\r\nHost: control\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                    .encode() + body
                )  # fmt: skip
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                return
            except (OSError, asyncio.IncompleteReadError):
                if self.conn is not None:
                    self.conn[1].close()
                self.conn = None


# -- watchers --------------------------------------------------------------


@dataclass
class Watcher:
    """One watch stream: when it first held each version."""

    sidecar: str
    port: int
    ack: bool
    held: int = 0
    times: dict[int, float] = field(default_factory=dict)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    backwards: int = 0

    async def run(self) -> None:
        acker = Acker(self.port, self.sidecar) if self.ack else None
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(
            f"GET /v1/watch?sidecar={self.sidecar} HTTP/1.1\r\nHost: control\r\n\r\n".encode()
        )
        await reader.readuntil(b"\r\n\r\n")
        body = b""
        try:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    return
                body += (await reader.readexactly(size + 2))[:-2]
                while b"\n\n" in body:
                    event, body = body.split(b"\n\n", 1)
                    version = _event_id(event)
                    if version is None:
                        continue  # keep-alive comment
                    now = time.monotonic()
                    if version < self.held:
                        self.backwards += 1
                        continue
                    self.held = version
                    self.times.setdefault(version, now)
                    self.connected.set()
                    if acker is not None:
                        acker.post(version)  # in the background, as a sidecar does
        finally:
            writer.close()


def _event_id(event: bytes) -> int | None:
    for line in event.split(b"\n"):
        if line.startswith(b"id:"):
            return int(line[3:])
    return None


def held_at(w: Watcher, version: int) -> float | None:
    """When ``w`` first held ``version`` or a newer one."""
    times = [t for v, t in w.times.items() if v >= version]
    return min(times) if times else None


# -- the measurement -------------------------------------------------------


@dataclass
class Result:
    store: str
    watchers: int
    applies: int
    latencies_ms: list[float] = field(default_factory=list)
    all_ms: list[float] = field(default_factory=list)
    missed: int = 0
    backwards: int = 0
    first_ms: float = float("nan")
    """"all" of the warm-up apply: the first push after every watcher connected."""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def measure(store: str, controls: list[Control], args: argparse.Namespace) -> Result:
    for c in controls:
        await c.wait_ready()
    watchers = [
        Watcher(f"bench-{i}", controls[i % len(controls)].port, args.ack)
        for i in range(args.watchers)
    ]
    tasks = [asyncio.create_task(w.run()) for w in watchers]
    result = Result(store, args.watchers, args.applies)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(w.connected.wait() for w in watchers)), args.timeout * 4
        )
        await asyncio.sleep(args.interval)
        for i in range(-1, args.applies):  # -1: the warm-up apply, reported on its own
            doc = {
                "apiVersion": "meshlayer/v1",
                "kind": "Service",
                "metadata": {"name": "bench"},
                "spec": {"loadBalancer": ["round-robin", "least-request"][i % 2]},
            }
            status, body = await request(
                controls[0].port, "POST", "/v1/apply", {"documents": [doc]}
            )
            returned = time.monotonic()
            if status != 200 or not isinstance(body, dict):
                raise RuntimeError(f"apply failed: {status} {body}")
            version = int(body["version"])
            deadline = returned + args.timeout
            while any(held_at(w, version) is None for w in watchers):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await asyncio.sleep(min(left, 0.02))  # the watchers stamp their own times
            lat = []
            for w in watchers:
                t = held_at(w, version)
                if t is None:
                    result.missed += 1
                else:
                    lat.append(max(0.0, t - returned) * 1000)
            if i < 0:
                result.first_ms = max(lat, default=float("nan"))
                result.missed = 0
                await asyncio.sleep(max(1.0, args.interval))  # let the acks drain
                continue
            result.latencies_ms += lat
            if lat and len(lat) == len(watchers):
                result.all_ms.append(max(lat))
            await asyncio.sleep(args.interval)
        result.backwards = sum(w.backwards for w in watchers)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


def run_store(store: str, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory(prefix=f"meshlayer-push-{store}-") as tmp:
        workdir = Path(tmp)
        controls: list[Control] = []
        with contextlib.ExitStack() as stack:
            if store == "sqlite":
                url = f"sqlite:{workdir / 'control.db'}"
                count = 1
            else:
                url = stack.enter_context(etcd_cluster(workdir))
                count = args.controls
            try:
                controls = [Control(url, workdir) for _ in range(count)]
                return asyncio.run(measure(store, controls, args))
            finally:
                for c in controls:
                    c.stop()


def table(results: list[Result]) -> str:
    lines = [
        f"{'store':<8} {'watchers':>8} {'applies':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        f" {'all p50':>8} {'all p99':>8} {'1st':>6} {'missed':>6} {'back':>5}"
        f"  target p99<{TARGET_P99_MS:.0f}",
    ]
    for r in results:
        p99 = pct(r.latencies_ms, 99)
        ok = "PASS" if r.missed == 0 and p99 < TARGET_P99_MS else "FAIL"
        lines.append(
            f"{r.store:<8} {r.watchers:>8} {r.applies:>7} {pct(r.latencies_ms, 50):>8.1f}"
            f" {p99:>8.1f} {max(r.latencies_ms, default=float('nan')):>8.1f}"
            f" {pct(r.all_ms, 50):>8.1f} {pct(r.all_ms, 99):>8.1f} {r.first_ms:>6.0f} {r.missed:>6}"
            f" {r.backwards:>5}  {ok}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Time from `apply` returning to every watcher holding the new version.",
    )
    p.add_argument("--watchers", type=int, default=200, help="watch clients (default: 200)")
    p.add_argument("--applies", type=int, default=20, help="applies per store (default: 20)")
    p.add_argument(
        "--interval", type=float, default=0.5, help="seconds between applies (default: 0.5)"
    )
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds before a watcher counts as missed"
    )
    p.add_argument(
        "--stores", default="sqlite,etcd", help="comma-separated: sqlite, etcd (default: both)"
    )
    p.add_argument(
        "--controls", type=int, default=2, help="control processes over etcd (default: 2)"
    )
    p.add_argument(
        "--no-ack", dest="ack", action="store_false", help="watchers do not POST /v1/status"
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    for s in stores:
        if s not in ("sqlite", "etcd"):
            p.error(f"--stores: unknown store {s!r}")
    results = []
    for s in stores:
        print(f"# {s}: {args.watchers} watchers, {args.applies} applies ...", flush=True)
        results.append(run_store(s, args))
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), f"cpus={os.cpu_count()}")
    print(table(results))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    {
                        "store": r.store,
                        "watchers": r.watchers,
                        "applies": r.applies,
                        "p50_ms": pct(r.latencies_ms, 50),
                        "p99_ms": pct(r.latencies_ms, 99),
                        "max_ms": max(r.latencies_ms, default=None),
                        "all_p50_ms": pct(r.all_ms, 50),
                        "all_p99_ms": pct(r.all_ms, 99),
                        "all_ms": r.all_ms,
                        "first_ms": r.first_ms,
                        "missed": r.missed,
                        "backwards": r.backwards,
                        "stdev_ms": statistics.pstdev(r.latencies_ms) if r.latencies_ms else None,
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
