"""``meshlayer demo``: a shop on the mesh behind its gateway, under mixed load, live.

What runs (each a process of its own, all on 127.0.0.1)::

                    meshlayer control  (store: SQLite, .meshlayer/demo/control.db)
                           ▲  the gateway and every sidecar register, watch, acknowledge
   shoppers (critical) ─┐  │
   crawler  (batch)  ───┼─► meshlayer gateway ──► frontend ─┬─► catalog
   reorder job (batch) ─┘   ClassificationRules             ├─► cart
                            stamp x-meshlayer-priority      ├─► recommendations (2 at once)
                                                            └─► checkout ─┬─► payment
                                                                          ├─► inventory
                                                 rabbitmq-server ◄────────┘ queue "emails"
                                                        └─────────────────► email worker

Every app has its own sidecar (``--control``, its own ``--state-dir``, a join
token: mTLS between them); apps call each other by service name through their
sidecar's outbound listener and forward the class of the request they serve
(:mod:`meshlayer.demo.services`). The gateway gives each request its class
from the rules in ``mesh.yaml`` (:mod:`meshlayer.demo.mesh`): shoppers'
pages ``critical``, the crawler and the reorder job ``batch``. The
recommendations sidecar admits two requests at once to its app; past that
it queues by class and sheds ``batch`` first. Checkout hands emails to the
demo's own RabbitMQ (:mod:`meshlayer.demo.broker`) at the class's priority.

Port layout, from ``--port-base`` B (default 18000): the control plane
listens on B+9 (its mTLS listener on B+8), RabbitMQ on B+5 (AMQP), B+6
(distribution) and B+7 (its epmd). Instance ``i`` owns the block
``B + 10*i`` and uses its first four ports::

    i  instance            +0 outbound   +1 inbound   +2 app     +3 admin
    0  gateway             B+0 (entry)   -            -          B+3
    1  frontend-1          B+10          B+11         B+12       B+13
    2  catalog-1           B+20          B+21         B+22       B+23
    3  cart-1              B+30 ...
    4  recommendations-1   B+40 ...
    5  checkout-1          B+50 ...
    6  payment-1           B+60 ...
    7  inventory-1         B+70 ...
    8  email-1             B+80          B+81         B+82       B+83

So with the defaults the entry point is ``http://127.0.0.1:18000`` (the
gateway), the control plane ``http://127.0.0.1:18009``, and e.g. the
recommendations sidecar's admin ``http://127.0.0.1:18043/metrics``. All
these ports must be free.

The state directory ``./.meshlayer/demo/`` holds ``mesh.yaml``, the control
plane's ``control.db``, one ``sidecar-<instance>/`` state directory per
sidecar, ``rabbitmq/`` and one log per process (``control.log``,
``<instance>.log`` for apps, ``<instance>-sidecar.log`` for sidecars,
``gateway.log``, ``rabbitmq.log``). Each run starts from a fresh database,
empty sidecar state and an empty broker.

Flow: check ports, start the control plane, apply ``mesh.yaml``, start the
broker, the apps, their sidecars and the gateway, wait for each to be ready
and for every sidecar to be at the current mesh version; then send the mixed
load (:mod:`meshlayer.demo.load`) and show the live view
(:mod:`meshlayer.demo.view`) every ``--interval`` seconds: on a terminal,
redrawn like ``top`` with where to point curl below it, until Ctrl-C (or
``--duration`` seconds, then the summary, and the demo stays up); elsewhere
one line per few seconds. ``--priority off`` runs the sidecars FIFO, for
comparison. With ``--exit`` the demo prints the summary after
``--duration`` seconds and stops. Every child is stopped by its PID
(SIGTERM, SIGKILL if it lingers), the control plane last.

Exit code: 0; 1 if something failed to start or died, or (with ``--exit``)
if a sidecar was not at the current mesh version or, with priority on, under
95% of the critical requests succeeded; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from meshlayer.cli.client import ADMIN_ENV, CLIError, ControlAPI, admin_token
from meshlayer.demo.broker import START_TIMEOUT, BrokerPlan, find_broker
from meshlayer.demo.layout import (
    ADMIN_TOKEN_NAME,
    CONFIG_NAME,
    DB_NAME,
    GATEWAY,
    INSTANCES,
    PORT_SPAN,
    STATE_DIR,
    Instance,
    busy_ports,
    control_port,
    mesh_port,
)
from meshlayer.demo.load import LoadGenerator, LoadPlan, Schedule
from meshlayer.demo.mesh import MeshStatus, apply_file, render_mesh, wait_in_sync
from meshlayer.demo.procs import HOST, Child, child_env, http_get, stop_children
from meshlayer.demo.report import render_howto, status_line
from meshlayer.demo.view import Monitor, render_live, render_summary
from meshlayer.rabbitmq import BrokerError

READY_TIMEOUT = 20.0
"""Seconds each process gets to become ready (and the sidecars to get in sync)."""
SIDECAR_GRACE = 3.0
"""``--grace`` of the demo's sidecars (nothing is in flight when they stop)."""
RECS_WORKERS = 2
"""The recommendations app's workers (its sidecar admits as many at once)."""
RECS_WORK_MS = 25.0
"""Milliseconds per recommendation: capacity RECS_WORKERS / RECS_WORK_MS, 80 per second."""
EMAIL_WORK_MS = 40.0
"""Milliseconds per email sent: the worker's capacity is 25 emails per second."""
CRITICAL_OK = 0.95
"""With ``--exit``: the share of critical requests that must succeed for exit code 0."""
CLEAR = "\x1b[H\x1b[2J"


class Stop(Exception):
    """SIGTERM, SIGINT (Ctrl-C) or SIGHUP (the terminal closed) asked the demo to stop."""


class DemoError(Exception):
    """Something the user should read; the demo stops and exits 1."""


# -- processes ------------------------------------------------------------------------


def control_argv(base: int, store: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meshlayer",
        "control",
        "--listen",
        f"{HOST}:{control_port(base)}",
        "--store",
        store,
        "--listen-mtls",
        f"{HOST}:{mesh_port(base)}",
    ]


def app_argv(inst: Instance, base: int, amqp_url: str | None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "meshlayer.demo.services",
        inst.service,
        "--port",
        str(inst.app_port(base)),
        "--replica",
        inst.name,
        "--outbound",
        f"{HOST}:{inst.outbound(base)}",
    ]
    if inst.service == "recommendations":
        argv += ["--workers", str(RECS_WORKERS), "--work-ms", str(RECS_WORK_MS)]
    if inst.service == "email":
        argv += ["--work-ms", str(EMAIL_WORK_MS), "--prefetch", "1"]
    if inst.service in ("checkout", "email") and amqp_url:
        argv += ["--amqp", amqp_url]
    return argv


def sidecar_argv(
    inst: Instance, base: int, control_url: str, state_dir: Path, priority: bool = True
) -> list[str]:
    """``priority`` False: the sidecars run ``--priority off`` (FIFO; the gateway still
    classifies, and the class is still carried)."""
    common = [
        "--admin",
        f"{HOST}:{inst.admin(base)}",
        "--control",
        control_url,
        "--state-dir",
        str(state_dir),
        "--grace",
        str(SIDECAR_GRACE),
    ]
    if not inst.has_app:  # the gateway
        return [
            sys.executable,
            "-m",
            "meshlayer",
            "gateway",
            "--name",
            inst.service,
            "--listen",
            f"{HOST}:{inst.outbound(base)}",
            *common,
        ]
    return [
        sys.executable,
        "-m",
        "meshlayer",
        "sidecar",
        "--service",
        inst.service,
        "--app",
        f"{HOST}:{inst.app_port(base)}",
        "--inbound",
        f"{HOST}:{inst.inbound(base)}",
        "--outbound",
        f"{HOST}:{inst.outbound(base)}",
        *common,
        *([] if priority else ["--priority", "off"]),
    ]


def expected_sidecars(base: int) -> dict[str, str]:
    """Address each sidecar registers → instance name (the gateway registers its listener)."""
    out = {}
    for inst in INSTANCES:
        port = inst.inbound(base) if inst.has_app else inst.outbound(base)
        out[f"{HOST}:{port}"] = inst.name
    return out


def fresh_state(state: Path) -> None:
    """Remove what a previous run left that would leak into this one: the control
    plane's database and the sidecars' saved snapshots (logs are overwritten)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            (state / (DB_NAME + suffix)).unlink()
    for inst in INSTANCES:
        sidecar_state = state / f"sidecar-{inst.name}"
        if sidecar_state.is_dir():
            for f in sidecar_state.iterdir():
                if f.name.endswith(".json") or f.name.endswith(".tmp"):
                    f.unlink()


# -- the demo -------------------------------------------------------------------------


class Demo:
    """The demo's children and what it knows about them."""

    def __init__(self, base: int, state: Path, out: IO[str], priority: bool = True) -> None:
        self.base = base
        self.priority = priority
        self.state = state
        self.out = out
        self.config = state / CONFIG_NAME
        self.store = f"sqlite:{state / DB_NAME}"
        self.control_url = f"http://{HOST}:{control_port(base)}"
        self.api = ControlAPI(self.control_url, timeout=5.0)
        self.control: Child | None = None
        self.broker: list[Child] = []
        self.amqp_url: str | None = None
        self.broker_note = ""
        self.children: list[tuple[Instance, str, Child]] = []
        self.interrupted: str | None = None
        """The signal that ended the load early (the summary is printed, then the demo stops)."""
        self._env = child_env()

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def all_children(self) -> list[Child]:
        """Every process started: apps and sidecars, the broker, the control plane last."""
        out = [child for _, _, child in self.children] + list(reversed(self.broker))
        return out + ([self.control] if self.control is not None else [])

    # -- the control plane ------------------------------------------------------------

    def start_control(self) -> None:
        self.say(f"starting control plane ({self.control_url}, store {self.store}) ... ", end="")
        started = time.monotonic()
        argv = control_argv(self.base, self.store)
        self.control = Child("control plane", argv, self.state / "control.log", self._env)
        self._wait(self.control, control_port(self.base), "/healthz")
        self.api.admin_token = admin_token(None) if os.environ.get(ADMIN_ENV) else None
        if self.api.admin_token is None:
            with contextlib.suppress(OSError):
                self.api.admin_token = (self.state / ADMIN_TOKEN_NAME).read_text().strip()
        self.say(f"ready ({time.monotonic() - started:.1f}s)")

    def apply_config(self) -> None:
        self.config.write_text(render_mesh(self.control_url, str(self.config)))
        self.say(f"applying {self.config} through the API ... ", end="")
        try:
            answer = apply_file(self.api, self.config)
        except CLIError as e:
            self.say("failed")
            raise DemoError(f"the control plane refused {self.config}: {e.message}") from None
        results = answer.get("results") or []
        counts = Counter(str(r.get("kind")) for r in results)
        what = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items())
        self.say(f"mesh version {answer.get('version')} ({what})")

    def wait_in_sync(self) -> MeshStatus:
        expected = expected_sidecars(self.base)
        self.say(
            f"waiting for the gateway and the {len(expected) - 1} sidecars to register and "
            "apply the current mesh version ... ",
            end="",
        )
        started = time.monotonic()
        try:
            status, ok = wait_in_sync(self.api, expected, READY_TIMEOUT, self.check_children)
        except CLIError as e:
            self.say("failed")
            raise DemoError(e.message) from None
        if not ok:
            self.say("failed")
            raise DemoError(
                f"sidecars not in sync after {READY_TIMEOUT:.0f}s (mesh version {status.version}): "
                + "; ".join(status.lagging(expected))
                + f"; see {self.state}{os.sep}*-sidecar.log and control.log"
            )
        self.say(
            f"{len(expected)}/{len(expected)} at version {status.version} "
            f"({time.monotonic() - started:.1f}s)"
        )
        return status

    def control_line(self, settle: float = 3.0) -> tuple[str, bool]:
        """The control plane's line, and whether every sidecar is in sync (``settle``
        seconds to catch up, as ``meshlayer check`` gives)."""
        expected = expected_sidecars(self.base)
        try:
            status, ok = wait_in_sync(self.api, expected, settle)
        except CLIError as e:
            return f"{self.control_url}  unreachable: {e.message}", False
        return status.line(self.control_url, expected), ok

    # -- the broker -------------------------------------------------------------------

    def start_broker(self, enabled: bool) -> None:
        plan = find_broker(self.base, self.state / "rabbitmq") if enabled else "--no-broker"
        if not isinstance(plan, BrokerPlan):
            self.broker_note = f"no RabbitMQ ({plan}): checkout queues no emails"
            self.say(f"RabbitMQ: not started, {plan}; the shop runs without emails")
            return
        self.say(f"starting RabbitMQ ({plan.url.split('@')[-1]}, own epmd) ... ", end="")
        started = time.monotonic()
        logs = {"epmd": "epmd.log", "rabbitmq-server": "rabbitmq.log"}

        def spawn(label: str, argv: list[str], env: dict[str, str]) -> Child:
            return Child(label, argv, self.state / logs.get(label, f"{label}.log"), env)

        try:
            # epmd, then (once it answers) the server; each child lands in self.broker as
            # soon as it runs, so stop_all stops it whatever happens here.
            plan.launch(spawn, self.broker, base_env=self._env, timeout=START_TIMEOUT)
        except BrokerError as e:
            self.say("failed")
            raise DemoError(str(e)) from None
        self.amqp_url = plan.url
        self.say(f"ready ({time.monotonic() - started:.1f}s)")

    # -- apps and sidecars ------------------------------------------------------------

    def start_all(self) -> None:
        for inst in INSTANCES:
            if inst.has_app:
                argv = app_argv(inst, self.base, self.amqp_url)
                log = self.state / f"{inst.name}.log"
                self.children.append((inst, "app", Child(f"{inst.name} app", argv, log, self._env)))
            state_dir = self.state / f"sidecar-{inst.name}"
            argv = sidecar_argv(inst, self.base, self.control_url, state_dir, self.priority)
            log = self.state / (f"{inst.name}-sidecar.log" if inst.has_app else "gateway.log")
            env = {**self._env, "MESHLAYER_TOKEN": self.join_token(inst.service)}
            label = f"{inst.name} sidecar" if inst.has_app else "gateway"
            self.children.append((inst, "sidecar", Child(label, argv, log, env)))

    def join_token(self, service: str) -> str:
        """A join token for one sidecar of ``service`` (it proves who it is with it)."""
        try:
            answer = self.api.expect("POST", "/v1/tokens", {"service": service, "ttl": 300})
        except CLIError as e:
            raise DemoError(f"the control plane refused a join token: {e.message}") from None
        return str(answer["token"])

    def wait_ready(self) -> None:
        for inst in INSTANCES:
            b = self.base
            if inst.has_app:
                where = (
                    f"app :{inst.app_port(b)}, sidecar in :{inst.inbound(b)} "
                    f"out :{inst.outbound(b)} admin :{inst.admin(b)}"
                )
            else:
                where = f"entry :{inst.outbound(b)}, admin :{inst.admin(b)}"
            self.say(f"starting {inst.name:<17} ({where}) ... ", end="")
            started = time.monotonic()
            for i, kind, child in self.children:
                if i is inst:
                    port = inst.app_port(b) if kind == "app" else inst.admin(b)
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
        for child in self.all_children():
            if not child.running():
                raise DemoError(
                    f"{child.label} (pid {child.pid}) exited with code {child.popen.returncode}; "
                    f"the end of {child.log}:\n{child.tail()}"
                )

    def stop_all(self) -> int:
        """Stop every child by PID: apps, sidecars and gateway first (they deregister),
        then the broker and its epmd, then the control plane. How many were running."""
        running = sum(1 for child in self.all_children() if child.running())
        stop_children([child for _, _, child in self.children], self.say)
        for child in reversed(self.broker):
            stop_children([child], self.say)
        if self.control is not None:
            stop_children([self.control], self.say)
        return running

    # -- load and the live view -------------------------------------------------------

    def run_load(
        self, plan: LoadPlan, duration: float | None, interval: float, howto: str
    ) -> Monitor:
        """Send the mixed load for ``duration`` seconds (None: until a signal), showing
        the live view every ``interval`` seconds. Returns the monitor (for the summary)."""
        mon = Monitor(self.base)
        mon.sample()  # the baseline: everything before the load
        gen = LoadGenerator(GATEWAY.outbound(self.base), plan, duration)
        mon.load = gen
        tty = self.out.isatty()
        what = (
            f"{plan.users} shoppers (critical); crawler {plan.crawl_rate:g}/s and reorder job "
            f"{plan.reorder_rate:g}/s (batch), from {plan.schedule.calm:g}s"
            + (
                f", {plan.schedule.on:g}s on / {plan.schedule.off:g}s off"
                if plan.schedule.off > 0
                else ""
            )
        )
        mode = "" if self.priority else "; sidecars --priority off (FIFO)"
        self.say(f"sending load through the gateway: {what}{mode}")
        if self.broker_note:
            self.say(self.broker_note)
        gen.start()
        last_line = 0.0
        gone: dict[int, str] = {}
        try:
            while not gen.done() and self.interrupted is None:
                time.sleep(max(0.05, interval - (time.monotonic() - mon.samples[-1].at)))
                self.note_exits(gone)
                mon.sample()
                t = gen.elapsed
                phase = "batch ON" if gen.batch_on() else "batch off"
                if not self.priority:
                    phase += "   sidecars FIFO (--priority off)"
                if tty:
                    until = f" of {duration:.0f}s" if duration else ""
                    header = (
                        f"meshlayer demo   up {t:.0f}s{until}   {phase}   "
                        f"(redrawn every {interval:g}s; Ctrl-C stops)"
                    )
                    if gone:
                        header += "\n" + "; ".join(gone.values())
                    frame = render_live(mon, header, howto)
                    self.say(CLEAR + fit_terminal(frame), end="")
                elif t - last_line >= 5.0 or gen.done():
                    last_line = t
                    self.say(status_line(mon, t, phase))
        except Stop as e:  # Ctrl-C: the summary of what ran, then stop
            self.interrupted = str(e)
        finally:
            gen.join()
        time.sleep(0.5)  # the last answers are counted as they finish
        mon.sample()
        if tty:
            self.say(CLEAR, end="")
        return mon

    def note_exits(self, gone: dict[int, str]) -> None:
        """Children that exited while the load runs (say, an app killed to try the mesh),
        by PID: the view says so and the load goes on (with ``--exit`` the demo fails
        after the summary)."""
        for child in self.all_children():
            if child.pid not in gone and not child.running():
                gone[child.pid] = (
                    f"{child.label} (pid {child.pid}) exited with code {child.popen.returncode}"
                )
                if not self.out.isatty():
                    self.say(gone[child.pid])

    def stay_up(self) -> None:
        """Until a signal: report children that exit (say, an app killed to try the mesh)."""
        gone: set[int] = set()
        children = self.all_children()
        while True:
            for child in children:
                if child.pid not in gone and not child.running():
                    gone.add(child.pid)
                    rest = (
                        "the sidecars keep serving their last config"
                        if child is self.control
                        else "the rest keeps running"
                    )
                    self.say(
                        f"{child.label} (pid {child.pid}) exited with code "
                        f"{child.popen.returncode}; {rest} (log: {child.log})"
                    )
            if len(gone) == len(children):
                raise DemoError("every process of the demo has exited")
            time.sleep(0.5)

    def app_pid(self, name: str) -> int:
        for inst, kind, child in self.children:
            if inst.name == name and kind == "app":
                return child.pid
        raise KeyError(name)


def fit_terminal(frame: str) -> str:
    """The frame cut to the terminal's height (the curl hints at its end go first)."""
    rows = shutil.get_terminal_size((100, 50)).lines
    lines = frame.splitlines()
    if len(lines) < rows:
        return frame
    return "\n".join([*lines[: max(1, rows - 2)], "(a taller terminal shows more)"])


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def load_plan(args: argparse.Namespace, duration: float | None) -> LoadPlan:
    return LoadPlan(
        users=args.users,
        crawl_rate=args.crawl_rate,
        reorder_rate=args.reorder_rate,
        schedule=Schedule.for_duration(duration or 0.0),
    )


def run_demo_cli(args: argparse.Namespace) -> int:
    """Run the demo as ``meshlayer demo`` does; the exit code."""
    base: int = args.port_base
    duration: float | None = args.duration if args.duration and args.duration > 0 else None
    if args.exit and duration is None:
        print("meshlayer demo: --exit needs --duration SECONDS", file=sys.stderr)
        return 2
    if args.users < 0 or args.crawl_rate < 0 or args.reorder_rate < 0 or args.interval <= 0:
        print(
            "meshlayer demo: --users, --crawl-rate and --reorder-rate must be at least 0, "
            "--interval positive",
            file=sys.stderr,
        )
        return 2
    if not 1024 <= base <= 65535 - PORT_SPAN:
        print(
            f"meshlayer demo: --port-base must be 1024-{65535 - PORT_SPAN} "
            f"(the demo uses ports BASE to BASE+{PORT_SPAN - 1})",
            file=sys.stderr,
        )
        return 2
    busy = busy_ports(base, with_broker=args.broker)
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
    fresh_state(state)
    demo = Demo(base, state, sys.stdout, priority=args.priority == "on")
    previous = {
        sig: signal.signal(sig, _raise_stop)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    code = 0
    try:
        demo.start_control()
        demo.apply_config()
        demo.start_broker(args.broker)
        demo.start_all()
        demo.wait_ready()
        demo.wait_in_sync()
        howto = render_howto(base, state, demo.control_url, demo.app_pid("recommendations-1"))
        mon = demo.run_load(load_plan(args, duration), duration, args.interval, howto)
        control, in_sync = demo.control_line()
        demo.say()
        demo.say(render_summary(mon))
        demo.say()
        demo.say(f"  control plane  {control}")
        demo.say()
        if demo.interrupted is not None:
            demo.say(f"{demo.interrupted} received: stopping the demo")
        elif args.exit:
            demo.check_children()  # a child that died fails the run
            critical = mon.load.rec.snapshot()["critical"] if mon.load else None
            ok = critical is not None and critical.ok >= CRITICAL_OK * critical.total
            code = 0 if (ok or not demo.priority) and in_sync else 1
        else:
            demo.say(howto)
            demo.stay_up()
    except Stop as e:
        demo.say(f"\n{e} received: stopping the demo")
    except DemoError as e:
        print(f"meshlayer demo: {e}", file=sys.stderr)
        code = 1
    finally:
        for sig in previous:  # no second interruption halfway through the cleanup
            signal.signal(sig, signal.SIG_IGN)
        stopped = demo.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stopped:
            demo.say(f"stopped {stopped} processes (the control plane last)")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshlayer.demo.run``: the same as ``meshlayer demo``."""
    from meshlayer.cli.main import main as cli_main

    return cli_main(["demo", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
