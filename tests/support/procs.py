"""Real processes for integration tests: upstream servers and sidecars.

Everything binds to 127.0.0.1 on free ports; every process started here is
stopped by its PID at teardown (SIGTERM, then SIGKILL if it lingers).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


# Ports for test listeners come from below the kernel's ephemeral range (32768+ by
# default), so an outgoing connection of some other test cannot take a port
# between the moment it is picked here and the moment a child process binds it.
_PORTS = list(range(20000, 32000))
random.Random(os.getpid()).shuffle(_PORTS)


def free_port() -> int:
    """A loopback TCP port nobody listens on now, not handed out before in this run."""
    while _PORTS:
        port = _PORTS.pop()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("ran out of test ports")


def wait_port(port: int, timeout: float = 10.0, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def wait_for(what: str, cond: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``cond`` (OSError counts as not yet) until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Proc:
    """A child process with its output in a log file."""

    def __init__(
        self, name: str, argv: list[str], logdir: Path, env_extra: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.logfile = logdir / f"{name}.log"
        self._fh = self.logfile.open("wb")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(env_extra or {})
        self.popen = subprocess.Popen(
            argv, stdout=self._fh, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        self._fh.flush()
        return self.logfile.read_text(errors="replace")[-4000:]

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._fh.close()
        return self.popen.returncode


class Upstream:
    """A test upstream server (tests/support/upstream_app.py)."""

    def __init__(self, proc: Proc, port: int, name: str) -> None:
        self.proc = proc
        self.port = port
        self.name = name
        self.address = f"127.0.0.1:{port}"

    def stats(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.request("GET", "/stats")
        data = json.loads(conn.getresponse().read())
        conn.close()
        return dict(data)


class Sidecar:
    """A `meshlayer sidecar` process and its ports."""

    def __init__(self, proc: Proc, outbound: int, inbound: int, admin: int) -> None:
        self.proc = proc
        self.outbound = outbound
        self.inbound = inbound
        self.admin = admin

    def admin_get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=5)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode()
        conn.close()
        return resp.status, body

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        _, text = self.admin_get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total


class Cluster:
    """Starts processes for one test and stops them all at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def upstream(
        self, name: str = "upstream", port: int | None = None, flags: Sequence[str] = ()
    ) -> Upstream:
        """A test upstream (``tests/support/upstream_app.py``) with extra ``flags``."""
        port = port or free_port()
        proc = Proc(
            f"upstream-{name}-{port}",
            [
                sys.executable,
                "-m",
                "tests.support.upstream_app",
                "--port",
                str(port),
                "--name",
                name,
                *flags,
            ],
            self.tmp,
        )
        self.procs.append(proc)
        wait_port(port, proc=proc)
        return Upstream(proc, port, name)

    def write_config(self, text: str, name: str = "mesh.yaml") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def sidecar(
        self,
        config: str | Path | None,
        service: str = "client",
        app: str = "127.0.0.1:9",
        extra: list[str] | None = None,
        wait: bool = True,
        control: str | None = None,
    ) -> Sidecar:
        """``control``: a control plane URL (``--control``); the state dir defaults to
        one per sidecar under the test's tmp dir unless ``extra`` names one."""
        if isinstance(config, str):
            config = self.write_config(config, f"mesh-{len(self.procs)}.yaml")
        outbound, inbound, admin = free_port(), free_port(), free_port()
        flags = ["--config", str(config)] if config is not None else []
        if control is not None:
            flags += ["--control", control]
            if "--state-dir" not in (extra or []):
                flags += ["--state-dir", str(self.tmp / f"state-{service}-{outbound}")]
        argv = [
            sys.executable,
            "-m",
            "meshlayer",
            "sidecar",
            "--service",
            service,
            "--app",
            app,
            "--outbound",
            f"127.0.0.1:{outbound}",
            "--inbound",
            f"127.0.0.1:{inbound}",
            "--admin",
            f"127.0.0.1:{admin}",
            *flags,
            *(extra or []),
        ]
        proc = Proc(f"sidecar-{service}-{outbound}", argv, self.tmp)
        self.procs.append(proc)
        sc = Sidecar(proc, outbound, inbound, admin)
        if wait:
            wait_port(admin, proc=proc)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    if sc.admin_get("/ready")[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.02)
        return sc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def service_yaml(name: str, endpoints: list[str], meshed: bool = False, spec: str = "") -> str:
    """A `kind: Service` document; ``spec`` is extra YAML lines under spec (indented 2)."""
    eps = "\n".join(
        f'    - {{address: "{e}", meshed: {"true" if meshed else "false"}}}' for e in endpoints
    )
    extra = "\n".join("  " + line for line in spec.strip("\n").splitlines()) if spec else ""
    return (
        f"apiVersion: meshlayer/v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n"
        f"  endpoints:\n{eps}\n{extra}\n"
    )


def request(
    port: int,
    method: str = "GET",
    path: str = "/",
    host: str = "upstream",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection; returns (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    hdrs = {"Host": host, **(headers or {})}
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def raw(port: int, data: bytes, timeout: float = 5.0, until_close: bool = True) -> bytes:
    """Send raw bytes; read until the peer closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                piece = s.recv(65536)
            except TimeoutError:
                break
            if not piece:
                break
            chunks.append(piece)
            if not until_close:
                break
        return b"".join(chunks)


def rss_bytes(pid: int) -> int:
    """The resident set size of a process (VmRSS from /proc/<pid>/status), in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; ``peak`` is the max.

    Use as a context manager around the work to watch.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import threading

        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
                self.samples += 1
            except OSError:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.peak = max(self.peak, rss_bytes(self.pid))
        except OSError:
            pass


def upstream_with(cluster: Cluster, name: str, *flags: str, port: int | None = None) -> Upstream:
    """Like ``cluster.upstream`` with extra upstream_app flags, e.g.
    ``upstream_with(cluster, "slow", "--delay-ms", "50")`` or ``"--fail-status", "503"``."""
    return cluster.upstream(name, port, flags)


def parallel(
    calls: list[Any], timeout: float = 10.0
) -> list[tuple[float, tuple[int, dict[str, str], bytes]]]:
    """Run zero-argument callables at once (released together by a barrier); returns
    ``(seconds, result)`` per call, in order."""
    import threading

    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait(timeout)
        t0 = time.monotonic()
        try:
            out: Any = calls[i]()
        except Exception as exc:  # reported to the caller, not swallowed
            out = exc
        results[i] = (time.monotonic() - t0, out)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    for r in results:
        if r is None:
            raise TimeoutError(f"a parallel call did not finish within {timeout}s")
        if isinstance(r[1], Exception):
            raise r[1]
    return results


def run_meshlayer(
    args: list[str],
    timeout: float = 20.0,
    cwd: Path | None = None,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    unset: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m meshlayer ARGS`` to completion; output captured as text.

    The child gets this environment without the variables whose names start with
    one of ``unset``, plus ``env``.
    """
    full = {k: v for k, v in os.environ.items() if not k.startswith(tuple(unset))}
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "meshlayer", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(cwd or ROOT),
        env=full,
    )
