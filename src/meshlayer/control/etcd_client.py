"""A small asyncio client for etcd's v3 JSON gateway, with endpoint failover.

Theory of operation
-------------------
etcd (3.4+) serves its gRPC API as HTTP/1.1 + JSON on the client port
(``POST /v3/kv/range`` and friends; keys and values base64, 64-bit integers
as strings). That is enough for the control plane, so there is no gRPC
dependency: this module speaks just the HTTP/1.1 it needs over asyncio
streams.

* ``call(path, body)`` is one unary request. It goes to the endpoint that
  answered last; when that one refuses the connection, times out, or answers
  with an error that means "this member cannot serve now" (HTTP 5xx / gRPC
  ``Unavailable``, no leader, ...), the next endpoint is tried, each with a
  short timeout. When none answers it raises ``Unavailable``. Other etcd
  errors (lease not found, ...) come out as ``EtcdError`` with the gRPC code.
* Idle keep-alive connections are kept per endpoint and reused, so a busy
  control process does not pay a TCP handshake per request; at most
  ``_MAX_IN_FLIGHT`` unary requests run at once (a burst of 200 sidecar
  acknowledgements queues here rather than opening 200 connections).
* ``stream(path, body)`` opens one long-lived request (``/v3/watch``) and
  yields each JSON message of the chunked response as it arrives. It fails
  over at open time like ``call``; once open, a broken stream raises
  ``Unavailable`` and the caller re-opens it from where it left off.
  Streams ask for ``hasleader`` so that a member cut off from the quorum
  ends the watch instead of silently going stale.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from meshlayer.control.store import Unavailable

log = logging.getLogger("meshlayer.control.etcd")

# gRPC status codes that mean "ask another member".
_RETRY_CODES = frozenset({1, 4, 10, 13, 14})  # cancelled, deadline, aborted, internal, unavailable
_MAX_IDLE = 32  # idle keep-alive connections kept per endpoint
_MAX_IN_FLIGHT = 32  # unary requests at once; the rest wait their turn
_MAX_HEAD = 64 * 1024


class EtcdError(Exception):
    """etcd answered with an error that another member would repeat."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"etcd error {code}: {message}")
        self.code = code
        self.message = message


class _Retry(Exception):
    """This endpoint cannot serve the request now; try the next one."""


def b64(data: str | bytes) -> str:
    """Base64 text of a key or value, as the gateway wants it."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    """``range_end`` (base64) that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return b64(bytes(raw))
        raw.pop()
    return b64(b"\0")


class _Conn:
    """One HTTP/1.1 connection to one endpoint."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def _request_bytes(host: str, path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        + extra + b"\r\n" + body
    )  # fmt: skip


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    if len(raw) > _MAX_HEAD:
        raise _Retry("response head too large")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise _Retry(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The data of a chunked body, chunk by chunk, until the last chunk."""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
            return
        data = await reader.readexactly(size + 2)
        yield data[:-2]


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return b"".join([c async for c in _chunks(reader)])
    length = headers.get("content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    return await reader.read()


def _check(status: int, body: bytes) -> dict[str, Any]:
    """The JSON answer, or the error it carries."""
    try:
        data = json.loads(body) if body else {}
    except ValueError as exc:
        raise _Retry(f"HTTP {status}: not JSON: {body[:200]!r}") from exc
    if not isinstance(data, dict):
        raise _Retry(f"HTTP {status}: unexpected answer {body[:200]!r}")
    err = data.get("error")
    if isinstance(err, dict):  # stream messages carry {"error": {"grpc_code": ...}}
        code = int(err.get("grpc_code") or err.get("code") or 14)
        message = str(err.get("message", ""))
    elif err is not None or status >= 300:
        code = int(data.get("code", 14 if status >= 500 else 2))
        message = str(data.get("message", err or f"HTTP {status}"))
    else:
        return data
    if code in _RETRY_CODES or status >= 500 or "leader" in message:
        raise _Retry(f"etcd error {code}: {message}")
    raise EtcdError(code, message)


class EtcdClient:
    """Unary calls and streams against a set of etcd endpoints (``HOST:PORT``)."""

    def __init__(
        self,
        endpoints: list[str],
        connect_timeout: float = 0.5,
        request_timeout: float = 2.0,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd: at least one endpoint is needed")
        self.endpoints = list(endpoints)
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._current = 0
        self._idle: dict[str, list[_Conn]] = {ep: [] for ep in self.endpoints}
        self._closed = False
        self._slots = asyncio.Semaphore(_MAX_IN_FLIGHT)

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self._idle.values())
        return f"<EtcdClient {self.endpoints[self._current]} of {self.endpoints} idle={idle}>"

    @property
    def closed(self) -> bool:
        """``close()`` was called."""
        return self._closed

    def _order(self) -> list[str]:
        n = len(self.endpoints)
        return [self.endpoints[(self._current + i) % n] for i in range(n)]

    def _good(self, endpoint: str) -> None:
        self._current = self.endpoints.index(endpoint)

    async def _connect(self, endpoint: str) -> _Conn:
        host, _, port = endpoint.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port), limit=_MAX_HEAD * 16),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise _Retry(f"connect: {exc or 'timeout'}") from exc
        return _Conn(reader, writer)

    async def _unary(
        self, endpoint: str, path: str, body: bytes, fresh: bool = False
    ) -> dict[str, Any]:
        idle = self._idle[endpoint]
        reused = bool(idle) and not fresh
        conn = idle.pop() if reused else await self._connect(endpoint)
        try:
            conn.writer.write(_request_bytes(endpoint, path, body))
            status, headers = await _read_head(conn.reader)
            data = await _read_body(conn.reader, headers)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            conn.close()
            if reused:  # a kept-alive connection the server closed meanwhile: once more, fresh
                self._drop(endpoint)
                return await self._unary(endpoint, path, body, fresh=True)
            raise _Retry(f"{type(e).__name__}: {e}") from e
        except BaseException:
            conn.close()
            raise
        if headers.get("connection", "").lower() == "close" or len(idle) >= _MAX_IDLE:
            conn.close()
        else:
            idle.append(conn)
        return _check(status, data)

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST one request; fail over between endpoints. Raises Unavailable, EtcdError."""
        if self._closed:
            raise Unavailable("etcd client closed")
        payload = json.dumps(body, separators=(",", ":")).encode()
        problems: list[str] = []
        for endpoint in self._order():
            try:
                async with self._slots:
                    answer = await asyncio.wait_for(
                        self._unary(endpoint, path, payload), self.request_timeout
                    )
            except TimeoutError:
                self._drop(endpoint)
                problems.append(f"{endpoint}: timeout after {self.request_timeout}s")
                continue
            except _Retry as exc:
                problems.append(f"{endpoint}: {exc}")
                continue
            self._good(endpoint)
            return answer
        raise Unavailable(f"etcd {path}: no endpoint answered ({'; '.join(problems)})")

    def _drop(self, endpoint: str) -> None:
        for conn in self._idle[endpoint]:
            conn.close()
        self._idle[endpoint].clear()

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming request; yield each JSON message. Raises Unavailable, EtcdError."""
        if self._closed:
            raise Unavailable("etcd client closed")
        payload = json.dumps(body, separators=(",", ":")).encode()
        conn: _Conn | None = None
        problems: list[str] = []
        chunks: AsyncIterator[bytes] | None = None
        for endpoint in self._order():
            try:
                conn = await self._connect(endpoint)
                conn.writer.write(
                    _request_bytes(endpoint, path, payload, b"Grpc-Metadata-Hasleader: true\r\n")
                )
                status, headers = await asyncio.wait_for(
                    _read_head(conn.reader), self.request_timeout
                )
                if status != 200 or "chunked" not in headers.get("transfer-encoding", ""):
                    data = await asyncio.wait_for(
                        _read_body(conn.reader, headers), self.request_timeout
                    )
                    _check(status, data)
                    raise _Retry(f"HTTP {status} without a stream")
            except (_Retry, OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                if conn is not None:
                    conn.close()
                    conn = None
                problems.append(f"{endpoint}: {e}")
                continue
            self._good(endpoint)
            chunks = _chunks(conn.reader)
            break
        if conn is None or chunks is None:
            raise Unavailable(f"etcd {path}: no endpoint answered ({'; '.join(problems)})")
        buf = b""
        try:
            async for chunk in chunks:
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield _check(200, line)
            raise Unavailable(f"etcd {path}: stream ended")
        except _Retry as exc:
            raise Unavailable(f"etcd {path}: {exc}") from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            raise Unavailable(f"etcd {path}: stream broken: {e}") from e
        finally:
            conn.close()

    async def close(self) -> None:
        """Close idle connections; later calls raise Unavailable. Idempotent."""
        self._closed = True
        for endpoint in self.endpoints:
            self._drop(endpoint)
