"""A pair of network namespaces joined by a veth, for tests that look at packets.

``a`` holds ``veth-a`` (10.231.0.1/24, fd00:6d6c::1/64), ``b`` holds ``veth-b``
(10.231.0.2/24, fd00:6d6c::2/64). Both are private ranges that exist only
inside the namespaces; the host's own interfaces are never touched. Commands
run in a namespace with ``ip netns exec``; Python snippets run there with
this interpreter and the project on ``PYTHONPATH``. Neighbour entries are
static, so the first packet leaves at once (no ARP/ND wait or retransmit). :meth:`NetnsPair.remove`
deletes both namespaces (and so the veth), also after a failed test.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

from tests.support.procs import ROOT

A_V4, B_V4 = "10.231.0.1", "10.231.0.2"
A_V6, B_V6 = "fd00:6d6c::1", "fd00:6d6c::2"
DEV_A, DEV_B = "veth-a", "veth-b"
_serial = itertools.count()


def netns_unavailable() -> str:
    """Why namespaces cannot be made here, or "" when they can."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs the ip and tc commands (Debian package iproute2)"
    return ""


def env() -> dict[str, str]:
    """This process's environment with the project importable."""
    out = dict(os.environ)
    out["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + str(ROOT)
    return out


class NetnsPair:
    """Two namespaces ``a`` and ``b`` with a veth between them (see the module doc)."""

    def __init__(self) -> None:
        tag = f"mlq{os.getpid()}x{next(_serial)}"
        self.a = f"{tag}a"
        self.b = f"{tag}b"
        self.created: list[str] = []

    def create(self) -> None:
        for ns in (self.a, self.b):
            _ip("netns", "add", ns)
            self.created.append(ns)
        _ip(
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
        )
        for ns, dev, v4, v6 in ((self.a, DEV_A, A_V4, A_V6), (self.b, DEV_B, B_V4, B_V6)):
            _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            _ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # Static neighbours: no ARP or ND delay (or retransmit) before the first packet.
        for ns, dev, peer_ns, peer_dev, v4, v6 in (
            (self.a, DEV_A, self.b, DEV_B, B_V4, B_V6),
            (self.b, DEV_B, self.a, DEV_A, A_V4, A_V6),
        ):
            mac = _mac(peer_ns, peer_dev)
            for addr in (v4, v6):
                _ip(
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
                )

    def remove(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=10)
        self.created.clear()

    def run(
        self, ns: str, argv: Sequence[str], timeout: float = 20.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in namespace ``ns`` to completion; output captured as text."""
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env(),
            cwd=str(ROOT),
            check=False,
        )

    def python(self, ns: str, code: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet in ``ns``."""
        return self.run(ns, [sys.executable, "-c", code], timeout)

    def popen_python(self, ns: str, code: str) -> subprocess.Popen[str]:
        """Start a Python snippet in ``ns``; the caller waits for it (or kills it by PID)."""
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
            cwd=str(ROOT),
        )

    def meshlayer(self, ns: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """``python -m meshlayer ARGS`` in ``ns``."""
        return self.run(ns, [sys.executable, "-m", "meshlayer", *args])


def _mac(ns: str, dev: str) -> str:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "link", "show", "dev", dev],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return str(json.loads(out)[0]["address"])


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
