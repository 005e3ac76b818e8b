"""A test upstream server, run as its own process: ``python -m tests.support.upstream_app``.

It parses with h11 (an independent HTTP/1.1 implementation, so it doubles as
an oracle for what the sidecar forwards) and behaves by path:

  /id                 200, body = this server's --name
  /echo               200, echoes the request body (streamed, chunked out) and its
                      trailers; sends 100 Continue first on Expect: 100-continue
  /headers            200, JSON of the request line and headers received
  /status/<code>      that status, body "status <code>"
  /delay/<ms>         200 after <ms> milliseconds
  /bytes/<n>          200 with an n-byte body (Content-Length), streamed
  /sink               200 with the number of body bytes received
  /close              closes the connection without answering
  /bad-framing        answers with Content-Length and Transfer-Encoding both
  /bad-framing-open   the same, then keeps the connection open without answering
  /ws                 101 when asked to upgrade, then echoes raw bytes
  /stats              JSON: connections, requests and raw bytes received so far
  /peer               JSON: the client's address and port as this server sees them
  /health             200, or 503 while the file named by --health-file exists
  /set-delay/<ms>     200; from now on every response is delayed <ms> (as --delay-ms)
  (anything else)     200 "ok"

Answers other than /echo, /bytes, /ws and /bad-framing carry
``x-echo-priority``: the ``x-meshlayer-priority`` values received (joined by
", "), when there were any.

Flags ``--delay-ms N`` (delay every response) and ``--fail-status CODE``
(answer every request but /stats with CODE) make slow or failing replicas.
``--workers N`` makes the delay real work: N workers, each busy for the delay
per request, so requests beyond N queue inside the app and latency grows with
concurrency (without it the delay is a sleep, whatever the concurrency).

Every raw byte received is counted, so a test can check that a refused request
never reached the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

import h11

STATS = {"connections": 0, "requests": 0, "bytes": 0, "paths": []}
NAME = "upstream"
DELAY_MS = 0  # --delay-ms: every response is delayed this long
FAIL_STATUS = 0  # --fail-status: every request except /stats gets this status
HEALTH_FILE = ""  # --health-file: /health answers 503 while this file exists
WORKERS: asyncio.Semaphore | None = None  # --workers: the delay holds one of N workers
CHUNK = 256 * 1024


async def _send(writer: asyncio.StreamWriter, conn: h11.Connection, event: object) -> None:
    data = conn.send(event)  # type: ignore[arg-type]
    if data:
        writer.write(data)
        await writer.drain()


async def _next(reader: asyncio.StreamReader, conn: h11.Connection) -> object:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(CHUNK)
            STATS["bytes"] += len(data)
            conn.receive_data(data)
            continue
        return event


async def _body(reader: asyncio.StreamReader, conn: h11.Connection):  # type: ignore[no-untyped-def]
    while True:
        ev = await _next(reader, conn)
        if isinstance(ev, h11.Data):
            yield bytes(ev.data)
        else:
            return


def _resp(status: int, headers: list[tuple[str, str]] | None = None) -> h11.Response:
    return h11.Response(status_code=status, headers=headers or [])


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    STATS["connections"] += 1
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            ev = await _next(reader, conn)
            if isinstance(ev, h11.ConnectionClosed) or ev is None:
                break
            if not isinstance(ev, h11.Request):
                break
            STATS["requests"] += 1
            path = ev.target.decode()
            STATS["paths"].append(path)
            if not await route(ev, path, reader, writer, conn):
                break
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                break
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                break
    except (h11.RemoteProtocolError, ConnectionError):
        pass
    finally:
        writer.close()


async def route(
    req: h11.Request,
    path: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: h11.Connection,
) -> bool:
    """Answer one request; False closes the connection."""
    global DELAY_MS
    if path.startswith("/set-delay/"):  # a service time that changes under load
        DELAY_MS = int(path.split("/")[2])
    elif DELAY_MS and WORKERS is not None:
        async with WORKERS:
            await asyncio.sleep(DELAY_MS / 1000)
    elif DELAY_MS:
        await asyncio.sleep(DELAY_MS / 1000)
    if FAIL_STATUS and path != "/stats":
        path = f"/status/{FAIL_STATUS}"
    if path == "/close":
        return False
    if path in ("/bad-framing", "/bad-framing-open"):
        async for _ in _body(reader, conn):
            pass
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        await writer.drain()
        if path == "/bad-framing-open":  # then holds the connection open, answering nothing
            while data := await reader.read(CHUNK):
                STATS["bytes"] += len(data)
        return False
    if path == "/ws":
        headers = {k.lower(): v for k, v in req.headers}
        if headers.get(b"upgrade", b"").lower() != b"websocket":
            await _send(writer, conn, _resp(400, [("content-length", "0")]))
            await _send(writer, conn, h11.EndOfMessage())
            return True
        await _next(reader, conn)  # EndOfMessage
        await _send(
            writer,
            conn,
            h11.InformationalResponse(
                status_code=101, headers=[("connection", "upgrade"), ("upgrade", "websocket")]
            ),
        )
        rest, _ = conn.trailing_data
        if rest:
            writer.write(b"echo:" + rest)
        while data := await reader.read(CHUNK):
            writer.write(b"echo:" + data)
            await writer.drain()
        return False
    if path == "/echo":
        if conn.they_are_waiting_for_100_continue:  # Expect: 100-continue
            await _send(
                writer,
                conn,
                h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"),
            )
        await _send(writer, conn, _resp(200, [("transfer-encoding", "chunked")]))
        while isinstance(ev := await _next(reader, conn), h11.Data):
            await _send(writer, conn, h11.Data(data=bytes(ev.data)))
        # the request's trailer fields come back as the response's
        trailers = list(ev.headers) if isinstance(ev, h11.EndOfMessage) else []
        await _send(writer, conn, h11.EndOfMessage(headers=trailers))
        return True
    total = 0
    async for piece in _body(reader, conn):
        total += len(piece)
    status, body, headers = 200, b"ok", [("content-type", "text/plain")]
    if path == "/id":
        body = NAME.encode()
    elif path == "/headers":
        body = json.dumps(
            {
                "method": req.method.decode(),
                "target": req.target.decode(),
                "headers": [[k.decode(), v.decode("latin-1")] for k, v in req.headers],
            }
        ).encode()
        headers = [("content-type", "application/json")]
    elif path.startswith("/status/"):
        status = int(path.split("/")[2])
        body = f"status {status}".encode()
    elif path.startswith("/delay/"):
        await asyncio.sleep(int(path.split("/")[2]) / 1000)
        body = b"late"
    elif path == "/sink":
        body = str(total).encode()
    elif path == "/stats":
        body = json.dumps(STATS).encode()
    elif path == "/peer":
        host, port = writer.get_extra_info("peername")[:2]
        body = json.dumps({"host": host, "port": port}).encode()
    elif path == "/health" and HEALTH_FILE and os.path.exists(HEALTH_FILE):
        status, body = 503, b"unhealthy"
    elif path.startswith("/bytes/"):
        n = int(path.split("/")[2])
        await _send(writer, conn, _resp(200, [("content-length", str(n))]))
        block = b"x" * CHUNK
        while n > 0:
            piece = block[: min(n, CHUNK)]
            n -= len(piece)
            await _send(writer, conn, h11.Data(data=piece))
        await _send(writer, conn, h11.EndOfMessage())
        return True
    headers = [*headers, ("content-length", str(len(body)))]
    seen = [v for k, v in req.headers if k == b"x-meshlayer-priority"]
    if seen:
        headers.append(("x-echo-priority", b", ".join(seen).decode("latin-1")))
    await _send(writer, conn, _resp(status, headers))
    if req.method != b"HEAD":
        await _send(writer, conn, h11.Data(data=body))
    await _send(writer, conn, h11.EndOfMessage())
    return True


async def main(host: str, port: int, workers: int = 0) -> None:
    global WORKERS
    if workers:
        WORKERS = asyncio.Semaphore(workers)
    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {host}:{port}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", default="upstream")
    ap.add_argument("--delay-ms", type=int, default=0, help="delay every response")
    ap.add_argument("--fail-status", type=int, default=0, help="answer everything so")
    ap.add_argument("--health-file", default="", help="/health fails while this file exists")
    ap.add_argument("--workers", type=int, default=0, help="the delay holds one of N workers")
    a = ap.parse_args()
    NAME = a.name
    DELAY_MS = a.delay_ms
    FAIL_STATUS = a.fail_status
    HEALTH_FILE = a.health_file
    asyncio.run(main(a.host, a.port, a.workers))
