"""``meshlayer demo``: a small shop on the mesh, run by its control plane.

What runs (each a process of its own, all on 127.0.0.1)::

                  meshlayer control  (store: SQLite, .meshlayer/demo/control.db)
                         ▲  every sidecar registers, watches, acknowledges
    curl / load generator│
          │  Host: frontend
          ▼
    edge sidecar ──► frontend sidecar ──► frontend app
                                             │ GET http://catalog/items, http://reviews/reviews/ID
                                             ▼ (through the frontend sidecar's outbound listener)
           HTTPRoute catalog-split: /items ─┬─ 80 ─► catalog-v1 ─┬─► catalog-v1-1 sidecar ─► app
           (x-canary: 1 → catalog-v2)       │                    └─► catalog-v1-2 sidecar ─► app
                                            └─ 20 ─► catalog-v2 ───► catalog-v2-1 sidecar ─► app
                                                     reviews ──────► reviews-1 sidecar ─► app

The control plane starts first; the demo writes the mesh config to
``mesh.yaml`` and applies it through the API (:mod:`meshlayer.demo.mesh`).
Sidecars have no config file: each runs with ``--control`` and its own
``--state-dir``, registers its inbound listener and applies the snapshots
the control plane pushes; the apps only know service names.

Port layout, from ``--port-base`` B (default 18000): the control plane
listens on B+9; instance ``i`` owns the block ``B + 10*i`` and uses its
first four ports::

    i  instance       service      +0 outbound   +1 inbound   +2 app     +3 admin
    0  edge           edge         B+0 (entry)   B+1          (unused)   B+3
    1  frontend-1     frontend     B+10          B+11         B+12       B+13
    2  catalog-v1-1   catalog-v1   B+20          B+21         B+22       B+23
    3  catalog-v1-2   catalog-v1   B+30          B+31         B+32       B+33
    4  catalog-v2-1   catalog-v2   B+40          B+41         B+42       B+43
    5  reviews-1      reviews      B+50          B+51         B+52       B+53

So with the defaults the control plane is ``http://127.0.0.1:18009``, the
entry point ``http://127.0.0.1:18000`` (the edge sidecar's outbound
listener), and e.g. catalog-v2-1's sidecar admin is
``http://127.0.0.1:18043/metrics``. All these ports must be free.

The state directory ``./.meshlayer/demo/`` holds ``mesh.yaml``, the control
plane's ``control.db``, one ``sidecar-<instance>/`` state directory per
sidecar, and one log per process (``control.log``, ``<instance>.log`` for
apps, ``<instance>-sidecar.log`` for sidecars). Each run starts from a fresh
database and empty sidecar state: the demo's config is re-applied anyway,
and neither the previous run's registrations (they would show as sidecars
that never catch up) nor a sidecar's saved snapshot of a previous mesh
(whose version numbers mean nothing to the new database) may leak into it.

Flow: check ports, start the control plane and wait for ``/healthz``, write
and apply ``mesh.yaml``, start the apps and sidecars, wait for each app's
``/healthz`` and each sidecar's ``/ready``, then for every sidecar to be
registered and at the current mesh version (``GET /v1/status``); send
``--requests`` requests with ``--concurrency`` clients through the edge;
print per service (from the sidecars' inbound metrics) requests, success rate
(status below 500) and p50/p99, the same end to end from the load generator,
the control plane's state, and the catalog split by version and replica.
Then, unless ``--exit``, say where to point curl and the CLI and stay up
until Ctrl-C or SIGTERM. Every child is stopped by its PID (SIGTERM, SIGKILL
if it lingers), the control plane last. Exit code: 0; 1 if something failed
to start or died, or (with ``--exit``) if any request failed or a sidecar was
not at the current mesh version; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from meshlayer.cli.client import ADMIN_ENV, CLIError, ControlAPI, admin_token
from meshlayer.demo.layout import (
    ADMIN_TOKEN_NAME,
    CONFIG_NAME,
    DB_NAME,
    EDGE,
    INSTANCES,
    PORT_SPAN,
    ROWS,
    STATE_DIR,
    Instance,
    busy_ports,
    control_port,
    expected_sidecars,
    mesh_port,
)
from meshlayer.demo.load import LoadGenerator, LoadResult, RouteStats
from meshlayer.demo.mesh import MeshStatus, apply_file, render_mesh, wait_in_sync
from meshlayer.demo.procs import HOST, Child, child_env, http_get, stop_children
from meshlayer.demo.report import render_howto, render_table

READY_TIMEOUT = 20.0
"""Seconds each process gets to become ready (and the sidecars to get in sync)."""
SIDECAR_GRACE = 3.0
"""``--grace`` of the demo's sidecars (nothing is in flight when they stop)."""


class Stop(Exception):
    """SIGTERM (or SIGINT) asked the demo to stop."""


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


def app_argv(inst: Instance, base: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meshlayer.demo.services",
        inst.app,
        "--port",
        str(inst.app_port(base)),
        "--replica",
        inst.name,
        "--outbound",
        f"{HOST}:{inst.outbound(base)}",
    ]


def sidecar_argv(inst: Instance, base: int, control_url: str, state_dir: Path) -> list[str]:
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
        "--admin",
        f"{HOST}:{inst.admin(base)}",
        "--control",
        control_url,
        "--state-dir",
        str(state_dir),
        "--grace",
        str(SIDECAR_GRACE),
    ]


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

    def __init__(self, base: int, state: Path, out: IO[str]) -> None:
        self.base = base
        self.state = state
        self.out = out
        self.config = state / CONFIG_NAME
        self.store = f"sqlite:{state / DB_NAME}"
        self.control_url = f"http://{HOST}:{control_port(base)}"
        self.api = ControlAPI(self.control_url, timeout=5.0)
        self.control: Child | None = None
        self.children: list[tuple[Instance, str, Child]] = []
        self._env = child_env()

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def all_children(self) -> list[Child]:
        """Every process started, the control plane last."""
        out = [child for _, _, child in self.children]
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
        what = " and ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items())
        self.say(f"mesh version {answer.get('version')} ({what})")

    def wait_in_sync(self) -> MeshStatus:
        expected = expected_sidecars(self.base)
        self.say(
            f"waiting for the {len(expected)} sidecars to register and apply "
            "the current mesh version ... ",
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
        """The control plane's line of the table, and whether every sidecar is in sync.

        Sidecars behind get ``settle`` seconds to catch up (a health check may just
        have changed the mesh), as ``meshlayer check`` does.
        """
        expected = expected_sidecars(self.base)
        try:
            status, ok = wait_in_sync(self.api, expected, settle)
        except CLIError as e:
            return f"{self.control_url}  unreachable: {e.message}", False
        return status.line(self.control_url, expected), ok

    # -- apps and sidecars ------------------------------------------------------------

    def start_all(self) -> None:
        for inst in INSTANCES:
            if inst.has_app:
                argv = app_argv(inst, self.base)
                log = self.state / f"{inst.name}.log"
                self.children.append((inst, "app", Child(f"{inst.name} app", argv, log, self._env)))
            state_dir = self.state / f"sidecar-{inst.name}"
            argv = sidecar_argv(inst, self.base, self.control_url, state_dir)
            log = self.state / f"{inst.name}-sidecar.log"
            env = {**self._env, "MESHLAYER_TOKEN": self.join_token(inst.service)}
            child = Child(f"{inst.name} sidecar", argv, log, env)
            self.children.append((inst, "sidecar", child))

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
                where = f"entry :{inst.outbound(b)}, sidecar admin :{inst.admin(b)}"
            self.say(f"starting {inst.name:<12} ({where}) ... ", end="")
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

    def scrape(self) -> dict[str, RouteStats]:
        """Inbound stats of every app instance, from its sidecar, by instance name."""
        stats = {}
        for inst in INSTANCES:
            if not inst.has_app:
                continue
            status, body = http_get(inst.admin(self.base), "/metrics", timeout=5.0)
            if status != 200:
                raise DemoError(f"{inst.name} sidecar: GET /metrics answered {status}")
            stats[inst.name] = RouteStats.from_metrics(body.decode(errors="replace"), inst.service)
        return stats

    def stop_all(self) -> int:
        """Stop every child by PID: apps and sidecars first (the sidecars deregister),
        then the control plane. The number of processes that were still running."""
        running = sum(1 for child in self.all_children() if child.running())
        stop_children([child for _, _, child in self.children], self.say)
        if self.control is not None:
            stop_children([self.control], self.say)
        return running

    def run_load(self, total: int, concurrency: int) -> tuple[dict[str, RouteStats], LoadResult]:
        before = self.scrape()
        gen = LoadGenerator(EDGE.outbound(self.base), total, concurrency)
        self.say(
            f"sending {total} requests through the edge to the frontend, "
            f"{gen.concurrency} concurrent clients"
        )
        tty = self.out.isatty()
        shown = [0]

        def tick(done: int) -> None:
            if tty:
                self.say(f"\r  {done}/{total} ({done * 100 // total}%)", end="")
            else:
                quarter = done * 4 // total
                while shown[0] < quarter:
                    shown[0] += 1
                    self.say(f"  {total * shown[0] // 4}/{total} ({shown[0] * 25}%)")

        gen.start()
        try:
            result = gen.wait(tick)
        except BaseException:
            gen.stop()
            raise
        tick(gen.done)
        if tty:
            self.say()
        # The last answers are counted by the sidecars as they finish: settle briefly.
        deadline = time.monotonic() + 2.0
        while True:
            after = self.scrape()
            frontend = sum((after[i] - before[i]).total for i in after if i.startswith("frontend"))
            if frontend >= result.ok or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return {name: after[name] - before[name] for name in after}, result

    def stay_up(self) -> None:
        """Until a signal: report children that exit (say, a replica killed to try the mesh)."""
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


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def run_demo_cli(args: argparse.Namespace) -> int:
    """Run the demo as ``meshlayer demo`` does; the exit code."""
    base: int = args.port_base
    total: int = args.requests
    concurrency: int = args.concurrency
    if total < 1 or concurrency < 1:
        print("meshlayer demo: --requests and --concurrency must be at least 1", file=sys.stderr)
        return 2
    if not 1024 <= base <= 65535 - PORT_SPAN:
        print(
            f"meshlayer demo: --port-base must be 1024-{65535 - PORT_SPAN} "
            f"(the demo uses ports BASE to BASE+{PORT_SPAN - 1})",
            file=sys.stderr,
        )
        return 2
    busy = busy_ports(base)
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
    demo = Demo(base, state, sys.stdout)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        demo.start_control()
        demo.apply_config()
        demo.start_all()
        demo.wait_ready()
        demo.wait_in_sync()
        per_instance, load = demo.run_load(total, concurrency)
        demo.check_children()
        per_row = {
            row: sum((per_instance[i.name] for i in INSTANCES if i.app == row), RouteStats())
            for row in ROWS
        }
        catalog = {i.name: per_instance[i.name].total for i in INSTANCES if i.app == "catalog"}
        control, in_sync = demo.control_line()
        demo.say()
        demo.say(render_table(per_row, catalog, load, control))
        demo.say()
        if args.exit:
            code = 0 if load.ok == load.total and in_sync else 1
        else:
            demo.say(render_howto(base, state, demo.control_url, demo.app_pid("catalog-v1-1")))
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
