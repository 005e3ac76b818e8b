"""The control plane's HTTP/1.1 server on the wire: keep-alive, pipelining, chunked
bodies, 100-continue, and refusals (bad framing, oversized bodies)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.control import ADMIN_TOKEN, Control, service_doc, start_control
from tests.support.procs import Cluster, raw


@pytest.fixture
def ctl(cluster: Cluster, tmp_path: Path) -> Iterator[Control]:
    yield start_control(
        cluster.tmp, f"sqlite:{tmp_path / 'c.db'}", ["--max-body", "2000"], procs=cluster.procs
    )


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """Split Content-Length-framed responses: [(status, body)]."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


def test_pipelined_keep_alive_requests_are_answered_in_order(ctl: Control) -> None:
    doc = json.dumps({"documents": [service_doc("a")]}).encode()
    chunked = b"%x\r\n%b\r\n0\r\n\r\n" % (len(doc), doc)
    data = raw(
        ctl.port,
        b"GET /healthz HTTP/1.1\r\nHost: c\r\n\r\n"
        b"POST /v1/apply HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n"
        b"Authorization: Bearer "
        + ADMIN_TOKEN.encode()
        + b"\r\n\r\n"
        + chunked
        + b"GET /v1/resources/services/a HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n",
    )
    got = responses(data)
    assert [s for s, _ in got] == [200, 200, 200]
    assert json.loads(got[1][1])["results"][0]["action"] == "created"
    assert json.loads(got[2][1])["metadata"]["name"] == "a"


def test_expect_100_continue(ctl: Control) -> None:
    body = b'{"service": "a", "address": "127.0.0.1:1"}'
    with socket.create_connection(("127.0.0.1", ctl.port), timeout=5) as s:
        s.sendall(
            b"POST /v1/registry HTTP/1.1\r\nHost: c\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"POST /v1/apply HTTP/1.1\r\nHost: c\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            400,
        ),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /healthz HTTP/2.0\r\nHost: c\r\n\r\n", 505),
        (b"POST /v1/apply HTTP/1.1\r\nHost: c\r\nContent-Length: 2001\r\n\r\n", 413),
        (
            b"POST /v1/apply HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"7d0\r\n"
            + b"x" * 2000
            + b"\r\n"
            + b"1\r\nx\r\n0\r\n\r\n",
            413,
        ),
    ],
)
def test_refusals_answer_json_and_close(ctl: Control, request_bytes: bytes, status: int) -> None:
    data = raw(ctl.port, request_bytes)
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:200]
    assert b"connection: close" in data.lower()
    body = data.partition(b"\r\n\r\n")[2]
    assert "error" in json.loads(body)
