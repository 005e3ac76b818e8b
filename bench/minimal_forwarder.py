"""The floor of Python on this machine: a minimal uvloop + httptools keep-alive forwarder.

This is the reference row ``minimal`` of ``bench/overhead.py``. It does the
least an HTTP-aware reverse proxy written the same way as meshlayer's sidecar
must do per request, and nothing else: parse the request with httptools (the
same per-header callbacks the sidecar gets), write a re-serialized head on an
idle keep-alive upstream connection from a pool, parse the response with
httptools, write its head and body back, and return the upstream connection
to the pool. No routing, balancing, retries, timeouts, metrics, header
rewriting, hop-by-hop filtering, pipelining or flow control, and only the
framings the benchmark uses (no request body or Content-Length; responses
with Content-Length or chunked). Whatever the sidecar costs beyond this is
the price of its features; what this costs is the price of Python + uvloop +
httptools.

Run: ``python bench/minimal_forwarder.py --listen 127.0.0.1:8080 --upstream 127.0.0.1:8081``
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; serves one client request at a time."""

    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.lines: list[bytes] = []
        self.reason = b""
        self.chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.abort()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.lines = []
        self.reason = b""
        self.chunked = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"transfer-encoding":
            self.chunked = True
        self.lines.append(name + b": " + value)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        head = b"HTTP/1.1 %d %b\r\n%b\r\n\r\n" % (status, self.reason, b"\r\n".join(self.lines))
        assert self.client is not None
        self.client.out.append(head)

    def on_body(self, body: bytes) -> None:
        assert self.client is not None
        self.client.out.append(b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        client = self.client
        assert client is not None
        if self.chunked:
            client.out.append(b"0\r\n\r\n")
        self.client = None
        self.pool.append(self)
        client.response_done()


class Client(asyncio.Protocol):
    """One client connection: parse a request, forward it, write the response back."""

    def __init__(self, upstream: tuple[str, int], pool: list[Upstream]) -> None:
        self.upstream = upstream
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.lines: list[bytes] = []
        self.out: list[bytes] = []
        self.waiting: deque[bytes] = deque()  # heads of requests not yet sent
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.abort()

    def on_message_begin(self) -> None:
        self.url = b""
        self.lines = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.lines.append(name + b": " + value)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        self.waiting.append(
            b"%b %b HTTP/1.1\r\n%b\r\n\r\n" % (method, self.url, b"\r\n".join(self.lines))
        )
        if not self.busy:
            self.send_next()

    def send_next(self) -> None:
        head = self.waiting.popleft()
        self.busy = True
        if self.pool:
            up = self.pool.pop()
            up.client = self
            assert up.transport is not None
            up.transport.write(head)
        else:
            asyncio.get_running_loop().create_task(self.connect(head))

    async def connect(self, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: Upstream(self.pool), *self.upstream)
        up.client = self
        assert up.transport is not None
        up.transport.write(head)

    def response_done(self) -> None:
        out = self.out
        self.out = []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        self.busy = False
        if self.waiting:
            self.send_next()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    pool: list[Upstream] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream, pool), *listen, backlog=4096)
    async with server:
        await server.serve_forever()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=_addr, required=True, help="HOST:PORT to listen on")
    ap.add_argument("--upstream", type=_addr, required=True, help="HOST:PORT to forward to")
    args = ap.parse_args()
    uvloop.run(serve(args.listen, args.upstream))


if __name__ == "__main__":
    main()
