#!/usr/bin/env python3
"""The services of bench/priority.py: a CPU-bound bottleneck and a caller.

``--role leaf`` (the bottleneck, "B"): every request costs a fixed amount of
CPU (``--cost-ms``, a busy loop on the thread's CPU clock, so time spent
preempted by other processes on the core does not count as work done) and is
served by ONE worker in arrival order: the app's concurrency is 1, so its
capacity is about ``1 / (cost + parsing)`` requests/s, whatever reaches it
beyond that waits in its FIFO queue.  It is a naive app on purpose: a request
whose client has gone away meanwhile is still worked on, as a thread-pool
server does with what is already in its sockets.  A request carrying
``x-bench-parent: ID`` has that ID recorded once its work is done.

``--role caller`` ("A"): for each request, calls ``--upstream`` ``--calls``
times one after another (``Host: --authority``), forwarding the request's
priority class with :mod:`meshlayer.propagation` (the class read from the
request's headers is put in the context variable; each call sends
``current_priority()``), and ``x-bench-parent: <x-bench-id of the request>``.
It answers 200 when every call got a 2xx, else 503 right after the first
failed call (the later calls are not made).  ``--cost-ms`` adds CPU per request
(default 0).

Both answer ``GET /__stats`` at once, outside the queue: JSON with the number
of requests served and (leaf) the recorded parent IDs.

Run: ``python bench/prio_app.py --port 9000 --role leaf --cost-ms 1.5``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import signal
import time
from typing import Any

import httptools

from meshlayer.propagation import HEADER, current_priority, priority_from_headers, set_priority

OK_BODY = b"ok\n"
RESP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n"
RESP_FAIL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nfail\n"
RESP_OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


def spin(cost: float) -> None:
    """Burn ``cost`` seconds of this thread's CPU time."""
    if cost <= 0:
        return
    end = time.thread_time() + cost
    while time.thread_time() < end:
        pass


class Stats:
    def __init__(self) -> None:
        self.served = 0
        self.parents: list[int] = []
        self.failed = 0

    def json(self) -> bytes:
        body = json.dumps(
            {"served": self.served, "failed": self.failed, "parents": self.parents}
        ).encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body)
        )


STATS = Stats()


class Request:
    __slots__ = ("headers", "keep_alive", "proto", "url")

    def __init__(self, proto: Server, url: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.proto = proto
        self.url = url
        self.headers = headers
        self.keep_alive = True

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


class Server(asyncio.Protocol):
    """One client connection; parsed requests go to ``handler`` in order."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_message_complete(self) -> None:
        req = Request(self, self._url, self._headers)
        req.keep_alive = self.parser.should_keep_alive()
        if req.url.startswith(b"/__stats"):
            self.write(STATS.json(), req.keep_alive)
            return
        self.handler.submit(req)

    def write(self, data: bytes, keep_alive: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if not keep_alive:
            self.transport.close()


class Handler:
    def submit(self, req: Request) -> None:
        raise NotImplementedError


class Leaf(Handler):
    """One worker, FIFO queue, fixed CPU cost per request."""

    def __init__(self, cost: float) -> None:
        self.cost = cost
        self.queue: collections.deque[Request] = collections.deque()
        self.wake = asyncio.Event()

    def submit(self, req: Request) -> None:
        self.queue.append(req)
        self.wake.set()

    async def run(self) -> None:
        queue, cost = self.queue, self.cost
        while True:
            if not queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            req = queue.popleft()
            spin(cost)
            STATS.served += 1
            parent = req.header(b"x-bench-parent")
            if parent is not None:
                with contextlib.suppress(ValueError):
                    STATS.parents.append(int(parent))
            req.proto.write(RESP_OK if req.keep_alive else RESP_OK_CLOSE, req.keep_alive)
            await asyncio.sleep(0)  # let the loop read and accept between requests


class Upstream:
    """A tiny keep-alive HTTP/1.1 client to one address (the caller's proxy)."""

    def __init__(self, host: str, port: int, authority: str, timeout: float) -> None:
        self.host, self.port, self.authority, self.timeout = host, port, authority, timeout
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, path: str, headers: dict[str, str]) -> int:
        try:
            return await asyncio.wait_for(self._get(path, headers), self.timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            return 0

    async def _get(self, path: str, headers: dict[str, str]) -> int:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        ok = False
        try:
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.authority}\r\n{extra}\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            if length:
                await reader.readexactly(length)
            ok = not close
            return status
        finally:
            if ok:
                self.idle.append((reader, writer))
            else:
                writer.close()


class Caller(Handler):
    """Calls the upstream ``calls`` times per request, forwarding the class."""

    def __init__(self, upstream: Upstream, calls: int, path: str, cost: float) -> None:
        self.upstream, self.calls, self.path, self.cost = upstream, calls, path, cost
        self.tail: dict[int, asyncio.Future[None]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def submit(self, req: Request) -> None:
        prev = self.tail.get(id(req.proto))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.tail[id(req.proto)] = done
        task = asyncio.ensure_future(self.serve(req, prev, done))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(
        self, req: Request, prev: asyncio.Future[None] | None, done: asyncio.Future[None]
    ) -> None:
        try:
            set_priority(priority_from_headers(req.headers))
            spin(self.cost)
            parent = (req.header(b"x-bench-id") or b"").decode("latin-1")
            ok = True
            for _ in range(self.calls):
                headers = {"x-bench-parent": parent} if parent else {}
                cls = current_priority()
                if cls is not None:
                    headers[HEADER] = cls
                status = await self.upstream.get(self.path, headers)
                if not 200 <= status < 300:
                    ok = False
                    break
            STATS.served += 1
            if not ok:
                STATS.failed += 1
            if prev is not None:
                await prev  # answers on one connection leave in request order
            resp = (RESP_OK if req.keep_alive else RESP_OK_CLOSE) if ok else RESP_FAIL
            req.proto.write(resp, req.keep_alive)
        finally:
            done.set_result(None)
            if self.tail.get(id(req.proto)) is done:
                del self.tail[id(req.proto)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--role", choices=("leaf", "caller"), default="leaf")
    p.add_argument("--cost-ms", type=float, default=None, help="CPU ms per request")
    p.add_argument("--upstream", default="", help="caller: HOST:PORT to call")
    p.add_argument("--authority", default="b", help="caller: Host of the calls")
    p.add_argument("--calls", type=int, default=2, help="caller: calls per request")
    p.add_argument("--call-timeout", type=float, default=10.0, help="caller: seconds per call")
    return p.parse_args()


async def amain(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    handler: Handler
    worker: asyncio.Task[Any] | None = None
    if args.role == "leaf":
        leaf = Leaf((1.5 if args.cost_ms is None else args.cost_ms) / 1000)
        worker = asyncio.ensure_future(leaf.run())
        handler = leaf
    else:
        host, _, port = args.upstream.rpartition(":")
        up = Upstream(host or "127.0.0.1", int(port), args.authority, args.call_timeout)
        handler = Caller(up, args.calls, "/", (args.cost_ms or 0.0) / 1000)
    server = await loop.create_server(
        lambda: Server(handler), args.host, args.port, backlog=4096, reuse_address=True
    )
    await stop
    server.close()
    if worker is not None:
        worker.cancel()


def main() -> None:
    args = parse_args()
    try:
        import uvloop

        uvloop.run(amain(args))
    except ImportError:
        asyncio.run(amain(args))


if __name__ == "__main__":
    main()
