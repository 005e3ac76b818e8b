"""The etcd store's pure parts: URL parsing, key ranges, gateway answers, chunked reads."""

from __future__ import annotations

import asyncio
import base64

import pytest

from meshlayer.control.etcd import parse_url
from meshlayer.control.etcd_client import EtcdError, _check, _chunks, _Retry, b64, prefix_end


def test_parse_url() -> None:
    assert parse_url("etcd://127.0.0.1:2379") == (["127.0.0.1:2379"], "/meshlayer/")
    assert parse_url("etcd://a:1,b:2, c:3/mesh-x/") == (["a:1", "b:2", "c:3"], "/mesh-x/")
    assert parse_url("etcd://a:1/p") == (["a:1"], "/p/")
    for bad in ("sqlite:x.db", "etcd://", "etcd://a", "etcd://a:99999", "etcd://a:1,:2"):
        with pytest.raises(ValueError, match="etcd://"):
            parse_url(bad)


def test_prefix_end_selects_exactly_the_prefix() -> None:
    assert base64.b64decode(prefix_end("/m/")) == b"/m0"
    assert base64.b64decode(prefix_end("a\xff")) == b"a\xc3\xc0"  # UTF-8 c3 bf, +1
    assert base64.b64decode(prefix_end("")) == b"\0"  # every key
    assert b64("/x") == "L3g="


def test_check_sorts_errors_into_retry_and_final() -> None:
    assert _check(200, b'{"header":{"revision":"3"}}') == {"header": {"revision": "3"}}
    with pytest.raises(EtcdError) as info:
        _check(404, b'{"error":"etcdserver: requested lease not found","code":5}')
    assert info.value.code == 5
    for status, body in (
        (503, b'{"error":"etcdserver: no leader","code":14}'),
        (500, b'{"error":"etcdserver: request timed out","code":4}'),
        (200, b'{"error":{"grpc_code":14,"message":"no leader"}}'),
        (502, b"<html>bad gateway</html>"),
        (200, b"[1, 2]"),
    ):
        with pytest.raises(_Retry):
            _check(status, body)


def test_chunked_reader() -> None:
    async def body() -> list[bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"5\r\nhello\r\n3;ext=1\r\n, w\r\n0\r\nX-T: 1\r\n\r\nrest")
        reader.feed_eof()
        return [c async for c in _chunks(reader)]

    assert asyncio.run(body()) == [b"hello", b", w"]
