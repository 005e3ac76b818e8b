"""A real 3-member etcd cluster on loopback, for the etcd store's tests.

Each member gets two free ports (client, peer) on 127.0.0.1 and a data
directory under the test's temporary directory. ``start`` waits until every
member answers ``/health`` and the cluster has a leader; ``kill`` sends
SIGKILL to one member by PID; ``stop`` ends all of them (SIGTERM, then
SIGKILL). Tests share one cluster per session and keep apart by key prefix
(``unique_prefix``).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.procs import free_port


def etcd_binary() -> str | None:
    """Path of the ``etcd`` server binary, or None when it is not installed."""
    return shutil.which("etcd")


@dataclass
class Member:
    """One etcd server process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    logfile: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` of its client listener."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def healthy(self, timeout: float = 1.0) -> bool:
        """True when the member answers ``/health`` with ``"health": "true"``."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=timeout)
            conn.request("GET", "/health")
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
        except OSError:
            return False
        if resp.status != 200:
            return False
        return bool(json.loads(body).get("health") == "true")


@dataclass
class EtcdCluster:
    """``size`` etcd members on loopback, started and stopped by PID."""

    workdir: Path
    size: int = 3
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        token = uuid.uuid4().hex[:8]
        self._token = f"meshlayer-test-{token}"
        for i in range(self.size):
            name = f"m{i + 1}"
            self.members.append(
                Member(
                    name=name,
                    client_port=free_port(),
                    peer_port=free_port(),
                    data_dir=self.workdir / f"etcd-{name}",
                    logfile=self.workdir / f"etcd-{name}.log",
                )
            )

    @property
    def endpoints(self) -> list[str]:
        """Client ``HOST:PORT`` of every member (dead ones included)."""
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The ``--store`` value for ``meshlayer control``."""
        return "etcd://" + ",".join(self.endpoints)

    def _argv(self, m: Member, binary: str) -> list[str]:
        initial = ",".join(f"{x.name}=http://127.0.0.1:{x.peer_port}" for x in self.members)
        return [
            binary,
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", f"http://127.0.0.1:{m.client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{m.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self._token,
            # Loopback: fast elections keep failover tests short.
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--snapshot-count", "100000",
            "--log-level", "warn",
            "--logger", "zap",
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        """Start every member and wait until all are healthy."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed (make test installs Debian's etcd-server)")
        env = dict(os.environ)
        if platform.machine() not in ("x86_64", "AMD64"):
            # etcd 3.4 refuses to start on other architectures unless told.
            env["ETCD_UNSUPPORTED_ARCH"] = platform.machine().replace("aarch64", "arm64")
        for m in self.members:
            m.data_dir.mkdir(parents=True, exist_ok=True)
            fh = m.logfile.open("wb")
            m.popen = subprocess.Popen(
                self._argv(m, binary), stdout=fh, stderr=subprocess.STDOUT, env=env
            )
            fh.close()
        deadline = time.monotonic() + timeout
        for m in self.members:
            while not m.healthy():
                if not m.alive:
                    raise RuntimeError(f"etcd {m.name} exited:\n{self.log(m)}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"etcd {m.name} not healthy after {timeout}s")
                time.sleep(0.05)

    def log(self, m: Member) -> str:
        return m.logfile.read_text(errors="replace")[-4000:]

    def kill(self, index: int) -> Member:
        """SIGKILL one member (by PID) and reap it."""
        m = self.members[index]
        if m.popen is not None and m.popen.poll() is None:
            m.popen.send_signal(signal.SIGKILL)
            m.popen.wait(10)
        return m

    def wait_healthy(self, timeout: float = 15.0) -> None:
        """Wait until every live member answers ``/health`` (a leader exists)."""
        deadline = time.monotonic() + timeout
        for m in self.members:
            if not m.alive:
                continue
            while not m.healthy():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd {m.name} not healthy after {timeout}s")
                time.sleep(0.05)

    def _status(self, m: Member) -> dict[str, Any]:
        return _post(m.client_port, "/v3/maintenance/status", {})

    def leader(self) -> int:
        """Index of the current leader (asked of the first live member)."""
        live = [m for m in self.members if m.alive]
        status = self._status(live[0])
        ids = [self._status(m)["header"]["member_id"] if m.alive else None for m in self.members]
        return ids.index(status["leader"])

    def make_leader(self, index: int, timeout: float = 10.0) -> None:
        """Move leadership to member ``index`` (etcd's MoveLeader) and wait for it."""
        deadline = time.monotonic() + timeout
        target = self._status(self.members[index])["header"]["member_id"]
        while (current := self.leader()) != index:
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd {self.members[index].name} did not become leader")
            leader = self.members[current]
            _post(leader.client_port, "/v3/maintenance/transfer-leadership", {"targetID": target})
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every member by PID: SIGTERM, then SIGKILL if it lingers."""
        for m in self.members:
            if m.popen is not None and m.popen.poll() is None:
                m.popen.send_signal(signal.SIGTERM)
        for m in self.members:
            if m.popen is None:
                continue
            try:
                m.popen.wait(1)  # a throwaway cluster: no need for a graceful leave
            except subprocess.TimeoutExpired:
                m.popen.kill()
                m.popen.wait(5)


def start_cluster(workdir: Path, size: int = 3, attempts: int = 3) -> EtcdCluster:
    """A started cluster; retried on fresh ports if a member fails to start.

    Free ports are picked before etcd binds them, so another process may take
    one in between; a new attempt picks new ones.
    """
    for attempt in range(1, attempts + 1):
        cluster = EtcdCluster(workdir / f"try{attempt}", size)
        try:
            cluster.start()
            return cluster
        except (RuntimeError, TimeoutError):
            cluster.stop()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        data = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return dict(data)


_prefixes = itertools.count(1)


def unique_prefix(label: str = "t") -> str:
    """A key prefix no other test in this session uses, e.g. ``/meshlayer-t3-1a2b/``."""
    return f"/meshlayer-{label}{next(_prefixes)}-{uuid.uuid4().hex[:6]}/"
