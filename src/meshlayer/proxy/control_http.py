"""A minimal asyncio HTTP/1.1 client for the control plane's JSON API.

Theory of operation: one TCP connection per call (``connection: close``),
responses parsed by the proxy's own strict sans-I/O codec
(:class:`~meshlayer.proxy.codec.ResponseParser`). ``request`` returns a whole
small JSON response; ``open_stream`` returns once the response head arrived and
then hands out body pieces (de-chunked) for the watch stream. Every failure
to talk to the control plane — refused, reset, timed out, bad framing — is a
:class:`ControlUnreachable`, so callers have one thing to catch and retry.
With a :class:`TlsTarget` the connection is mTLS (the sidecar's certificate)
and the server must present the expected SPIFFE ID before a byte is sent.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from meshlayer.proxy.codec import Body, EndOfMessage, ProtocolError, ResponseHead, ResponseParser
from meshlayer.proxy.tls import PeerRejected, peer_der, verify_peer

MAX_RESPONSE = 64 * 1024 * 1024


class ControlUnreachable(Exception):
    """The control plane could not be reached or answered garbage."""


class TlsTarget(NamedTuple):
    """How to talk to the control plane's mesh listener: mTLS, and whom to expect."""

    context: ssl.SSLContext
    """Client context with the sidecar's certificate and the trust bundle."""
    trust_domain: str
    """The mesh's trust domain."""
    expected: str
    """The SPIFFE ID the server must present."""


def parse_control_url(url: str) -> tuple[str, int]:
    """``http://HOST[:PORT]`` → (host, port). Raises ValueError."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r} is not an http://HOST:PORT URL")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{url!r} must not have a path or query")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    return parts.hostname, port


class Response:
    """A complete response."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        """The body as JSON; raises ControlUnreachable when it is not."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError as exc:
            raise ControlUnreachable(f"control plane sent invalid JSON: {exc}") from None


class Stream:
    """A response whose body is read piece by piece."""

    def __init__(
        self,
        head: ResponseHead,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        parser: ResponseParser,
        pending: list[object],
    ) -> None:
        self.status = head.status
        self.headers = _headers(head)
        self._reader = reader
        self._writer = writer
        self._parser = parser
        self._pending = pending

    async def pieces(self, idle_timeout: float) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; ends with the body. Raises ControlUnreachable,
        also when nothing (not even a keep-alive) arrives for ``idle_timeout``."""
        events, self._pending = self._pending, []
        while True:
            for ev in events:
                if isinstance(ev, Body):
                    yield ev.data
                elif isinstance(ev, EndOfMessage):
                    return
                elif isinstance(ev, ProtocolError):
                    raise ControlUnreachable(f"bad response from control plane: {ev.reason}")
            events = await _read_events(self._reader, self._parser, idle_timeout)

    def close(self) -> None:
        self._writer.close()


def _headers(head: ResponseHead) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}


async def _read_events(
    reader: asyncio.StreamReader, parser: ResponseParser, timeout: float
) -> list[object]:
    try:
        async with asyncio.timeout(timeout):
            data = await reader.read(65536)
    except TimeoutError:
        raise ControlUnreachable(f"control plane silent for {timeout:g}s") from None
    except OSError as exc:
        raise ControlUnreachable(str(exc) or type(exc).__name__) from None
    return parser.feed(data) if data else parser.feed_eof() or [ProtocolError(502, "closed")]


async def _open(
    addr: tuple[str, int],
    method: str,
    path: str,
    body: object | None,
    timeout: float,
    headers: dict[str, str] | None = None,
    tls: TlsTarget | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ResponseParser, ResponseHead, list[object]]:
    host, port = addr
    payload = b"" if body is None else json.dumps(body).encode()
    lines = [
        f"{method} {path} HTTP/1.1",
        f"host: {host}:{port}",
        "connection: close",
        "accept: application/json, text/event-stream",
        "user-agent: meshlayer-sidecar",
    ]
    if body is not None or method in ("POST", "PUT"):
        lines += ["content-type: application/json", f"content-length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
    try:
        async with asyncio.timeout(timeout):
            if tls is None:
                reader, writer = await asyncio.open_connection(host, port, limit=2**20)
            else:
                reader, writer = await asyncio.open_connection(
                    host, port, limit=2**20, ssl=tls.context, server_hostname=""
                )
    except TimeoutError:
        raise ControlUnreachable(f"connect to {host}:{port} timed out") from None
    except OSError as exc:
        raise ControlUnreachable(exc.strerror or str(exc)) from None
    try:
        if tls is not None:
            try:
                verify_peer(peer_der(writer.transport), tls.trust_domain, tls.expected)
            except PeerRejected as exc:
                raise ControlUnreachable(f"control plane {host}:{port} rejected: {exc}") from None
        writer.write(raw)
        parser = ResponseParser()
        parser.expect(method.encode())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            events = await _read_events(reader, parser, max(0.001, deadline - loop.time()))
            for i, ev in enumerate(events):
                if isinstance(ev, ResponseHead) and ev.status >= 200:
                    return reader, writer, parser, ev, events[i + 1 :]
                if isinstance(ev, ProtocolError):
                    raise ControlUnreachable(f"bad response from control plane: {ev.reason}")
    except BaseException:
        writer.close()
        raise


async def request(
    addr: tuple[str, int],
    method: str,
    path: str,
    body: object | None = None,
    timeout: float = 5.0,
    headers: dict[str, str] | None = None,
    tls: TlsTarget | None = None,
) -> Response:
    """One request; the whole response. ``tls``: over mTLS to the mesh listener.
    Raises ControlUnreachable."""
    reader, writer, parser, head, events = await _open(
        addr, method, path, body, timeout, headers, tls
    )
    stream = Stream(head, reader, writer, parser, events)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for piece in stream.pieces(timeout):
                size += len(piece)
                if size > MAX_RESPONSE:
                    raise ControlUnreachable("control plane response too large")
                chunks.append(piece)
    except TimeoutError:
        raise ControlUnreachable(f"control plane response took over {timeout:g}s") from None
    finally:
        stream.close()
    return Response(head.status, stream.headers, b"".join(chunks))


async def open_stream(
    addr: tuple[str, int], path: str, timeout: float = 5.0, tls: TlsTarget | None = None
) -> Stream:
    """GET ``path`` and return once the response head is in. Raises ControlUnreachable."""
    reader, writer, parser, head, events = await _open(addr, "GET", path, None, timeout, None, tls)
    return Stream(head, reader, writer, parser, events)
