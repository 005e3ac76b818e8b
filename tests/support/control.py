"""`meshlayer control` as a real process for tests, and a tiny JSON client for its API.

``start_control(tmp, store_url)`` starts the process on a free loopback port
and waits until ``/healthz`` answers; ``api(port, method, path, body)``
sends one request and returns ``(status, parsed JSON or None)``;
``Watch`` reads the server-sent events of ``/v1/watch``.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.procs import Proc, free_port, wait_port

ADMIN_TOKEN = "test-admin-token-0123456789"
"""The admin token every ``start_control`` process gets (``MESHLAYER_ADMIN_TOKEN``)."""


def api(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    timeout: float = 10.0,
    token: str | None = None,
) -> tuple[int, Any]:
    """One request on a new connection; ``body`` is sent as JSON (bytes as they are);
    ``token`` goes in ``Authorization: Bearer``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data: bytes | None
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data is not None else {}
        if token:
            headers["authorization"] = f"Bearer {token}"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    if not raw:
        return resp.status, None
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode(errors="replace")


class Control:
    """A running `meshlayer control` process."""

    def __init__(
        self,
        proc: Proc,
        port: int,
        store_url: str,
        tmp: Path,
        mtls_port: int = 0,
        admin_token: str | None = ADMIN_TOKEN,
    ) -> None:
        self.proc = proc
        self.port = port
        self.store_url = store_url
        self.tmp = tmp
        self.url = f"http://127.0.0.1:{port}"
        self.mtls_port = mtls_port
        """The mesh (mTLS) listener's port."""
        self.admin_token = admin_token

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = 10.0,
        token: str | None = "admin",
    ) -> Any:
        """``(status, json)`` of one request to this control process, with the admin
        token (``token="admin"``), another bearer token, or none (``token=None``)."""
        bearer = self.admin_token if token == "admin" else token
        return api(self.port, method, path, body, timeout, bearer)

    def watch(self, sidecar: str, timeout: float = 10.0) -> Watch:
        return Watch(self.port, sidecar, timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait; the exit code."""
        return self.proc.stop(timeout)

    def kill(self) -> None:
        """SIGKILL, wait."""
        self.proc.signal(signal.SIGKILL)
        self.proc.popen.wait(10)

    def log(self) -> str:
        """Everything the process logged so far (also after it stopped)."""
        return self.proc.logfile.read_text(errors="replace")


def start_control(
    tmp: Path,
    store_url: str,
    extra: list[str] | None = None,
    port: int | None = None,
    procs: list[Proc] | None = None,
    plaintext_sidecars: bool = True,
    env: dict[str, str] | None = None,
) -> Control:
    """Start `meshlayer control` on a free port; wait until ``/healthz`` says ok.

    ``procs``: a list (e.g. ``Cluster.procs``) to append the process to, so the
    caller's teardown stops it. The process gets ``MESHLAYER_ADMIN_TOKEN`` =
    :data:`ADMIN_TOKEN` (``env`` may override it), a mesh listener on a free port
    and, unless ``plaintext_sidecars`` is False, ``--allow-plaintext-sidecars``
    (the tests of earlier issues use sidecars without certificates).
    """
    port = port or free_port()
    extra = list(extra or [])
    mtls_port = 0
    if "--listen-mtls" in extra:
        value = extra[extra.index("--listen-mtls") + 1]
        mtls_port = int(value.rsplit(":", 1)[1]) if value != "off" else 0
    else:
        mtls_port = free_port()
        extra += ["--listen-mtls", f"127.0.0.1:{mtls_port}"]
    if plaintext_sidecars:
        extra.append("--allow-plaintext-sidecars")
    child_env = {"MESHLAYER_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})}
    argv = [
        sys.executable,
        "-m",
        "meshlayer",
        "control",
        "--listen",
        f"127.0.0.1:{port}",
        "--store",
        store_url,
        *extra,
    ]
    proc = Proc(f"control-{port}-{int(time.monotonic() * 1000) % 100000}", argv, tmp, child_env)
    if procs is not None:
        procs.append(proc)
    wait_port(port, timeout=15, proc=proc)
    token = child_env["MESHLAYER_ADMIN_TOKEN"] or None
    ctl = Control(proc, port, store_url, tmp, mtls_port, token)
    deadline = time.monotonic() + 10
    while True:
        try:
            status, _ = ctl.api("GET", "/healthz", timeout=2)
            if status == 200:
                return ctl
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"control on {port} not healthy:\n{proc.log()}")
        time.sleep(0.05)


class Watch:
    """A `/v1/watch` stream, read event by event (raw socket, chunked decoding)."""

    def __init__(self, port: int, sidecar: str, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(
            f"GET /v1/watch?sidecar={sidecar} HTTP/1.1\r\nHost: control\r\n\r\n".encode()
        )
        self.buf = b""
        self.body = b""  # de-chunked, not yet consumed
        head = self._until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.headers = head.decode("latin-1").lower()
        self.comments = 0

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("watch stream closed")
        self.buf += data

    def _until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self._recv()
        out, self.buf = self.buf.split(sep, 1)
        return out

    def _chunk(self) -> None:
        size = int(self._until(b"\r\n"), 16)
        if size == 0:
            raise EOFError("watch stream ended")
        while len(self.buf) < size + 2:
            self._recv()
        self.body += self.buf[:size]
        self.buf = self.buf[size + 2 :]

    def event(self, timeout: float = 10.0) -> tuple[str, int, Any]:
        """The next event: (event name, id, parsed data); keep-alive comments are counted."""
        self.sock.settimeout(timeout)
        while True:
            while b"\n\n" not in self.body:
                self._chunk()
            block, self.body = self.body.split(b"\n\n", 1)
            fields: dict[str, str] = {}
            comment = False
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    comment = True
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
            if comment and not fields:
                self.comments += 1
                continue
            return fields["event"], int(fields["id"]), json.loads(fields["data"])

    def snapshot_at_least(self, version: int, timeout: float = 10.0) -> dict[str, Any]:
        """Read events until one has a version >= ``version``; its data."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no snapshot at version >= {version} within {timeout}s")
            _, vid, data = self.event(left)
            if vid >= version:
                return dict(data)

    def close(self) -> None:
        self.sock.close()


def service_doc(
    name: str, spec: dict[str, Any] | None = None, rv: int | None = None
) -> dict[str, Any]:
    """A ``kind: Service`` document as the API takes it."""
    meta: dict[str, Any] = {"name": name}
    if rv is not None:
        meta["resourceVersion"] = rv
    return {"apiVersion": "meshlayer/v1", "kind": "Service", "metadata": meta, "spec": spec or {}}
