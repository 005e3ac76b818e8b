"""A child process in its own session, its output in a log file.

Its own session: a Ctrl-C in the terminal reaches the parent only, which stops
its children itself, and the child's process group (it and whatever it starts,
e.g. a broker script's Erlang VM) can be killed as one by its PID. The broker
starter (``meshlayer.rabbitmq.Process``) and the demo (``meshlayer.demo.procs.Child``)
build on this; each stops its children its own way.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import IO


class LoggedChild:
    """``argv`` started with stdout and stderr in ``log`` (truncated), no stdin."""

    def __init__(
        self,
        label: str,
        argv: list[str],
        log: Path,
        env: dict[str, str],
        cwd: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.label = label
        self.log = log
        self._fh: IO[bytes] = log.open("wb")
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            cwd=None if cwd is None else str(cwd),
            env=env,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        """What the child has written so far ("" when the log cannot be read)."""
        if not self._fh.closed:
            self._fh.flush()
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Close the parent's handle on the log (the child's own stays open)."""
        self._fh.close()
