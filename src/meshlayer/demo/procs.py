"""The demo's child processes: start with a log file each, probe, stop by PID.

Every child runs in its own session, so a Ctrl-C in the terminal reaches the
demo only, which then stops the children itself, in order (the control plane
last, so the sidecars can deregister). On Linux each child also gets SIGTERM
from the kernel if the demo dies without cleaning up (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import meshlayer
from meshlayer.child import LoggedChild

HOST = "127.0.0.1"
STOP_TIMEOUT = 10.0
"""Seconds children get to exit after SIGTERM before SIGKILL."""


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


def child_env() -> dict[str, str]:
    """The demo's environment, with this ``meshlayer`` first on the import path."""
    env = dict(os.environ)
    src = str(Path(meshlayer.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Child(LoggedChild):
    """A child process started by the demo, its output in a log file."""

    def __init__(self, label: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        # Its own session: a Ctrl-C reaches the demo only, which then stops every child.
        super().__init__(label, argv, log, env, preexec_fn=_parent_death_signal())

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().rstrip("\n").splitlines()[-lines:])


def stop_children(children: Sequence[Child], say: Callable[[str], None]) -> None:
    """SIGTERM every child by its PID, wait for all of them, SIGKILL stragglers."""
    for child in children:
        if child.running():
            with contextlib.suppress(ProcessLookupError):
                child.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        try:
            child.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"{child.label} (pid {child.pid}) ignored SIGTERM; killing it")
            # Its own session: the group is the child and what it started (the broker's
            # script starts the Erlang VM), nothing else.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.popen.wait(5)
            child.close()
            continue
        child.close()
        code = child.popen.returncode
        if code not in (0, -signal.SIGTERM):
            say(f"note: {child.label} exited with code {code} (see {child.log})")


def port_free(port: int) -> bool:
    """Whether the demo could listen on ``HOST:port``."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """``GET path`` on ``HOST:port``, one connection: (status, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
