"""Parsing the priority class from headers and baggage; context isolation; the middlewares."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, MutableMapping
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from meshlayer import propagation as p


def test_header_wins_over_baggage() -> None:
    headers = {"X-Meshlayer-Priority": "critical", "baggage": "meshlayer-priority=batch"}
    assert p.priority_from_headers(headers) == "critical"


def test_baggage_only_and_bytes_pairs() -> None:
    pairs: list[tuple[str | bytes, str | bytes]] = [(b"baggage", b"meshlayer-priority=batch")]
    assert p.priority_from_headers(pairs) == "batch"


def test_invalid_header_falls_back_to_baggage() -> None:
    headers = {"X-MESHLAYER-PRIORITY": "not valid!", "baggage": "meshlayer-priority=batch"}
    assert p.priority_from_headers(headers) == "batch"


def test_no_class() -> None:
    assert p.priority_from_headers({}) is None
    assert p.priority_from_headers({"baggage": "userid=alice"}) is None


@pytest.mark.parametrize(
    ("baggage", "want"),
    [
        ("meshlayer-priority=critical", "critical"),
        ("userid=alice, meshlayer-priority = batch ;ttl=3, x=y", "batch"),
        ("meshlayer-priority=%63ritical", "critical"),
        ("meshlayer-priority", None),
        ("=critical", None),
        ("meshlayer-priority=", None),
        ("meshlayer-priority=bad%ZZ", None),
        ("meshlayer-priority=%FF", None),
        ("meshlayer-priority=a_b, meshlayer-priority=ok", "ok"),
        ("meshlayer-priority=" + "a" * 64, None),
        ("meshlayer-priority=" + "a" * 63, "a" * 63),
        ("meshlayer-priority=Critical", "critical"),
        (",,;, meshlayer-priority=x;;", "x"),
        ("other-meshlayer-priority=critical", None),
    ],
)
def test_baggage_edge_cases(baggage: str, want: str | None) -> None:
    assert p.class_from_baggage(baggage) == want


def test_several_baggage_headers_are_joined() -> None:
    pairs: list[tuple[str | bytes, str | bytes]] = [
        ("baggage", "a=b"),
        ("Baggage", "meshlayer-priority=batch"),
    ]
    assert p.priority_from_headers(pairs) == "batch"


CLASS = st.from_regex(r"[a-z0-9-]{1,63}", fullmatch=True)
MEMBER = st.tuples(
    st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True).filter(lambda k: k != p.BAGGAGE_KEY),
    st.text(max_size=12),
)


@given(CLASS, st.lists(MEMBER, max_size=4), st.lists(MEMBER, max_size=4), st.booleans())
def test_baggage_roundtrip(
    cls: str, before: list[tuple[str, str]], after: list[tuple[str, str]], props: bool
) -> None:
    def enc(members: list[tuple[str, str]]) -> list[str]:
        return [f"{k}={quote(v, safe='')}" for k, v in members]

    ours = f"{p.BAGGAGE_KEY}={quote(cls)}" + (";prop=1;flag" if props else "")
    assert p.class_from_baggage(",".join([*enc(before), ours, *enc(after)])) == cls


@given(st.text(max_size=80))
def test_baggage_never_raises_and_result_is_valid(value: str) -> None:
    got = p.class_from_baggage(value)
    assert got is None or p.valid_class(got) == got


def test_isolation_across_asyncio_tasks() -> None:
    async def serve(cls: str) -> list[str | None]:
        p.set_priority(cls)
        seen = []
        for _ in range(5):
            await asyncio.sleep(0)
            seen.append(p.current_priority())
        return seen

    async def main() -> list[list[str | None]]:
        return await asyncio.gather(*(serve(f"c{i}") for i in range(10)))

    results = asyncio.run(main())
    assert results == [[f"c{i}"] * 5 for i in range(10)]
    assert p.current_priority() is None


def test_isolation_across_threads() -> None:
    barrier = threading.Barrier(8, timeout=5)
    seen: dict[int, str | None] = {}

    def run(i: int) -> None:
        p.set_priority(f"t{i}")
        barrier.wait()
        seen[i] = p.current_priority()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert seen == {i: f"t{i}" for i in range(8)}
    assert p.current_priority() is None


def test_asgi_middleware_sets_and_resets() -> None:
    seen: list[str | None] = []

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        seen.append(p.current_priority())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        transport = httpx.ASGITransport(app=p.PriorityMiddleware(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await asyncio.gather(
                client.get("/", headers={p.HEADER: "critical"}),
                client.get("/", headers={"baggage": "meshlayer-priority=batch"}),
                client.get("/"),
            )
        assert p.current_priority() is None

    asyncio.run(main())
    assert sorted(seen, key=str) == sorted(["critical", "batch", None], key=str)


def test_wsgi_middleware_keeps_class_while_body_streams() -> None:
    seen: list[str | None] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        seen.append(p.current_priority())
        yield b"a"
        seen.append(p.current_priority())

    wrapped = p.wsgi_middleware(app)
    body = wrapped({"HTTP_BAGGAGE": "meshlayer-priority=batch"}, lambda *a: None)
    assert p.current_priority() is None
    assert list(body) == [b"a"]
    assert seen == ["batch", "batch"]
    assert p.current_priority() is None


def _headers_after_hooks(client_headers: dict[str, str]) -> dict[str, str]:
    request = httpx.Request("GET", "http://t/", headers=client_headers)
    p.httpx_event_hook(request)
    return dict(request.headers)


def test_hooks_add_only_when_set_and_absent() -> None:
    assert p.HEADER not in _headers_after_hooks({})
    token = p.set_priority("critical")
    try:
        assert _headers_after_hooks({})[p.HEADER] == "critical"
        assert _headers_after_hooks({p.HEADER: "batch"})[p.HEADER] == "batch"
        prepared = requests.Request("GET", "http://t/").prepare()
        p.requests_session().get_adapter("http://t/").add_headers(prepared)
        assert prepared.headers[p.HEADER] == "critical"
    finally:
        p.reset_priority(token)


def test_requests_session_keeps_retries() -> None:
    s = requests.Session()
    s.mount("http://", requests.adapters.HTTPAdapter(max_retries=3))
    assert p.requests_session(s).get_adapter("http://x/").max_retries.total == 3
