"""A real RabbitMQ broker on loopback, for meshlayer.amqp's tests.

The node is started by :mod:`meshlayer.rabbitmq`, the one broker starter the
demo uses too (its theory of operation says how it keeps to its own ports,
directory and epmd). This module only picks the test's values: a private node
name, ports from the test range, a temporary directory, and the children as
:class:`meshlayer.rabbitmq.Process` so they are stopped by PID.

A boot costs 3-9 s, so tests share one broker per session (the ``rabbitmq``
fixture) and keep apart by queue name (:func:`unique_queue`).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshlayer import rabbitmq
from meshlayer.rabbitmq import BrokerPlan, Process
from tests.support.procs import free_port


def rabbitmq_missing() -> str | None:
    """Why a broker cannot be started here (a skip reason), or None when it can."""
    reason = rabbitmq.missing()
    if reason is not None:
        return f"{reason}; `make test` installs Debian's rabbitmq-server"
    return None


def node_plan(workdir: Path) -> BrokerPlan:
    """A plan for a node of its own: fresh name, ports from the test range, in ``workdir``."""
    tools = rabbitmq.find_tools()
    if isinstance(tools, str):
        raise RuntimeError(tools)
    server, epmd = tools
    return BrokerPlan(
        server,
        epmd,
        workdir,
        node=f"meshlayer-test-{uuid.uuid4().hex[:8]}@localhost",
        port=free_port(),
        dist_port=free_port(),
        epmd_port=free_port(),
    )


@dataclass
class Broker:
    """One started node (its epmd and ``rabbitmq-server``), stopped by PID."""

    workdir: Path
    plan: BrokerPlan = field(init=False)
    children: list[Process] = field(default_factory=list)
    boot_seconds: float = 0.0
    """How long the last ``start`` took, to keep an eye on the suite's cost."""

    def __post_init__(self) -> None:
        self.plan = node_plan(self.workdir / "node")

    @property
    def port(self) -> int:
        return self.plan.port

    @property
    def node(self) -> str:
        return self.plan.node

    def spawn(self, label: str, argv: list[str], env: dict[str, str]) -> Process:
        return Process(label, argv, self.workdir / f"{label}.log", env)

    def start(self, timeout: float = 60.0) -> None:
        """Start epmd and the broker; wait until it speaks AMQP. Nothing is left running
        when this raises, also on KeyboardInterrupt."""
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.plan.launch(self.spawn, self.children, timeout=timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - t0

    def ready(self) -> bool:
        return self.plan.ready()

    def log(self) -> str:
        parts = [f"--- {c.label}\n{c.tail()}" for c in self.children]
        logdir = self.plan.root / "log"
        for f in sorted(logdir.glob("*.log")) if logdir.is_dir() else []:
            parts.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` against this broker; its stdout."""
        out = subprocess.run(
            [self.plan.ctl, "-q", "-n", self.node, *args],
            env=self.plan.env(os.environ),
            cwd=str(self.workdir),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return out.stdout

    def parameters(self, **kwargs: Any) -> Any:
        """``pika.ConnectionParameters`` for this broker (guest, from loopback)."""
        import pika

        kwargs.setdefault("connection_attempts", 3)
        kwargs.setdefault("retry_delay", 0.2)
        return pika.ConnectionParameters(host=rabbitmq.HOST, port=self.port, **kwargs)

    def connect(self, **kwargs: Any) -> Any:
        """A new ``pika.BlockingConnection`` to this broker."""
        import pika

        return pika.BlockingConnection(self.parameters(**kwargs))

    def stop(self) -> None:
        """Stop the broker (SIGTERM, SIGKILL to its group if it lingers), then its epmd."""
        rabbitmq.stop_all(self.children)


def start_broker(workdir: Path, attempts: int = 3) -> Broker:
    """A started broker; retried on fresh ports if one was taken in between."""
    for attempt in range(1, attempts + 1):
        broker = Broker(workdir / f"try{attempt}")
        try:
            broker.start()
            return broker
        except rabbitmq.BrokerError:  # start() has stopped what it started
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


_queues = itertools.count(1)


def unique_queue(label: str = "q") -> str:
    """A queue name no other test in this session uses."""
    return f"meshlayer-{label}{next(_queues)}-{uuid.uuid4().hex[:6]}"


def node_processes(node: str) -> dict[int, str]:
    """Every process (PID → command line) whose environment names ``node``: the node's
    epmd, script and VM, and any helper or daemon they started."""
    want = f"RABBITMQ_NODENAME={node}".encode()
    found: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if want not in (d / "environ").read_bytes().split(b"\0"):
                continue
            found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone, or not ours to read
            continue
    return found
