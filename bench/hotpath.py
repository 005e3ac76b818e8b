"""The sidecar's request path in-process, without sockets: Python cost per request.

The outbound ``Listener`` of a real ``Sidecar`` (not started), its
``DownstreamConnection``, ``Exchange`` and ``UpstreamConnection`` are wired to fake
transports that only record what is written, then one request is fed in and
one response fed back, N times. What is left is exactly the Python work the
sidecar does per request (parse, route, balance, pool, re-frame, observe),
without the kernel's share. Use it to measure hot-path changes before and
after: ``python bench/hotpath.py [--requests N]``.

Timings on a shared machine wander by 10-20 %; instruction counts do not.
For a change worth a few per cent, count instructions under callgrind and
take the difference of two runs, which cancels start-up and warm-up::

    valgrind --tool=callgrind python bench/hotpath.py --requests 1000
    valgrind --tool=callgrind python bench/hotpath.py --requests 6000
    # (second total - first total) / 5000 = instructions per request

``--minimal`` runs the same loop through bench/minimal_forwarder.py instead:
the floor of a Python forwarder with no features.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from meshlayer.config import load_documents
from meshlayer.proxy.sidecar import Sidecar, SidecarOptions
from meshlayer.proxy.upstream import UpstreamConnection

CONFIG = """
apiVersion: meshlayer/v1
kind: Service
metadata: {name: web}
spec:
  endpoints: [{address: "127.0.0.1:9", meshed: false}]
"""

REQUEST = (
    b"GET /api/items?page=2 HTTP/1.1\r\nHost: web\r\nUser-Agent: bench/1.0\r\n"
    b"Accept: application/json\r\nAccept-Encoding: gzip\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sat, 28 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)


class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


async def main(n: int, outbound: str = "") -> None:
    """``outbound``: the service's ``spec.outbound`` (e.g. ``{concurrency: 64}``)."""
    config = load_documents(CONFIG + (f"  outbound: {outbound}\n" if outbound else ""), "bench")
    # The sidecar's own outbound listener, wired as `meshlayer sidecar` wires it.
    addr = ("127.0.0.1", 9)
    sidecar = Sidecar(SidecarOptions("bench", addr, addr, addr, addr), config)
    listener = sidecar.outbound
    router = sidecar.router
    rt = router.services["web"]
    state = rt.balancer.states[0]
    pool = rt.pools[listener.classes.get("default").index]  # type: ignore[union-attr]
    up = UpstreamConnection(pool, state)
    up_t = FakeTransport()
    up.connection_made(up_t)
    pool.connections = rt.class_pools.connections = 1
    pool.idle[state] = [up]
    down = listener.protocol()
    down_t = FakeTransport()
    down.connection_made(down_t)

    for _ in range(1000):  # warm up
        down.data_received(REQUEST)
        up.data_received(RESPONSE)
    down_t.out.clear()
    up_t.out.clear()
    t0 = time.perf_counter()
    for _ in range(n):
        down.data_received(REQUEST)
        up.data_received(RESPONSE)
    elapsed = time.perf_counter() - t0
    assert len(down_t.out) == n and len(up_t.out) == n, (len(down_t.out), len(up_t.out))
    assert down_t.out[-1].startswith(b"HTTP/1.1 200 OK\r\n")
    print(f"{n} requests: {elapsed / n * 1e6:.2f} us of Python per request (in-process, no I/O)")


async def minimal(n: int) -> None:
    import minimal_forwarder as mf  # bench/ is on sys.path when run as a script

    pool: list[mf.Upstream] = []
    up = mf.Upstream(pool)
    up_t = FakeTransport()
    up.connection_made(up_t)  # type: ignore[arg-type]
    pool.append(up)
    client = mf.Client(("127.0.0.1", 9), pool)
    down_t = FakeTransport()
    client.connection_made(down_t)  # type: ignore[arg-type]
    for _ in range(1000):  # warm up
        client.data_received(REQUEST)
        up.data_received(RESPONSE)
    down_t.out.clear()
    up_t.out.clear()
    t0 = time.perf_counter()
    for _ in range(n):
        client.data_received(REQUEST)
        up.data_received(RESPONSE)
    elapsed = time.perf_counter() - t0
    assert len(down_t.out) == n and len(up_t.out) == n, (len(down_t.out), len(up_t.out))
    assert down_t.out[-1].startswith(b"HTTP/1.1 200 OK\r\n")
    print(f"{n} requests: {elapsed / n * 1e6:.2f} us of Python per request (minimal forwarder)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--minimal", action="store_true", help="the minimal forwarder instead")
    ap.add_argument(
        "--outbound", default="", help="spec.outbound, e.g. '{concurrency: adaptive}' (admission)"
    )
    args = ap.parse_args()
    asyncio.run(minimal(args.requests) if args.minimal else main(args.requests, args.outbound))
