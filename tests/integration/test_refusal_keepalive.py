"""A refused request before its body arrived, and a client that half-closes, over raw sockets.

A sidecar admits one request at a time to its app (``inbound.concurrency: 1``);
a critical ``/delay/...`` request holds that slot, so what follows either waits
in its class's queue or, for batch behind queued critical requests, is shed at
arrival -- before the client has sent its body.
"""

from __future__ import annotations

import json
import socket
import threading
import time

from tests.support.procs import Cluster, Sidecar, Upstream, request

HEADER = "x-meshlayer-priority"


def _mesh(up: Upstream) -> str:
    return (
        "apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: web}\nspec:\n"
        f'  endpoints: [{{address: "{up.address}", meshed: false}}]\n'
        "  inbound: {concurrency: 1}\n"
    )


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One response (content-length framed, as the mesh's own answers are) from ``buf`` + sock."""
    deadline = time.monotonic() + 5
    while b"\r\n\r\n" not in buf:
        assert time.monotonic() < deadline, bytes(buf)
        data = sock.recv(65536)
        assert data, ("closed before a response", bytes(buf))
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        assert time.monotonic() < deadline
        data = sock.recv(65536)
        assert data, "closed in a body"
        rest += data
    buf[:] = rest[length:]
    return status, headers, rest[:length]


def _closed(sock: socket.socket, buf: bytearray) -> bool:
    """Whether the peer closes without sending more (within 2 s)."""
    sock.settimeout(2)
    try:
        data = sock.recv(65536)
    except (TimeoutError, ConnectionResetError):
        return False
    buf += data
    return data == b""


def _hold_the_slot(
    cluster: Cluster, queued: int
) -> tuple[Upstream, Sidecar, list[threading.Thread]]:
    """A sidecar whose one slot a 1.5 s request holds, with ``queued`` critical requests
    waiting behind it."""
    up = cluster.upstream("web")
    sc = cluster.sidecar(_mesh(up), service="web", app=up.address)
    for _ in range(3):  # the service time is known: a batch request would wait too long
        assert (
            request(sc.inbound, path="/delay/100", host="web", headers={HEADER: "critical"})[0]
            == 200
        )
    threads = []
    for i in range(1 + queued):
        path = "/delay/1500" if i == 0 else "/delay/10"
        t = threading.Thread(
            target=lambda p=path: request(
                sc.inbound, path=p, host="web", headers={HEADER: "critical"}
            ),
            daemon=True,
        )
        t.start()
        threads.append(t)
        time.sleep(0.05)
    deadline = time.monotonic() + 3
    while sc.metric("meshlayer_queue_length", priority="critical") != queued:
        assert time.monotonic() < deadline, "the critical requests did not queue"
        time.sleep(0.01)
    return up, sc, threads


def _post(path: str, length: int, cls: str = "batch") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: web\r\n{HEADER}: {cls}\r\n"
        f"content-type: application/octet-stream\r\ncontent-length: {length}\r\n\r\n"
    ).encode()


def test_a_shed_post_keeps_its_connection_when_the_body_is_small(cluster: Cluster) -> None:
    up, sc, threads = _hold_the_slot(cluster, queued=3)
    with socket.create_connection(("127.0.0.1", sc.inbound), timeout=5) as sock:
        buf = bytearray()
        for i in range(3):  # head first, the body after the answer: shed every time
            sock.sendall(_post(f"/small-{i}", 20_000))
            status, headers, body = _read_response(sock, buf)
            assert status == 503 and headers["x-meshlayer-error"] == "shed", (headers, body)
            assert headers.get("connection") != "close", headers
            sock.sendall(b"x" * 20_000)  # the rest arrives: read and dropped
        sock.sendall(b"GET /nothing HTTP/1.1\r\nHost: web\r\nx-meshlayer-priority: batch\r\n\r\n")
        status, headers, _ = _read_response(sock, buf)
        assert status == 503 and headers["x-meshlayer-error"] == "shed"  # still the same socket
        # a body too big to drop: the answer says close, and the connection goes
        sock.sendall(_post("/big", 1_000_000))
        status, headers, _ = _read_response(sock, buf)
        assert status == 503 and headers["connection"] == "close", headers
    for t in threads:
        t.join(10)
    assert not any(p.startswith(("/small", "/big", "/nothing")) for p in up.stats()["paths"])


def test_a_discarded_chunked_body_past_the_bound_closes(cluster: Cluster) -> None:
    _, sc, threads = _hold_the_slot(cluster, queued=3)
    with socket.create_connection(("127.0.0.1", sc.inbound), timeout=5) as sock:
        buf = bytearray()
        sock.sendall(
            f"POST /c HTTP/1.1\r\nHost: web\r\n{HEADER}: batch\r\n"
            "transfer-encoding: chunked\r\n\r\n".encode()
        )
        status, headers, _ = _read_response(sock, buf)
        assert status == 503 and headers.get("connection") != "close", headers
        sock.sendall(b"4000\r\n" + b"y" * 0x4000 + b"\r\n0\r\n\r\n")  # 16 KiB: dropped
        sock.sendall(_post("/again", 0))
        status, headers, _ = _read_response(sock, buf)
        assert status == 503 and headers["x-meshlayer-error"] == "shed"
        sock.sendall(f"POST /c HTTP/1.1\r\nHost: web\r\n{HEADER}: batch\r\n".encode())
        sock.sendall(b"transfer-encoding: chunked\r\n\r\n")
        _read_response(sock, buf)
        try:
            for _ in range(8):  # 8 x 16 KiB: past the bound, the sidecar closes
                sock.sendall(b"4000\r\n" + b"y" * 0x4000 + b"\r\n")
                time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert _closed(sock, buf)
    for t in threads:
        t.join(10)


def test_half_closed_client_gets_answers_for_queued_and_pipelined_requests(
    cluster: Cluster,
) -> None:
    up, sc, threads = _hold_the_slot(cluster, queued=0)
    with socket.create_connection(("127.0.0.1", sc.inbound), timeout=5) as sock:
        get = f"GET /after-eof-%d HTTP/1.1\r\nHost: web\r\n{HEADER}: critical\r\n\r\n"
        sock.sendall((get % 1 + get % 2).encode())  # the first queues, the second behind it
        deadline = time.monotonic() + 3
        while sc.metric("meshlayer_queue_length", priority="critical") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        sock.shutdown(socket.SHUT_WR)  # done sending; still reading
        buf = bytearray()
        answers = [_read_response(sock, buf) for _ in range(2)]
        assert time.monotonic() - t0 < 0.5  # not after the slot frees (1.5 s)
        for i, (status, headers, body) in enumerate(answers):
            assert status == 503 and headers["x-meshlayer-error"] == "client-closed", headers
            assert json.loads(body)["error"] == "client-closed"
            assert (headers.get("connection") == "close") == (i == 1), headers
        assert _closed(sock, buf)
    assert sc.metric("meshlayer_queue_length", priority="critical") == 0
    assert sc.metric("meshlayer_requests_total", direction="inbound", status_class="4xx") == 2
    for t in threads:
        t.join(10)
    assert not any(p.startswith("/after-eof") for p in up.stats()["paths"])
    # a half-close with the request already admitted: it is answered in full
    with socket.create_connection(("127.0.0.1", sc.inbound), timeout=5) as sock:
        sock.sendall(f"GET /delay/50 HTTP/1.1\r\nHost: web\r\n{HEADER}: critical\r\n\r\n".encode())
        sock.shutdown(socket.SHUT_WR)
        buf = bytearray()
        status, _, _ = _read_response(sock, buf)
        assert status == 200
