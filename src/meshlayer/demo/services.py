"""The demo's apps: plain Python HTTP services that only know service names.

Run one per process::

    python -m meshlayer.demo.services catalog --port 18022 --replica catalog-v1-1
    python -m meshlayer.demo.services reviews --port 18052
    python -m meshlayer.demo.services frontend --port 18012 --outbound 127.0.0.1:18010

- ``catalog``: ``GET /items`` is the item list as JSON, ``GET /items/<id>`` one
  item; every answer says which replica served it.
- ``reviews``: ``GET /reviews/<id>`` is the reviews of one item, after a small
  random delay (``--max-delay-ms``).
- ``frontend``: ``GET /`` (or ``/shop``, ``?item=<id>`` to choose) asks
  ``catalog`` for the items, then ``reviews`` for one of them, and answers
  with both, plus which replica of each served it; 502 (JSON) when a
  backend call fails. It passes ``x-request-id`` and ``x-canary`` on to
  both (the demo's HTTPRoute sends ``x-canary: 1`` to catalog-v2).
- Every app answers ``GET /healthz``.

The apps reach each other only through their sidecar's outbound listener,
as an explicit HTTP proxy: absolute-form ``GET http://catalog/items``.
They use the standard library only (``http.server``, ``http.client``):
HTTP/1.1 with keep-alive on both sides.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

SERVICES = ("frontend", "catalog", "reviews")
FORWARDED = ("x-request-id", "x-canary")
"""Request headers the frontend passes on to its backends (routes may match on them)."""

ITEMS: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "Sencha", "kind": "green tea", "price": 6.5},
    {"id": 2, "name": "Gyokuro", "kind": "green tea", "price": 14.0},
    {"id": 3, "name": "Darjeeling first flush", "kind": "black tea", "price": 9.0},
    {"id": 4, "name": "Assam", "kind": "black tea", "price": 5.0},
    {"id": 5, "name": "Tieguanyin", "kind": "oolong", "price": 11.0},
    {"id": 6, "name": "Da Hong Pao", "kind": "oolong", "price": 16.5},
    {"id": 7, "name": "Shou pu-erh", "kind": "dark tea", "price": 12.0},
    {"id": 8, "name": "Rooibos", "kind": "herbal", "price": 4.5},
)

_REVIEWERS = ("ana", "bo", "chen", "dara", "eli", "femi", "gus", "hana")
_COMMENTS = (
    "lovely, would buy again",
    "a bit pricey for what it is",
    "my morning favourite",
    "arrived quickly, well packed",
    "too strong for me",
    "smooth and fragrant",
)

BACKEND_TIMEOUT = 5.0
"""Seconds the frontend waits for a backend (through its sidecar)."""


class BackendError(Exception):
    """A backend call that did not give a usable answer."""

    def __init__(self, backend: str, detail: str, status: int | None = None) -> None:
        super().__init__(f"{backend}: {detail}")
        self.backend = backend
        self.detail = detail
        self.status = status


class MeshClient:
    """Calls other services through the sidecar's outbound listener.

    One keep-alive connection per thread (the server runs a thread per
    client connection). Requests are absolute-form, as to any HTTP proxy.
    """

    def __init__(self, host: str, port: int, timeout: float = BACKEND_TIMEOUT) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def get_json(self, service: str, path: str, headers: dict[str, str]) -> Any:
        """``GET http://<service><path>``; the decoded JSON body of a 200 answer."""
        url = f"http://{service}{path}"
        for attempt in (1, 2):
            conn = self._conn()
            reused = conn.sock is not None
            try:
                conn.request("GET", url, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                self._drop()
                # A kept-alive connection the sidecar closed meanwhile: one fresh try.
                if reused and attempt == 1:
                    continue
                raise BackendError(service, f"connection failed: {e!r}") from e
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                raise BackendError(service, f"request failed: {e!r}") from e
            if resp.will_close:
                self._drop()
            if resp.status != 200:
                reason = resp.getheader("x-meshlayer-error")
                detail = f"answered {resp.status}" + (f" (mesh: {reason})" if reason else "")
                raise BackendError(service, detail, resp.status)
            try:
                return json.loads(body)
            except ValueError as e:
                raise BackendError(service, "answered with invalid JSON", resp.status) from e
        raise AssertionError("unreachable")


Handler = Callable[["AppHandler", str, dict[str, list[str]]], tuple[int, Any]]


class AppHandler(BaseHTTPRequestHandler):
    """Routes GET requests to the app's handlers; answers in JSON."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "meshlayer-demo"

    app: App  # set on the subclass made per server

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        query = parse_qs(parts.query)
        if path == "/healthz":
            self.reply(200, {"status": "ok", "replica": self.app.replica})
            return
        for route, handler in self.app.routes:
            # "/items/" matches "/items/3"; every other route matches exactly.
            if path == route or (route != "/" and route.endswith("/") and path.startswith(route)):
                try:
                    status, payload = handler(self, path, query)
                except Exception as e:  # a bug in a demo app: say so, keep serving
                    status, payload = 500, {"error": "internal", "detail": repr(e)}
                self.reply(status, payload)
                return
        self.reply(404, {"error": "not-found", "path": path, "replica": self.app.replica})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        self.reply(405, {"error": "method-not-allowed", "allowed": ["GET"]})

    def reply(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", self.app.replica)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.app.access_log:
            super().log_message(format, *args)


class App:
    """One demo service: its name, replica name, routes and outbound client."""

    def __init__(
        self,
        name: str,
        replica: str,
        mesh: MeshClient | None,
        max_delay_ms: float = 10.0,
        access_log: bool = False,
    ) -> None:
        self.name = name
        self.replica = replica
        self.mesh = mesh
        self.max_delay_ms = max_delay_ms
        self.access_log = access_log
        routes: dict[str, list[tuple[str, Handler]]] = {
            "catalog": [("/items", App.catalog_list), ("/items/", App.catalog_item)],
            "reviews": [("/reviews/", App.reviews_for)],
            "frontend": [("/", App.frontend_page), ("/shop", App.frontend_page)],
        }
        self.routes = routes[name]

    # -- catalog ---------------------------------------------------------------

    @staticmethod
    def catalog_list(h: AppHandler, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        return 200, {"replica": h.app.replica, "items": list(ITEMS)}

    @staticmethod
    def catalog_item(h: AppHandler, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        item = _find_item(path.rsplit("/", 1)[-1])
        if item is None:
            return 404, {"error": "no-such-item", "replica": h.app.replica}
        return 200, {"replica": h.app.replica, "item": item}

    # -- reviews ---------------------------------------------------------------

    @staticmethod
    def reviews_for(h: AppHandler, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        item = _find_item(path.rsplit("/", 1)[-1])
        if item is None:
            return 404, {"error": "no-such-item", "replica": h.app.replica}
        time.sleep(random.uniform(0.0, h.app.max_delay_ms) / 1000.0)
        rng = random.Random(item["id"])  # the same reviews for an item every time
        reviews = [
            {
                "author": rng.choice(_REVIEWERS),
                "stars": rng.randint(2, 5),
                "comment": rng.choice(_COMMENTS),
            }
            for _ in range(rng.randint(1, 4))
        ]
        return 200, {"replica": h.app.replica, "item_id": item["id"], "reviews": reviews}

    # -- frontend --------------------------------------------------------------

    @staticmethod
    def frontend_page(h: AppHandler, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        mesh = h.app.mesh
        assert mesh is not None
        started = time.perf_counter()
        headers = {"Accept": "application/json"}
        for name in FORWARDED:  # one request id across the call graph; the canary flag
            value = h.headers.get(name)
            if value:
                headers[name] = value
        try:
            catalog = mesh.get_json("catalog", "/items", headers)
            items = catalog["items"]
            wanted = query.get("item", [None])[0]
            if wanted is not None:
                item = _find_item(wanted, items)
                if item is None:
                    return 404, {"error": "no-such-item", "item": wanted}
            else:
                item = random.choice(items)
            reviews = mesh.get_json("reviews", f"/reviews/{item['id']}", headers)
        except BackendError as e:
            return 502, {
                "error": "backend-failed",
                "backend": e.backend,
                "detail": e.detail,
                "status": e.status,
                "replica": h.app.replica,
            }
        except (KeyError, TypeError, IndexError) as e:
            return 502, {"error": "backend-bad-answer", "detail": repr(e)}
        stars = [r["stars"] for r in reviews["reviews"]]
        return 200, {
            "item": item,
            "rating": round(sum(stars) / len(stars), 2) if stars else None,
            "reviews": reviews["reviews"],
            "served_by": {
                "frontend": h.app.replica,
                "catalog": catalog.get("replica"),
                "reviews": reviews.get("replica"),
            },
            "elapsed_ms": round((time.perf_counter() - started) * 1000.0, 2),
        }


def _find_item(key: str, items: Sequence[dict[str, Any]] = ITEMS) -> dict[str, Any] | None:
    try:
        wanted = int(key)
    except ValueError:
        return None
    for item in items:
        if item.get("id") == wanted:
            return item
    return None


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m meshlayer.demo.services",
        description=(
            "Run one app of the meshlayer demo (frontend, catalog or reviews). "
            "Apps call each other through their sidecar's outbound listener."
        ),
    )
    p.add_argument("name", choices=SERVICES, help="which service to run")
    p.add_argument("--port", type=int, required=True, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    p.add_argument(
        "--outbound",
        type=_address,
        metavar="HOST:PORT",
        help="the sidecar's outbound listener (required for frontend)",
    )
    p.add_argument("--replica", help="this instance's name, reported in answers (default: NAME-1)")
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=10.0,
        help="reviews: random delay per answer, 0 to this many ms (default: %(default)s)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request to stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.name == "frontend" and args.outbound is None:
        print("frontend needs --outbound HOST:PORT (its sidecar)", file=sys.stderr)
        return 2
    mesh = MeshClient(*args.outbound) if args.outbound is not None else None
    app = App(
        args.name,
        args.replica or f"{args.name}-1",
        mesh,
        max_delay_ms=args.max_delay_ms,
        access_log=args.access_log,
    )
    handler = type("Handler", (AppHandler,), {"app": app})

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    try:
        server = Server((args.host, args.port), handler)
    except OSError as e:
        print(f"{app.replica}: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"{app.replica} ({app.name}) listening on {args.host}:{args.port}", file=sys.stderr)
    sys.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print(f"{app.replica} stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
