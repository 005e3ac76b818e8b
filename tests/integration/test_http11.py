"""HTTP/1.1 handling through the outbound listener (Host: <service> -> a plain upstream).

Requests are written byte for byte on raw sockets and responses are read with a
small strict reader, so what is on the wire is what is asserted. The upstream
(tests/support/upstream_app.py, h11) counts every byte it receives: a request
the sidecar refuses must leave its counters untouched.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import Cluster, Sidecar, Upstream, service_yaml

SVC = "strict"
TIMEOUT = 3.0


# -- a strict client on a raw socket ------------------------------------------


class Response:
    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = b""
        self.trailers: list[tuple[str, str]] = []
        self.chunked = False

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        assert len(values) <= 1, f"{name} repeated: {self.headers}"
        return values[0] if values else None

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers} {self.body[:200]!r}>"


class Client:
    """One client connection; ``send`` raw bytes, ``response`` reads one response."""

    def __init__(self, port: int, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.reset = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            piece = self.sock.recv(65536)
        except ConnectionResetError:
            self.reset = True
            return False
        if not piece:
            return False
        self.buf += piece
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection ended inside a line: {self.buf!r}")
        line, self.buf = self.buf.split(b"\r\n", 1)
        assert b"\n" not in line and b"\r" not in line, line
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection ended {n - len(self.buf)} bytes short")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _fields(self) -> list[tuple[str, str]]:
        fields = []
        while line := self._line():
            name, sep, value = line.partition(b":")
            assert sep and name and name == name.strip(), line
            fields.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        return fields

    def response(self, method: str = "GET") -> Response:
        """Read one response (an interim 1xx is returned as is)."""
        version, status, reason = (self._line().decode("latin-1") + " ").split(" ", 2)
        assert version == "HTTP/1.1", version
        resp = Response(int(status), reason.strip(), self._fields())
        te, cl = resp.header("transfer-encoding"), resp.header("content-length")
        assert not (te and cl), f"both Content-Length and Transfer-Encoding: {resp}"
        if resp.status < 200 or resp.status in (204, 304) or method == "HEAD":
            return resp
        if te is not None:
            assert te.lower() == "chunked", te
            resp.chunked = True
            body = []
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    break
                body.append(self._exactly(size))
                assert self._exactly(2) == b"\r\n"
            resp.body = b"".join(body)
            resp.trailers = self._fields()
        elif cl is not None:
            resp.body = self._exactly(int(cl))
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def closed(self) -> bool:
        """The peer closed (FIN or RST) with nothing more to read."""
        if self.buf:
            return False
        try:
            return not self._fill()
        except TimeoutError:
            return False


def get(path: str, host: str = SVC, extra: bytes = b"", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n".encode() + extra + b"\r\n"


def exchange(port: int, data: bytes, method: str = "GET") -> Response:
    with Client(port) as c:
        c.send(data)
        return c.response(method)


def upstream_headers(resp: Response) -> dict[str, list[str]]:
    """The header fields the upstream's /headers saw, by lower-cased name."""
    assert resp.status == 200, resp
    seen: dict[str, list[str]] = {}
    for k, v in json.loads(resp.body)["headers"]:
        seen.setdefault(k.lower(), []).append(v)
    return seen


def open_connections(sc: Sidecar, side: str, name: str) -> float:
    """The sidecar's meshlayer_open_connections gauge for one side and name."""
    _, text = sc.admin_get("/metrics")
    values = []
    for line in text.splitlines():
        if line.startswith("meshlayer_open_connections{"):
            labels, _, value = line.rpartition(" ")
            if f'side="{side}"' in labels and f'name="{name}"' in labels:
                values.append(float(value))
    assert len(values) == 1, text
    return values[0]


# -- fixtures -----------------------------------------------------------------


class Mesh:
    def __init__(self, up: Upstream, sc: Sidecar) -> None:
        self.up = up
        self.sc = sc
        s0 = up.stats()
        s1 = up.stats()
        # what one /stats call adds to the counters (it counts itself)
        self.stats_bytes = s1["bytes"] - s0["bytes"]
        assert s1["connections"] - s0["connections"] == 1

    def assert_nothing_forwarded(self, before: dict[str, Any]) -> None:
        """Since ``before`` (a stats() result) only one /stats call reached the upstream."""
        time.sleep(0.15)  # let anything the sidecar might still forward arrive
        after = self.up.stats()
        assert after["paths"][len(before["paths"]) :] == ["/stats"], after["paths"]
        assert after["requests"] - before["requests"] == 1
        assert after["connections"] - before["connections"] == 1
        assert after["bytes"] - before["bytes"] == self.stats_bytes


def _start(cluster: Cluster) -> Mesh:
    up = cluster.upstream(SVC)
    sc = cluster.sidecar(service_yaml(SVC, [up.address]))
    return Mesh(up, sc)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """One sidecar and upstream for the refusal cases: each case checks counter deltas."""
    c = Cluster(Path(tmp_path_factory.mktemp("http11")))
    try:
        yield _start(c)
    finally:
        c.stop_all()


@pytest.fixture
def mesh(cluster: Cluster) -> Mesh:
    return _start(cluster)


# -- 1. strict framing: 400, close, nothing forwarded -----------------------------

POST = b"POST /echo HTTP/1.1\r\nHost: " + SVC.encode() + b"\r\n"
GET_H = b"GET /headers HTTP/1.1\r\nHost: " + SVC.encode() + b"\r\n"

REFUSED = {
    "cl-and-te": (
        POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    "te-and-cl": (
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    "two-differing-cl": POST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "cl-plus-sign": POST + b"Content-Length: +3\r\n\r\nabc",
    "cl-list": POST + b"Content-Length: 3, 3\r\n\r\nabc",
    "cl-not-a-number": POST + b"Content-Length: abc\r\n\r\nabc",
    "cl-negative": POST + b"Content-Length: -1\r\n\r\nabc",
    "te-gzip": POST + b"Transfer-Encoding: gzip\r\n\r\nabc",
    "te-chunked-then-gzip": POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te-identity": POST + b"Transfer-Encoding: identity\r\n\r\nabc",
    "te-split-over-two-fields": (
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    "obs-fold-space": GET_H + b"X-A: one\r\n two\r\n\r\n",
    "obs-fold-tab": GET_H + b"X-A: one\r\n\ttwo\r\n\r\n",
    "bare-lf-everywhere": b"GET /headers HTTP/1.1\nHost: strict\nX-A: 1\n\n",
    "bare-lf-in-headers": GET_H + b"X-A: 1\nX-B: 2\r\n\r\n",
    "bare-cr-in-headers": GET_H + b"X-A: 1\rX-B: 2\r\n\r\n",
    "bare-cr-after-request-line": b"GET /headers HTTP/1.1\rHost: strict\r\n\r\n",
    "space-inside-name": GET_H + b"X A: 1\r\n\r\n",
    "space-before-colon": GET_H + b"X-A : 1\r\n\r\n",
    "nul-in-value": GET_H + b"X-A: a\x00b\r\n\r\n",
    "control-char-in-value": GET_H + b"X-A: a\x01b\r\n\r\n",
    "chunk-size-not-hex": POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunk-size-overflow": (
        POST + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nabc\r\n0\r\n\r\n"
    ),
    "chunk-size-negative": POST + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
    "two-host-fields": GET_H + b"Host: other\r\n\r\n",
    "no-host-http11": b"GET /headers HTTP/1.1\r\nX-A: 1\r\n\r\n",
}


def _assert_refused(c: Client, status: int) -> Response:
    resp = c.response()
    assert resp.status == status, resp
    assert resp.header("x-meshlayer-error") is not None, resp
    assert (resp.header("connection") or "").lower() == "close", resp
    assert json.loads(resp.body)["status"] == status
    assert c.closed(), "the connection must be closed after a refusal"
    return resp


@pytest.mark.parametrize("data", list(REFUSED.values()), ids=list(REFUSED))
def test_bad_framing_is_refused_with_400_and_never_forwarded(shared: Mesh, data: bytes) -> None:
    before = shared.up.stats()
    with Client(shared.sc.outbound) as c:
        c.send(data)  # one write: the head and what follows arrive together
        resp = _assert_refused(c, 400)
    assert resp.header("x-meshlayer-error") == "bad-request"
    shared.assert_nothing_forwarded(before)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /headers HTTP/2.0\r\nHost: strict\r\n\r\n", 505),
        (b"CONNECT strict:80 HTTP/1.1\r\nHost: strict:80\r\n\r\n", 405),
    ],
    ids=["http2.0", "connect"],
)
def test_unsupported_version_and_connect(shared: Mesh, data: bytes, status: int) -> None:
    before = shared.up.stats()
    with Client(shared.sc.outbound) as c:
        c.send(data)
        _assert_refused(c, status)
    shared.assert_nothing_forwarded(before)


def test_good_request_after_a_pipelined_one_is_answered_before_the_refusal(shared: Mesh) -> None:
    """A good request pipelined ahead of a bad one is answered; the bad one is refused."""
    before = shared.up.stats()
    with Client(shared.sc.outbound) as c:
        c.send(get("/id") + POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab")
        first = c.response()
        assert (first.status, first.body) == (200, SVC.encode())
        _assert_refused(c, 400)
    time.sleep(0.15)
    after = shared.up.stats()
    assert after["paths"][len(before["paths"]) :] == ["/id", "/stats"]


# -- 2. 431 ---------------------------------------------------------------------


def _fields(n: int, size: int = 8) -> bytes:
    return b"".join(b"X-F%d: %b\r\n" % (i, b"v" * size) for i in range(n))


@pytest.mark.parametrize(
    "extra",
    [
        _fields(70, 1000),  # ~70 KB in 70 fields
        b"X-Big: " + b"v" * (61 * 1024) + b"\r\n",  # one huge field
        _fields(100),  # with Host: 101 fields
        _fields(2000),  # far more
    ],
    ids=["section-over-60k", "single-field-over-60k", "101-fields", "2000-fields"],
)
def test_oversized_header_section_is_431(shared: Mesh, extra: bytes) -> None:
    before = shared.up.stats()
    with Client(shared.sc.outbound) as c:
        c.send(GET_H + extra + b"\r\n")
        _assert_refused(c, 431)
    shared.assert_nothing_forwarded(before)


def test_header_limits_are_not_refused_below_the_bound(shared: Mesh) -> None:
    # Host + 99 fields = 100 fields: allowed (the upstream's own limit is 16 KiB)
    resp = exchange(shared.sc.outbound, GET_H + _fields(99) + b"\r\n")
    seen = upstream_headers(resp)
    assert seen["x-f0"] == ["v" * 8] and seen["x-f98"] == ["v" * 8]


# -- 3. bad framing from the upstream ---------------------------------------------


@pytest.mark.parametrize("path", ["/bad-framing", "/bad-framing-open"])
def test_upstream_bad_framing_is_502_and_its_connection_not_reused(mesh: Mesh, path: str) -> None:
    """/bad-framing-open keeps its connection open afterwards: had the sidecar put it back
    in the pool, the next request would wait there for an answer that never comes."""
    with Client(mesh.sc.outbound) as c:
        c.send(get("/id"))
        assert c.response().body == SVC.encode()
        conns = mesh.up.stats()["connections"]  # the sidecar's one + this stats call
        c.send(get(path))
        bad = c.response()
        assert bad.status == 502, bad
        assert bad.header("x-meshlayer-error") == "bad-upstream-response"
        assert b"hello" not in bad.body  # nothing of the bad response is relayed
        # the client connection stays usable; the upstream connection is a new one
        c.send(get("/id"))
        again = c.response()
        assert (again.status, again.body) == (200, SVC.encode())
    stats = mesh.up.stats()
    # +1 new upstream connection, +1 this stats call
    assert stats["connections"] - conns == 2
    assert stats["paths"][-3:] == [path, "/id", "/stats"]


# -- 4. keep-alive on both sides -----------------------------------------------------


def test_keep_alive_reuses_one_upstream_connection(mesh: Mesh) -> None:
    before = mesh.up.stats()
    with Client(mesh.sc.outbound) as c:
        for i in range(30):
            c.send(get(f"/status/20{i % 2}"))
            resp = c.response()
            assert resp.status == 200 + i % 2, resp
            assert resp.header("connection") is None  # keep-alive is HTTP/1.1's default
        c.send(b"POST /echo HTTP/1.1\r\nHost: strict\r\nContent-Length: 2\r\n\r\nhi")
        assert c.response().body == b"hi"
    after = mesh.up.stats()
    assert after["requests"] - before["requests"] == 32
    assert after["connections"] - before["connections"] == 2  # one upstream conn + /stats


# -- 5. pipelining -------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(mesh: Mesh) -> None:
    with Client(mesh.sc.outbound) as c:
        c.send(get("/delay/150") + get("/id") + get("/status/201") + get("/delay/50"))
        answers = [c.response() for _ in range(4)]
        assert [(r.status, r.body) for r in answers] == [
            (200, b"late"),
            (200, SVC.encode()),
            (201, b"status 201"),
            (200, b"late"),
        ]
        c.send(get("/id"))  # still usable
        assert c.response().body == SVC.encode()
    paths = mesh.up.stats()["paths"]
    assert paths[-6:] == ["/delay/150", "/id", "/status/201", "/delay/50", "/id", "/stats"]


# -- 6. bodies -----------------------------------------------------------------------


def test_content_length_body_is_echoed(mesh: Mesh) -> None:
    body = bytes(range(256)) * 400  # 100 KiB, binary
    with Client(mesh.sc.outbound) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: strict\r\nContent-Length: %d\r\n\r\n" % len(body))
        c.send(body)
        resp = c.response()
        assert resp.status == 200
        assert resp.chunked  # the upstream streams it chunked; re-framed as chunked
        assert resp.body == body
        c.send(b"POST /echo HTTP/1.1\r\nHost: strict\r\nContent-Length: 0\r\n\r\n")
        empty = c.response()
        assert (empty.status, empty.body) == (200, b"")


def test_chunked_request_body_with_trailers_is_forwarded(mesh: Mesh) -> None:
    with Client(mesh.sc.outbound) as c:
        c.send(
            b"POST /echo HTTP/1.1\r\nHost: strict\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n"
            b"1;ext=1\r\n \r\n"
            b"A\r\n0123456789\r\n"
            b"0\r\nX-Checksum: abc\r\n\r\n"
        )
        resp = c.response()
        assert resp.status == 200
        assert resp.body == b"hello 0123456789"
        assert ("X-Checksum", "abc") in [(k.title(), v) for k, v in resp.trailers]
        c.send(get("/id"))  # the framing left the connection in step
        assert c.response().body == SVC.encode()
    # the upstream (h11) received one well-framed request with that body
    assert mesh.up.stats()["paths"][-3:] == ["/echo", "/id", "/stats"]


def test_chunked_request_body_in_small_writes(mesh: Mesh) -> None:
    with Client(mesh.sc.outbound) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: strict\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in [b"4\r\nab", b"cd\r", b"\n3\r\nef", b"g\r\n0\r", b"\n\r\n"]:
            time.sleep(0.02)
            c.send(piece)
        resp = c.response()
        assert (resp.status, resp.body) == (200, b"abcdefg")


def test_chunked_response_is_reframed(mesh: Mesh) -> None:
    # /echo answers chunked; a HTTP/1.0 client gets it delimited by the close instead
    with Client(mesh.sc.outbound) as c:
        c.send(b"POST /echo HTTP/1.0\r\nHost: strict\r\nContent-Length: 5\r\n\r\nhello")
        resp = c.response()
        assert resp.status == 200
        assert resp.header("transfer-encoding") is None
        assert resp.header("content-length") is None
        assert resp.body == b"hello"
        assert c.closed()
    # a Content-Length response stays a Content-Length response
    with Client(mesh.sc.outbound) as c:
        c.send(get("/bytes/70000"))
        resp = c.response()
        assert resp.header("content-length") == "70000" and not resp.chunked
        assert resp.body == b"x" * 70000


# -- 7. hop-by-hop fields --------------------------------------------------------------


def test_hop_by_hop_fields_are_removed(mesh: Mesh) -> None:
    resp = exchange(
        mesh.sc.outbound,
        get(
            "/headers",
            extra=b"Connection: x-custom\r\n"
            b"X-Custom: 1\r\n"
            b"Keep-Alive: 5\r\n"
            b"TE: trailers\r\n"
            b"Trailer: x-checksum\r\n"
            b"Proxy-Authorization: x\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Upgrade: foo\r\n"
            b"X-Normal: yes\r\n"
            b"Accept: text/plain\r\n"
            b"X-Request-Id: my-request-1\r\n"
            b"X-Forwarded-For: 10.1.2.3\r\n",
        ),
    )
    seen = upstream_headers(resp)
    for name in [
        "connection",
        "x-custom",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ]:
        assert name not in seen, (name, seen)
    assert seen["x-normal"] == ["yes"]
    assert seen["accept"] == ["text/plain"]
    assert seen["host"] == [SVC]
    assert seen["x-request-id"] == ["my-request-1"]
    assert seen["x-forwarded-for"] == ["10.1.2.3, 127.0.0.1"]
    assert resp.header("x-custom") is None


def test_connection_lists_several_fields(mesh: Mesh) -> None:
    resp = exchange(
        mesh.sc.outbound,
        get(
            "/headers",
            extra=b"Connection: keep-alive, X-One\r\nConnection: x-two\r\n"
            b"X-One: 1\r\nX-Two: 2\r\nX-Three: 3\r\n",
        ),
    )
    seen = upstream_headers(resp)
    assert "x-one" not in seen and "x-two" not in seen and "connection" not in seen
    assert seen["x-three"] == ["3"]


def test_request_id_generated_when_absent(mesh: Mesh) -> None:
    resp = exchange(mesh.sc.outbound, get("/headers"))
    seen = upstream_headers(resp)
    (rid,) = seen["x-request-id"]
    # 64 random bits drawn when the listener starts, then a count
    assert re.fullmatch(r"[0-9a-f]{16}-[1-9][0-9]*", rid)
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    (other,) = upstream_headers(exchange(mesh.sc.outbound, get("/headers")))["x-request-id"]
    assert other != rid and other[:17] == rid[:17]


# -- 8. Expect: 100-continue -------------------------------------------------------------


def test_expect_100_continue_is_relayed_before_the_body(mesh: Mesh) -> None:
    with Client(mesh.sc.outbound) as c:
        c.send(
            b"POST /echo HTTP/1.1\r\nHost: strict\r\nExpect: 100-continue\r\n"
            b"Content-Length: 11\r\n\r\n"
        )
        interim = c.response()  # must come before the body was sent: the socket times out else
        assert interim.status == 100, interim
        c.send(b"hello world")
        final = c.response()
        assert (final.status, final.body) == (200, b"hello world")
        c.send(get("/id"))
        assert c.response().body == SVC.encode()


def test_expect_100_continue_with_the_body_sent_at_once(mesh: Mesh) -> None:
    with Client(mesh.sc.outbound) as c:
        c.send(
            b"POST /echo HTTP/1.1\r\nHost: strict\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        first = c.response()
        if first.status == 100:
            first = c.response()
        assert (first.status, first.body) == (200, b"hello")


# -- 9. upgrades -------------------------------------------------------------------------


def test_websocket_upgrade_tunnels_both_ways(mesh: Mesh) -> None:
    with Client(mesh.sc.outbound) as c:
        c.send(get("/ws", extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n"))
        resp = c.response()
        assert resp.status == 101, resp
        assert (resp.header("upgrade") or "").lower() == "websocket"
        assert "upgrade" in (resp.header("connection") or "").lower()
        for msg in [b"ping", b"GET / HTTP/1.1\r\n\r\n", bytes(range(256))]:
            c.send(msg)
            want = b"echo:" + msg
            while len(c.buf) < len(want) and c._fill():
                pass
            assert c.buf == want
            c.buf = b""
    assert mesh.up.stats()["paths"][-2:] == ["/ws", "/stats"]


def test_upgrade_bytes_sent_with_the_head_are_tunnelled(mesh: Mesh) -> None:
    with Client(mesh.sc.outbound) as c:
        c.send(get("/ws", extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n") + b"early")
        assert c.response().status == 101
        while len(c.buf) < len(b"echo:early") and c._fill():
            pass
        assert c.buf == b"echo:early"


def test_tunnel_half_close_reaches_the_upstream(mesh: Mesh) -> None:
    with Client(mesh.sc.outbound) as c:
        c.send(get("/ws", extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n"))
        assert c.response().status == 101
        c.send(b"last words")
        c.sock.shutdown(socket.SHUT_WR)  # the client is done sending, still reading
        while c._fill():  # the upstream answers, sees the end, closes: so does the sidecar
            pass
        assert c.buf == b"echo:last words"
    time.sleep(0.1)  # the tunnel is gone on both sides
    assert open_connections(mesh.sc, "upstream", SVC) == 0
    assert open_connections(mesh.sc, "downstream", "outbound") == 0


def test_refused_upgrade_is_a_normal_response_without_tunnel(mesh: Mesh) -> None:
    with Client(mesh.sc.outbound) as c:
        c.send(
            get("/ws", extra=b"Connection: Upgrade\r\nUpgrade: foo\r\n") + b"GET /id HTTP/1.1\r\n"
        )
        resp = c.response()
        assert resp.status == 400, resp
        assert resp.body == b""
        # no tunnel: the bytes after the head are not echoed, and the connection ends
        assert c.closed(), c.buf
    assert mesh.up.stats()["paths"][-2:] == ["/ws", "/stats"]


# -- 10. HEAD ------------------------------------------------------------------------------


def test_head_has_the_length_of_get_but_no_body(mesh: Mesh) -> None:
    with Client(mesh.sc.outbound) as c:
        c.send(get("/id", method="HEAD"))
        head = c.response("HEAD")
        assert head.status == 200
        assert head.header("content-length") == str(len(SVC))
        c.send(get("/id"))  # had HEAD carried a body, this response would be misread
        resp = c.response()
        assert (resp.status, resp.body) == (200, SVC.encode())
        c.send(get("/status/201", method="HEAD") + get("/id"))  # pipelined after a HEAD
        head = c.response("HEAD")
        assert (head.status, head.header("content-length")) == (201, "10")
        assert c.response().body == SVC.encode()
