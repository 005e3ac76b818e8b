"""A small synchronous client for the control plane's JSON API, for the CLI.

Every failure becomes a :class:`CLIError` carrying the message to print and
the exit code: 1 for runtime failures (unreachable, conflict, not found),
2 for invalid input the server refused (400).
"""

from __future__ import annotations

import http.client
import json
import os
from typing import Any
from urllib.parse import quote, urlsplit

DEFAULT_URL = "http://127.0.0.1:15000"
ENV_VAR = "MESHLAYER_CONTROL"


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

    def __init__(self, url: str, timeout: float = 10.0) -> None:
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
        if status == 404:
            raise CLIError(f"not found: {message(data)}", 1)
        if status == 409:
            raise CLIError(f"conflict: {message(data)}", 1)
        raise CLIError(f"control plane answered {status}: {message(data)}", 1)


def message(data: Any) -> str:
    """The human part of an error body (``{"error", "message"}``)."""
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or json.dumps(data))
    return str(data).strip()


def path(*parts: str) -> str:
    """``/v1/...`` with each part percent-encoded."""
    return "/" + "/".join(quote(p, safe="") for p in parts)
