"""The admin listener: /ready, /live, /metrics, /config.

A deliberately small HTTP/1.1 server on the same codec as the proxy: it
answers GET and HEAD, one response per request, keep-alive.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from meshlayer.proxy.codec import ProtocolError, RequestHead
from meshlayer.proxy.codec.request import RequestParser
from meshlayer.proxy.metrics import Metrics


class AdminState:
    """What the admin pages show."""

    def __init__(self, metrics: Metrics, config: Callable[[], dict[str, Any]]) -> None:
        self.metrics = metrics
        self.config = config
        self.ready = False


def _response(status: int, body: bytes, ctype: bytes, keep_alive: bool, head: bool) -> bytes:
    phrase = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 503: b"Unavailable"}
    lines = [
        b"HTTP/1.1 %d %b" % (status, phrase.get(status, b"Error")),
        b"content-type: " + ctype,
        b"content-length: %d" % len(body),
    ]
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body)


class AdminProtocol(asyncio.Protocol):
    def __init__(self, state: AdminState) -> None:
        self.state = state
        self.parser = RequestParser()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for ev in self.parser.feed(data):
            if isinstance(ev, RequestHead):
                self.transport.write(self._handle(ev))
                if not ev.keep_alive:
                    self.transport.close()
                    return
            elif isinstance(ev, ProtocolError):
                body = json.dumps({"error": ev.reason}).encode()
                self.transport.write(_response(400, body, b"application/json", False, False))
                self.transport.close()
                return

    def _handle(self, req: RequestHead) -> bytes:
        path = req.target.split(b"?", 1)[0]
        head = req.method == b"HEAD"
        ka = req.keep_alive
        text = b"text/plain; charset=utf-8"
        if req.method not in (b"GET", b"HEAD"):
            return _response(405, b"GET only\n", text, ka, head)
        st = self.state
        if path == b"/live":
            return _response(200, b"live\n", text, ka, head)
        if path == b"/ready":
            if st.ready:
                return _response(200, b"ready\n", text, ka, head)
            return _response(503, b"not ready\n", text, ka, head)
        if path == b"/metrics":
            return _response(200, st.metrics.render(), CONTENT_TYPE_LATEST.encode(), ka, head)
        if path == b"/config":
            body = json.dumps(st.config(), indent=2).encode() + b"\n"
            return _response(200, body, b"application/json", ka, head)
        if path == b"/":
            body = b"meshlayer sidecar admin: /ready /live /metrics /config\n"
            return _response(200, body, text, ka, head)
        return _response(404, b"not found\n", text, ka, head)
