"""A private RabbitMQ node on loopback: the one broker starter of the demo and the tests.

Theory of operation: nothing here touches a system broker. A node is Debian's
``rabbitmq-server`` script run as our own child with every path and port in
its environment: node name, AMQP port on 127.0.0.1, Erlang distribution port
(loopback only), Mnesia and log directories, an empty plugin list, and
``HOME`` (where Erlang keeps its cookie), all under one directory. The
system's ``/etc/rabbitmq`` is not read. The script under
``/usr/lib/rabbitmq/bin`` is preferred: the ``/usr/sbin`` wrapper switches to
the ``rabbitmq`` user and its shared home when run as root.

The node gets its own Erlang port mapper (``epmd -port P`` in the
foreground, a child we stop by PID; ``ERL_EPMD_PORT`` points the node at it).
Left to itself, RabbitMQ's prelaunch runs a helper ``erl`` that starts
``epmd -daemon`` when no epmd answers on that port: a daemon in no process
group of ours, which outlives the broker. Two things prevent it:

1. :meth:`BrokerPlan.launch` starts the server only once our epmd answers a
   names request on its port (and is still our running child);
2. ``ERL_FLAGS=-start_epmd false`` in the node's environment, read by every
   ``erl`` the script starts (the VM, prelaunch's helper, ``rabbitmqctl``),
   so none of them ever starts an epmd. Without a running epmd the node
   fails at once ("nodistribution") instead of leaking one. The flag in the
   VM's arguments alone is not enough: the helper ``erl`` does not get them.

:meth:`BrokerPlan.launch` appends each child to the caller's list the moment
it runs, so a caller that stops that list on any way out (an error, a
timeout, Ctrl-C) leaves nothing behind. The server script runs in its own
session; it passes SIGTERM on to the VM and waits for it, and its process
group (the script, the VM and its helpers) can be killed as one.
:class:`Process` and :func:`stop_all` are a minimal such child and its stop;
the demo brings its own (``meshlayer.demo.procs.Child``); both start it as
``meshlayer.child.LoggedChild`` does.

The node is ready when its AMQP port answers a protocol header with
``Connection.Start``: the listener opens only once the boot is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from meshlayer.child import LoggedChild

HOST = "127.0.0.1"
"""Every port of the node listens here only."""
SERVER_PATHS = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/sbin/rabbitmq-server")
"""Where Debian's package puts the broker's start script (the first runs as the caller)."""
START_TIMEOUT = 30.0
"""Seconds a node gets to start its epmd and open its AMQP port."""
ERL_ARGS = (
    "+S 1 +sbwt none +sbwtdcpu none +sbwtdio none -kernel inet_dist_use_interface {127,0,0,1}"
)
"""The VM's extra arguments: one scheduler that does not busy-wait (the broker is a small
part of a busy machine), Erlang distribution on loopback only."""
ERL_FLAGS = "-start_epmd false"
"""Read by every ``erl`` of the node: none starts an epmd of its own (see the module doc)."""

EPMD_LABEL = "epmd"
SERVER_LABEL = "rabbitmq-server"


class BrokerError(RuntimeError):
    """The node did not start: a child exited, or it was not ready in time."""


class BrokerChild(Protocol):
    """A started child process, as :meth:`BrokerPlan.launch` needs it."""

    @property
    def label(self) -> str: ...

    @property
    def pid(self) -> int: ...

    def running(self) -> bool: ...

    def tail(self) -> str: ...


C = TypeVar("C", bound=BrokerChild)
Spawn = Callable[[str, list[str], dict[str, str]], C]
"""``spawn(label, argv, env)``: start a child in its own session and return it."""


@dataclass(frozen=True)
class BrokerPlan:
    """How to start one node: its tools, directory, name and ports."""

    server: str
    """The ``rabbitmq-server`` script."""
    epmd: str
    """Erlang's port mapper."""
    root: Path
    """The node's directory: Mnesia, logs, ``HOME``; emptied by :meth:`prepare`."""
    node: str
    """The Erlang node name (``name@localhost``)."""
    port: int
    """AMQP port."""
    dist_port: int
    """Erlang distribution port."""
    epmd_port: int
    """The node's own epmd."""

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}/%2F"

    @property
    def ctl(self) -> str:
        """The ``rabbitmqctl`` beside the server script."""
        return str(Path(self.server).with_name("rabbitmqctl"))

    def epmd_argv(self) -> list[str]:
        return [self.epmd, "-port", str(self.epmd_port), "-address", HOST]

    def server_argv(self) -> list[str]:
        return [self.server]

    def env(self, base_env: Mapping[str, str]) -> dict[str, str]:
        """The node's environment (and its CLI tools'): every path and port its own.

        Inherited ``RABBITMQ_*`` and ``ERL_*`` variables are dropped.
        """
        r = self.root
        env = {k: v for k, v in base_env.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(r),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS=HOST,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS=HOST,
            ERL_FLAGS=ERL_FLAGS,
            RABBITMQ_MNESIA_BASE=str(r / "mnesia"),
            RABBITMQ_LOG_BASE=str(r / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(r / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(r / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(r / "rabbitmq"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(r / "advanced.config"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=ERL_ARGS,
        )
        return env

    def prepare(self) -> None:
        """A fresh directory: no queues or messages of a previous run, no plugins."""
        if self.root.exists():
            shutil.rmtree(self.root)
        for sub in ("mnesia", "log"):
            (self.root / sub).mkdir(parents=True)
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")

    def epmd_ready(self) -> bool:
        """An epmd answers a names request on :attr:`epmd_port` (with that port number)."""
        try:
            with socket.create_connection((HOST, self.epmd_port), timeout=0.5) as s:
                s.sendall(b"\x00\x01n")  # NAMES_REQ: length 1, 'n'
                head = s.recv(4)
        except OSError:
            return False
        return len(head) == 4 and struct.unpack(">I", head)[0] == self.epmd_port

    def ready(self) -> bool:
        """The node answers an AMQP protocol header with ``Connection.Start``."""
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0) as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                head = s.recv(7)
        except OSError:
            return False
        # Frame type 1 (method) on channel 0: Connection.Start.
        return len(head) == 7 and head[0] == 1 and head[1:3] == b"\x00\x00"

    def launch(
        self,
        spawn: Spawn[C],
        children: list[C],
        *,
        base_env: Mapping[str, str] | None = None,
        timeout: float = START_TIMEOUT,
    ) -> None:
        """Prepare the directory, start epmd, wait for it, start the server, wait for AMQP.

        Each child is appended to ``children`` as soon as it runs: the caller
        stops them (last first) whatever way this returns or raises.

        Raises:
            BrokerError: a child exited, or the node was not ready in ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        self.prepare()
        env = self.env(os.environ if base_env is None else base_env)
        epmd = spawn(EPMD_LABEL, self.epmd_argv(), env)
        children.append(epmd)
        _wait(self.epmd_ready, [epmd], deadline, f"epmd on port {self.epmd_port}")
        server = spawn(SERVER_LABEL, self.server_argv(), env)
        children.append(server)
        _wait(self.ready, [epmd, server], deadline, f"RabbitMQ on port {self.port}")


def _wait(ready: Callable[[], bool], alive: list[C], deadline: float, what: str) -> None:
    while True:
        for child in alive:
            if not child.running():
                hint = " (its port taken?)" if child.label == EPMD_LABEL else ""
                raise BrokerError(
                    f"{child.label} (pid {child.pid}) exited{hint}; the end of its log:\n"
                    f"{child.tail()}"
                )
        # Ready only counts while our children run: another epmd on the port is not ours.
        if ready() and all(child.running() for child in alive):
            return
        if time.monotonic() > deadline:
            last = alive[-1]
            raise BrokerError(
                f"{what} not ready in time; the end of {last.label}'s log:\n{last.tail()}"
            )
        time.sleep(0.05)


def missing() -> str | None:
    """Why a node cannot be started here, or None when it can."""
    found = find_tools()
    return found if isinstance(found, str) else None


def find_tools() -> tuple[str, str] | str:
    """``(server, epmd)``: the start script and the port mapper, or why there are none."""
    server = next((p for p in SERVER_PATHS if os.access(p, os.X_OK)), None) or shutil.which(
        "rabbitmq-server"
    )
    if server is None:
        return "rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)"
    epmd = shutil.which("epmd") or next(
        (str(p) for p in sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))), None
    )
    if epmd is None:
        return "epmd (Erlang's port mapper, in erlang-base) is not installed"
    return server, epmd


class Process(LoggedChild):
    """A child in its own session (its process group is it and what it starts), output
    in a log in the log's directory."""

    def __init__(self, label: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        super().__init__(label, argv, log, env, cwd=log.parent)

    def tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM; after ``timeout`` s SIGKILL to its process group. Idempotent."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                # The server script's trap stops the VM and waits for it before it exits.
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                # Not reaped yet, so the group id is still ours: the script, the VM, helpers.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self.close()


def stop_all(children: Iterable[Process], timeout: float = 15.0) -> None:
    """Stop ``children`` last first: the server, then its epmd."""
    for child in reversed(list(children)):
        child.stop(timeout)
