"""The one broker starter (meshlayer.rabbitmq) leaves nothing behind it did not start.

Each test starts (part of) a node of its own, so the module is marked slow;
no test waits for a full boot. Leaks are looked for by environment: every
process of a node, a daemon epmd included, carries its ``RABBITMQ_NODENAME``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from meshlayer import rabbitmq
from meshlayer.rabbitmq import BrokerError, Process
from tests.support.rabbitmq import Broker, node_processes, rabbitmq_missing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(rabbitmq_missing() is not None, reason=str(rabbitmq_missing())),
]


def _left(node: str, timeout: float = 3.0) -> dict[int, str]:
    """The node's processes still there after up to ``timeout`` s (the VM's port helpers
    exit a moment after the VM)."""
    deadline = time.monotonic() + timeout
    while (left := node_processes(node)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((rabbitmq.HOST, port)) == 0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker not started yet; afterwards whatever runs with its node name is killed
    by PID (those processes are this test's by construction) and reported."""
    b = Broker(tmp_path)
    try:
        yield b
    finally:
        b.stop()
        left = _left(b.node)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"left running: {left}"


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_session_broker_runs_only_its_own_children(rabbitmq: Broker) -> None:
    """Every process of the node descends from our epmd or our server script: no
    ``epmd -daemon`` (which detaches to init) serves the node."""
    ours = {c.pid for c in rabbitmq.children}
    procs = node_processes(rabbitmq.node)
    assert ours <= set(procs)
    strays = {}
    for pid in procs:
        up = pid
        try:
            while up not in ours and up > 1:
                up = _parent(up)
        except OSError:  # exited meanwhile (a short-lived helper): not a stray
            continue
        if up not in ours:
            strays[pid] = procs[pid]
    assert strays == {}


def test_server_waits_for_its_epmd(broker: Broker) -> None:
    """Our epmd cannot bind (the port is taken): start fails before the server is run,
    instead of letting RabbitMQ start a daemon epmd on some other port."""
    with socket.socket() as taken:
        taken.bind((rabbitmq.HOST, broker.plan.epmd_port))
        taken.listen()
        with pytest.raises(BrokerError, match=r"epmd \(pid \d+\) exited"):
            broker.start(timeout=10)
    assert [c.label for c in broker.children] == ["epmd"]
    assert not any(c.running() for c in broker.children)


def test_a_node_without_its_epmd_starts_none(broker: Broker) -> None:
    """Should the server ever run without our epmd, it fails instead of starting an
    ``epmd -daemon`` that outlives it (ERL_FLAGS=-start_epmd false)."""
    plan = broker.plan
    plan.prepare()
    server = Process(
        "rabbitmq-server", plan.server_argv(), broker.workdir / "s.log", plan.env(os.environ)
    )
    broker.children.append(server)
    deadline = time.monotonic() + 30
    while server.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.running(), "the node booted without an epmd"
    assert "nodistribution" in server.tail() or "epmd" in server.tail()
    assert not _listening(plan.epmd_port)
    assert _left(plan.node) == {}


class Interrupt(BaseException):
    """Like KeyboardInterrupt: not an Exception."""


def test_interrupted_start_stops_what_it_started(broker: Broker) -> None:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise Interrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)  # the server is booting by then
        with pytest.raises(Interrupt):
            broker.start(timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert [c.label for c in broker.children] == ["epmd", "rabbitmq-server"]
    assert not any(c.running() for c in broker.children)
    assert _left(broker.node) == {}
    assert not _listening(broker.plan.epmd_port)
