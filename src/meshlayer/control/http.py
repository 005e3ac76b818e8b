"""A small, strict HTTP/1.1 server for the control-plane API.

Theory of operation
-------------------
One asyncio task per connection reads bytes and feeds them to the data
plane's sans-I/O :class:`~meshlayer.proxy.codec.RequestParser` (strict
framing, header limits; the codec has no asyncio or proxy-runtime imports).
Requests on a connection are answered one at a time, in order (pipelining
works, nothing runs concurrently per connection). A whole request body is
read before the handler runs, up to ``max_body`` bytes (413 beyond).

A handler returns either a :class:`Response` (sent with Content-Length; the
connection stays open if the client allows) or a :class:`Stream`: the head
goes out with ``Transfer-Encoding: chunked``, then the stream's ``run``
coroutine writes chunks through a :class:`StreamOut` until it returns or the
client goes away (the read side watches for EOF and cancels ``run``); the
connection closes afterwards. Errors are JSON: ``{"error": reason,
"message": text}``; handlers raise :class:`HTTPError` to produce one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl as _ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from meshlayer.proxy.codec import EndOfMessage, ProtocolError, RequestHead, RequestParser
from meshlayer.proxy.codec.events import LENGTH, Body

log = logging.getLogger("meshlayer.control.http")

MAX_BODY = 8 * 1024 * 1024
READ_SIZE = 64 * 1024
SERVER = b"server: meshlayer-control\r\n"


class HTTPError(Exception):
    """An error answer: ``status``, a short ``reason`` token and a message."""

    def __init__(
        self, status: int, reason: str, message: str, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.extra = extra or {}
        self.headers: list[tuple[str, str]] = []

    def response(self) -> Response:
        body = {"error": self.reason, "message": self.message, **self.extra}
        return json_response(self.status, body, self.headers)


@dataclass(slots=True)
class Request:
    """A whole request, as handlers see it."""

    method: str
    path: str
    """Percent-decoded path, without the query."""
    query: dict[str, str]
    headers: dict[str, str]
    """Lower-cased names; repeated fields joined with ", "."""
    body: bytes
    peer: str = ""
    peer_cert: bytes | None = None
    """DER of the verified client certificate (TLS listeners only)."""

    def json(self) -> Any:
        """The body as JSON; HTTPError 400 if it is not."""
        if not self.body:
            raise HTTPError(400, "bad-request", "a JSON body is required")
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPError(400, "bad-request", f"body is not valid JSON: {exc}") from None


@dataclass(slots=True)
class Response:
    """A whole response."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, data: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    """``data`` as a compact JSON body (204 gets no body)."""
    body = b"" if status == 204 else json.dumps(data, separators=(",", ":")).encode() + b"\n"
    return Response(status, body, "application/json", headers or [])


class StreamOut:
    """Where a :class:`Stream` writes: chunks on one connection."""

    __slots__ = ("_writer",)

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        """Send ``data`` as one chunk."""
        if data:
            self._writer.write(b"%x\r\n%b\r\n" % (len(data), data))

    def write_framed(self, chunk: bytes) -> None:
        """Send bytes already framed as chunks (shared by many streams)."""
        self._writer.write(chunk)

    def buffered(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        return self._writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Wait while the client is slower than we write."""
        await self._writer.drain()


@dataclass(slots=True)
class Stream:
    """A chunked response written by ``run`` until it returns or the client leaves."""

    run: Callable[[StreamOut], Coroutine[Any, Any, None]]
    status: int = 200
    content_type: str = "text/event-stream"
    headers: list[tuple[str, str]] = field(default_factory=list)
    send_buffer: int = 256 * 1024
    """SO_SNDBUF for the connection (0: the kernel's autotuning). Bounds what a
    stalled client pins in the kernel, so the writer notices it sooner."""


Handler = Callable[[Request], Awaitable[Response | Stream]]


def frame_chunk(data: bytes) -> bytes:
    """``data`` framed as one chunk (for :meth:`StreamOut.write_framed`)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class HttpServer:
    """Serve ``handler`` on HOST:PORT."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        max_body: int = MAX_BODY,
        idle_timeout: float = 120.0,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        self.ssl = ssl
        self.host = host
        self.port = port
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self.host,
            self.port,
            reuse_address=True,
            limit=READ_SIZE,
            ssl=self.ssl,
            ssl_handshake_timeout=10.0 if self.ssl is not None else None,
        )
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])

    async def close(self) -> None:
        """Stop accepting, end every connection (streams included)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await _Connection(self, reader, writer).run()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # close() ends us; asyncio's callback must not see it
            pass
        finally:
            self._conns.discard(task)
            writer.close()


class _Connection:
    def __init__(
        self, server: HttpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.parser = RequestParser()
        self.events: deque[object] = deque()
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        tls = writer.get_extra_info("ssl_object")
        self.peer_cert: bytes | None = tls.getpeercert(binary_form=True) if tls else None

    async def _next(self) -> object | None:
        """The next parser event; None when the client closed."""
        while not self.events:
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), self.server.idle_timeout)
            if not data:
                return None
            self.events.extend(self.parser.feed(data))
        return self.events.popleft()

    async def run(self) -> None:
        while True:
            ev = await self._next()
            if ev is None:
                return
            if isinstance(ev, ProtocolError):
                await self._send(_error(ev.status, "bad-request", ev.reason), close=True)
                return
            if not isinstance(ev, RequestHead):  # tunnel data after an upgrade: not ours
                return
            head = ev
            if head.framing == LENGTH and head.content_length > self.server.max_body:
                limit = self.server.max_body
                msg = f"request body of {head.content_length} bytes is over the {limit} limit"
                await self._send(_error(413, "too-large", msg), close=True)
                return
            if head.expect_continue:
                self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = bytearray()
            while True:
                ev = await self._next()
                if ev is None:
                    return
                if isinstance(ev, ProtocolError):
                    await self._send(_error(ev.status, "bad-request", ev.reason), close=True)
                    return
                if isinstance(ev, Body):
                    body += ev.data
                    if len(body) > self.server.max_body:
                        msg = f"request body is over the {self.server.max_body} byte limit"
                        await self._send(_error(413, "too-large", msg), close=True)
                        return
                elif isinstance(ev, EndOfMessage):
                    break
            req = _request(head, bytes(body), self.peer)
            req.peer_cert = self.peer_cert
            resp = await self._handle(req)
            close = not head.keep_alive or self.parser.tunnel
            if isinstance(resp, Stream) and req.method == "HEAD":
                resp = Response(resp.status, b"", resp.content_type, resp.headers)
            if isinstance(resp, Stream):
                await self._stream(req, resp)
                return
            await self._send(resp, close, head_only=req.method == "HEAD")
            if close:
                return

    async def _handle(self, req: Request) -> Response | Stream:
        try:
            return await self.server.handler(req)
        except HTTPError as exc:
            return exc.response()
        except Exception:
            log.exception("%s %s failed", req.method, req.path)
            return _error(500, "internal", "internal error; see the control plane's log")

    async def _send(self, resp: Response, close: bool, head_only: bool = False) -> None:
        lines = [
            b"HTTP/1.1 %d %b\r\n" % (resp.status, _phrase(resp.status)),
            SERVER,
        ]
        if resp.status != 204:
            lines.append(b"content-type: %b\r\n" % resp.content_type.encode())
            lines.append(b"content-length: %d\r\n" % len(resp.body))
        for name, value in resp.headers:
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if close:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        if not head_only:
            lines.append(resp.body)
        self.writer.write(b"".join(lines))
        await self.writer.drain()

    async def _stream(self, req: Request, resp: Stream) -> None:
        head = [
            b"HTTP/1.1 %d %b\r\n" % (resp.status, _phrase(resp.status)),
            SERVER,
            b"content-type: %b\r\n" % resp.content_type.encode(),
            b"cache-control: no-cache\r\n",
            b"transfer-encoding: chunked\r\n",
            b"connection: close\r\n",
        ]
        head += [f"{n}: {v}\r\n".encode("latin-1") for n, v in resp.headers]
        sock = self.writer.get_extra_info("socket")
        if resp.send_buffer and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, resp.send_buffer)
        self.writer.write(b"".join(head) + b"\r\n")
        run = asyncio.create_task(resp.run(StreamOut(self.writer)))
        gone = asyncio.create_task(self._until_eof())
        try:
            await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (run, gone):
                task.cancel()
            for task in (run, gone):
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await task
        if run.done() and not run.cancelled() and run.exception() is None:
            with contextlib.suppress(ConnectionError):
                self.writer.write(b"0\r\n\r\n")
                await self.writer.drain()
        elif (
            run.done()
            and not run.cancelled()
            and not isinstance(exc := run.exception(), ConnectionError | None)
        ):
            log.error("stream %s %s failed: %r", req.method, req.path, exc)

    async def _until_eof(self) -> None:
        while await self.reader.read(READ_SIZE):
            pass


def _request(head: RequestHead, body: bytes, peer: str) -> Request:
    target = head.target.decode("latin-1")
    parts = urlsplit(target)
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(
        method=head.method.decode("latin-1"),
        path=unquote(parts.path) or "/",
        query=dict(parse_qsl(parts.query)),
        headers=headers,
        body=body,
        peer=peer,
    )


def _error(status: int, reason: str, message: str) -> Response:
    return HTTPError(status, reason, message).response()


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"
