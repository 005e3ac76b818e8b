"""A small synchronous client for the control plane's JSON API, for the CLI.

Every failure becomes a :class:`CLIError` carrying the message to print and
the exit code: 1 for runtime failures (unreachable, conflict, not found),
2 for invalid input the server refused (400).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

DEFAULT_URL = "http://127.0.0.1:15000"
ENV_VAR = "MESHLAYER_CONTROL"
ADMIN_ENV = "MESHLAYER_ADMIN_TOKEN"
ADMIN_FILE_ENV = "MESHLAYER_ADMIN_TOKEN_FILE"
ADMIN_FILE = ".meshlayer/admin-token"


@dataclass(frozen=True)
class AdminToken:
    """The admin token the CLI found (None: none), and where it came from or where
    it was looked for (for the message of a 401)."""

    token: str | None
    source: str


def find_admin_token(flag: str | None, file_flag: str | None = None) -> AdminToken:
    """``--admin-token``, else ``$MESHLAYER_ADMIN_TOKEN``, else the file
    ``--admin-token-file`` / ``$MESHLAYER_ADMIN_TOKEN_FILE`` / ``./.meshlayer/admin-token``
    (the control plane writes it next to its SQLite file and logs where)."""
    if flag and flag.strip():
        return AdminToken(flag.strip(), "--admin-token")
    env = os.environ.get(ADMIN_ENV, "").strip()
    if env:
        return AdminToken(env, f"${ADMIN_ENV}")
    if file_flag:
        name, how = file_flag, "--admin-token-file "
    elif os.environ.get(ADMIN_FILE_ENV, "").strip():
        name, how = os.environ[ADMIN_FILE_ENV].strip(), f"${ADMIN_FILE_ENV}="
    else:
        name, how = ADMIN_FILE, "the default file "
    where = f"{how}{Path(name).expanduser().absolute()}"
    try:
        text = Path(name).expanduser().read_text().strip()
    except FileNotFoundError:
        return AdminToken(None, f"{where} (no such file)")
    except OSError as exc:
        return AdminToken(None, f"{where} ({exc.strerror or exc})")
    return AdminToken(text, where) if text else AdminToken(None, f"{where} (empty)")


def admin_token(flag: str | None, file_flag: str | None = None) -> str | None:
    """The admin token (see :func:`find_admin_token`), or None."""
    return find_admin_token(flag, file_flag).token


def add_admin_flags(p: argparse.ArgumentParser) -> None:
    """``--admin-token`` and ``--admin-token-file`` on a command that may write."""
    p.add_argument(
        "--admin-token",
        metavar="TOKEN",
        default=None,
        help=f"the control plane's admin token, needed for writes (default: ${ADMIN_ENV}, "
        "else read from --admin-token-file)",
    )
    p.add_argument(
        "--admin-token-file",
        metavar="PATH",
        default=None,
        help="file holding the admin token: the control plane writes `admin-token` next to "
        f"its SQLite file and logs the path (default: ${ADMIN_FILE_ENV}, else {ADMIN_FILE})",
    )


def api_from_args(args: argparse.Namespace) -> ControlAPI:
    """A client for ``--control`` with ``--timeout`` and the admin token flags."""
    found = find_admin_token(
        getattr(args, "admin_token", None), getattr(args, "admin_token_file", None)
    )
    api = ControlAPI(args.control or default_url(), args.timeout, found.token)
    api.admin_source = found.source
    return api


def default_url() -> str:
    """``$MESHLAYER_CONTROL``, else the default local control plane."""
    return os.environ.get(ENV_VAR) or DEFAULT_URL


class CLIError(Exception):
    """A message for the user and the exit code to leave with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class ControlAPI:
    """Calls to one control plane; one connection per call."""

    def __init__(self, url: str, timeout: float = 10.0, admin_token: str | None = None) -> None:
        self.admin_token = admin_token
        self.admin_source = ""
        """Where the admin token came from, or where the CLI looked for one."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise CLIError(f"--control {url!r}: must be an http://HOST:PORT URL", 2)
        try:
            self.port = parts.port or 80
        except ValueError as exc:
            raise CLIError(f"--control {url!r}: {exc}", 2) from None
        self.host = parts.hostname
        self.url = url.rstrip("/")
        self.timeout = timeout

    def call(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        """Send one request; returns (status, decoded JSON or None) for any status < 500
        the caller may want to look at. Raises CLIError when unreachable or on 5xx."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"accept": "application/json", "user-agent": "meshlayer-cli"}
        if payload is not None:
            headers["content-type"] = "application/json"
        if self.admin_token:
            headers["authorization"] = f"Bearer {self.admin_token}"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except ConnectionRefusedError:
            raise self._unreachable("connection refused") from None
        except TimeoutError:
            raise self._unreachable(f"no answer within {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(str(exc) or type(exc).__name__) from None
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw.decode("utf-8", "replace")
        if resp.status >= 500:
            raise CLIError(f"control plane at {self.url} failed ({resp.status}): {message(data)}")
        return resp.status, data

    def _admin_hint(self) -> str:
        """What to do about a 401: where the CLI looked for a token, how to pass one."""
        if self.admin_token:
            return f"  (the admin token from {self.admin_source or 'the caller'} was not accepted)"
        looked = f", nor in {self.admin_source}" if self.admin_source else ""
        return (
            f"  no admin token: not given by --admin-token or ${ADMIN_ENV}{looked}.\n"
            "  The control plane writes it to `admin-token` next to its SQLite file and logs "
            "that path at start;\n"
            f"  pass --admin-token-file PATH (or ${ADMIN_FILE_ENV}), or the token itself with "
            f"--admin-token TOKEN (or ${ADMIN_ENV})."
        )

    def _unreachable(self, why: str) -> CLIError:
        return CLIError(f"cannot reach the control plane at {self.url}: {why}", 1)

    def expect(self, method: str, path: str, body: object | None = None) -> Any:
        """Like ``call`` but every status other than 2xx is a CLIError:
        400 → exit 2 with the server's message; 404, 409 and others → exit 1."""
        status, data = self.call(method, path, body)
        if status < 300:
            return data
        if status == 400:
            raise CLIError(f"invalid: {message(data)}", 2)
        if status == 401:
            raise CLIError(f"unauthorized: {message(data)}\n{self._admin_hint()}", 1)
        if status == 403:
            raise CLIError(f"forbidden: {message(data)}", 1)
        if status == 404:
            raise CLIError(f"not found: {message(data)}", 1)
        if status == 409:
            raise CLIError(f"conflict: {message(data)}", 1)
        raise CLIError(f"control plane answered {status}: {message(data)}", 1)


def cli_command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: a CLIError becomes ``meshlayer COMMAND: message`` and its exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except CLIError as exc:
            print(f"meshlayer {args.command}: {exc.message}", file=sys.stderr)
            return exc.code

    return run


def message(data: Any) -> str:
    """The human part of an error body (``{"error", "message"}``)."""
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or json.dumps(data))
    return str(data).strip()


def path(*parts: str) -> str:
    """``/v1/...`` with each part percent-encoded."""
    return "/" + "/".join(quote(p, safe="") for p in parts)
