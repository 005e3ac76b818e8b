"""The priority class travels three hops through apps that use meshlayer.propagation.

A (WSGI, ``wsgi_middleware``) calls B through a real sidecar with a ``requests``
session from ``requests_session()``; B (WSGI too) calls C through the sidecar
with ``httpx`` and ``httpx_event_hook``; C is the h11 test upstream, whose
``/headers`` answer is passed back up the chain. A and B run on
``wsgiref`` servers in threads of the test process.
"""

from __future__ import annotations

import asyncio
import json
import socketserver
import threading
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import aiohttp
import httpx
import pytest

from meshlayer import propagation as p
from tests.support.procs import Cluster, Sidecar, request, service_yaml


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


def _serve(app: WSGIApplication) -> tuple[int, WSGIServer]:
    server = make_server("127.0.0.1", 0, app, server_class=_Server, handler_class=_QuietHandler)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return server.server_port, server


def _reply(start_response: StartResponse, status: int, body: bytes) -> Iterable[bytes]:
    start_response(f"{status} X", [("content-length", str(len(body)))])
    return [body]


@pytest.fixture
def chain(cluster: Cluster) -> Iterator[tuple[Sidecar, int]]:
    """Sidecar routing b and c, and A's port; A → (sidecar) → B → (sidecar) → C."""
    c = cluster.upstream("c")
    servers: list[WSGIServer] = []
    box: dict[str, Sidecar] = {}

    def b_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        sc = box["sc"]
        with httpx.Client(event_hooks={"request": [p.httpx_event_hook]}, timeout=5) as client:
            r = client.get(f"http://127.0.0.1:{sc.outbound}/headers", headers={"host": "c"})
        return _reply(start_response, r.status_code, r.content)

    b_port, b_server = _serve(p.wsgi_middleware(b_app))
    servers.append(b_server)
    session = p.requests_session()

    def a_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        sc = box["sc"]
        r = session.get(f"http://127.0.0.1:{sc.outbound}/", headers={"host": "b"}, timeout=5)
        return _reply(start_response, r.status_code, r.content)

    a_port, a_server = _serve(p.wsgi_middleware(a_app))
    servers.append(a_server)
    config = "---\n".join(
        [service_yaml("b", [f"127.0.0.1:{b_port}"]), service_yaml("c", [c.address])]
    )
    box["sc"] = cluster.sidecar(config, service="a")
    try:
        yield box["sc"], a_port
    finally:
        session.close()
        for server in servers:
            server.shutdown()
            server.server_close()


def _seen_by_c(body: bytes) -> list[str]:
    data = json.loads(body)
    return [v for k, v in data["headers"] if k.lower() == p.HEADER]


@pytest.mark.parametrize(
    "headers",
    [
        {p.HEADER: "critical"},
        {"baggage": "userid=alice,meshlayer-priority=critical;ttl=2"},
        {p.HEADER: "critical", "baggage": "meshlayer-priority=batch"},
    ],
)
def test_three_hops(chain: tuple[Sidecar, int], headers: dict[str, str]) -> None:
    _, a_port = chain
    status, _, body = request(a_port, host="a", headers=headers)
    assert status == 200, body
    assert _seen_by_c(body) == ["critical"]


def test_no_class_gets_the_default_and_nothing_leaks(chain: tuple[Sidecar, int]) -> None:
    """Without a class the sidecar stamps its service's default; no class leaks between requests."""
    _, a_port = chain
    for headers in ({p.HEADER: "batch"}, {}, {"baggage": "meshlayer-priority=batch"}, {}):
        status, _, body = request(a_port, host="a", headers=headers)
        assert status == 200, body
        assert _seen_by_c(body) == (["batch"] if headers else ["default"])


def test_asgi_app_with_httpx_and_aiohttp(cluster: Cluster) -> None:
    """An ASGI app (driven in-process) calls C through a sidecar with both async clients."""
    c = cluster.upstream("c")
    sc = cluster.sidecar(service_yaml("c", [c.address]), service="asgi")
    url = f"http://127.0.0.1:{sc.outbound}/headers"

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        hook = {"request": [p.httpx_async_event_hook]}
        async with httpx.AsyncClient(event_hooks=hook, timeout=5) as client:
            r1 = (await client.get(url, headers={"host": "c"})).content
        trace = [p.aiohttp_trace_config()]
        async with (
            aiohttp.ClientSession(trace_configs=trace) as session,
            session.get(url, headers={"host": "c"}) as resp,
        ):
            r2 = await resp.read()
        body = json.dumps([_seen_by_c(r1), _seen_by_c(r2)]).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def main() -> list[Any]:
        transport = httpx.ASGITransport(app=p.PriorityMiddleware(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://a", timeout=10) as cl:
            rs = await asyncio.gather(
                cl.get("/", headers={p.HEADER: "critical"}),
                cl.get("/", headers={"baggage": "meshlayer-priority=batch"}),
                cl.get("/"),
            )
        return [json.loads(r.content) for r in rs]

    assert asyncio.run(main()) == [
        [["critical"], ["critical"]],
        [["batch"], ["batch"]],
        [["default"], ["default"]],  # no class: the sidecar stamps the service's default
    ]
