"""The demo's apps: a small tea shop, plain Python HTTP services that only know service names.

Run one per process (the demo starts them all, each behind its own sidecar)::

    python -m meshlayer.demo.services catalog --port 18022
    python -m meshlayer.demo.services frontend --port 18012 --outbound 127.0.0.1:18010

The call graph (every arrow goes through the caller's sidecar, then the callee's)::

    gateway ─► frontend ─┬─► catalog          GET /items, /items/<id>
                         ├─► cart             GET/POST /cart/<user>
                         ├─► recommendations  GET /recommendations/<id>   (the bottleneck)
                         └─► checkout ─┬─► payment    POST /charge
                                       ├─► inventory  POST /reserve
                                       └─► RabbitMQ queue "emails" ─► email (worker)

- ``frontend``: ``GET /`` (home: the items, the user's cart, recommendations),
  ``GET /product/<id>`` (one item and what else to buy), ``POST /checkout``
  (the user's cart, or ``{"items": [...]}``, ordered through ``checkout``).
  The user is the ``x-user`` header (``guest`` without). A backend the mesh
  shed makes the page a 503 with ``Retry-After`` (the caller should back
  off); any other backend failure a 502.
- ``recommendations``: a model server with ``--workers`` workers (2) that
  each take ``--work-ms`` (25 ms) per answer: its capacity is fixed, about
  ``workers / work`` answers per second, so a crawler pushes it past it.
- ``checkout`` charges ``payment``, reserves at ``inventory``, then hands an
  order-confirmation email to RabbitMQ at the request's priority (see
  :mod:`meshlayer.demo.mail`); ``email`` consumes and "sends" them
  (``--work-ms`` each) and answers ``GET /stats``: emails sent and their
  time in the queue, by class.
- Every app answers ``GET /healthz``, and says in ``x-shop-priority`` which
  class the request it answered carried.

Priority propagation is the one thing an app must do for the mesh: each
request's class (the ``x-meshlayer-priority`` header its sidecar set) goes
into a context variable while it is served
(:func:`meshlayer.propagation.set_priority`, as the WSGI/ASGI middleware
does), and :class:`MeshClient` copies it onto every call it makes, so the
next sidecar schedules that call in the same class.

The apps reach each other only through their sidecar's outbound listener, as
an explicit HTTP proxy (absolute-form ``GET http://catalog/items``), using the
standard library only (``http.server``, ``http.client``), keep-alive on both sides.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
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

from meshlayer import propagation

SERVICES = (
    "frontend",
    "catalog",
    "cart",
    "recommendations",
    "checkout",
    "payment",
    "inventory",
    "email",
)
CALLERS = ("frontend", "checkout")
"""The apps that call other services (they need ``--outbound``)."""
PRIORITY_ECHO = "x-shop-priority"
"""Response header: the class of the request the app answered ("-" for none)."""
FORWARDED = ("x-request-id", "x-user")
"""Request headers the apps pass on to their backends, besides the class."""

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

BACKEND_TIMEOUT = 10.0
"""Seconds an app waits for a backend (through its sidecar)."""


class BackendError(Exception):
    """A backend call that did not give a usable answer."""

    def __init__(
        self, backend: str, detail: str, status: int | None = None, shed: str | None = None
    ) -> None:
        super().__init__(f"{backend}: {detail}")
        self.backend = backend
        self.detail = detail
        self.status = status
        self.shed = shed
        """``Retry-After`` of a request the mesh shed (``x-meshlayer-error: shed``), else None."""


class MeshClient:
    """Calls other services through the sidecar's outbound listener.

    One keep-alive connection per thread (the server runs a thread per client
    connection). Requests are absolute-form, as to any HTTP proxy, and carry the
    class of the request being served (:func:`meshlayer.propagation.current_priority`).
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

    def call(
        self, method: str, service: str, path: str, headers: dict[str, str], body: Any = None
    ) -> Any:
        """``METHOD http://<service><path>``; the decoded JSON body of a 2xx answer."""
        url = f"http://{service}{path}"
        headers = {"Accept": "application/json", **headers}
        cls = propagation.current_priority()
        if cls is not None:  # the one line that carries the class to the next hop
            headers[propagation.HEADER] = cls
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn = self._conn()
            reused = conn.sock is not None
            try:
                conn.request(method, url, body=data, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
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
            if not 200 <= resp.status < 300:
                reason = resp.getheader("x-meshlayer-error")
                shed = None
                if reason == "shed" or resp.getheader("retry-after"):
                    shed = resp.getheader("retry-after") or "1"
                detail = f"answered {resp.status}" + (f" (mesh: {reason})" if reason else "")
                raise BackendError(service, detail, resp.status, shed)
            try:
                return json.loads(payload)
            except ValueError as e:
                raise BackendError(service, "answered with invalid JSON", resp.status) from e
        raise AssertionError("unreachable")


Reply = tuple[int, Any]
Handler = Callable[["AppHandler", list[str], Any], Reply]


class AppHandler(BaseHTTPRequestHandler):
    """Routes requests to the app's handlers with the request's class in context; JSON out."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "meshlayer-demo"

    app: App  # set on the subclass made per server
    retry_after: str | None = None
    """``Retry-After`` of the answer being made (a backend was shed)."""

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self.handle_one("GET")

    def do_POST(self) -> None:
        self.handle_one("POST")

    def handle_one(self, method: str) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        self.query = parse_qs(parts.query)
        token = propagation.set_priority(propagation.priority_from_headers(self.headers.items()))
        try:
            status, payload = self.dispatch(method, parts.path, raw)
            self.reply(status, payload)
        finally:
            propagation.reset_priority(token)

    def dispatch(self, method: str, path: str, raw: bytes) -> Reply:
        if path == "/healthz":
            return 200, {"status": "ok", "replica": self.app.replica}
        segments = [s for s in path.split("/") if s]
        for m, route, handler in self.app.routes:
            if m != method:
                continue
            want = [s for s in route.split("/") if s]
            if len(want) != len(segments) or any(
                w != "*" and w != s for w, s in zip(want, segments, strict=True)
            ):
                continue
            args = [s for w, s in zip(want, segments, strict=True) if w == "*"]
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                return 400, {"error": "bad-json"}
            try:
                return handler(self, args, body)
            except BackendError as e:
                return self.backend_failed(e)
            except Exception as e:  # a bug in a demo app: say so, keep serving
                return 500, {"error": "internal", "detail": repr(e)}
        return 404, {"error": "not-found", "path": path, "replica": self.app.replica}

    def backend_failed(self, e: BackendError) -> Reply:
        answer = {"error": "backend-failed", "backend": e.backend, "detail": e.detail}
        if e.shed is not None:
            # The mesh shed our call to save its capacity for more important work: the
            # page cannot be built now; the client should come back later.
            self.retry_after = e.shed
            return 503, {**answer, "error": "backend-shed"}
        return 502, answer

    def forwarded(self) -> dict[str, str]:
        """Headers to pass on to backends."""
        out = {}
        for name in FORWARDED:
            value = self.headers.get(name)
            if value:
                out[name] = value
        return out

    def user(self) -> str:
        return (self.headers.get("x-user") or "guest")[:64]

    def reply(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", self.app.replica)
        self.send_header(PRIORITY_ECHO, propagation.current_priority() or "-")
        if self.retry_after is not None:
            self.send_header("Retry-After", self.retry_after)
            self.retry_after = None
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.app.access_log:
            super().log_message(format, *args)


class App:
    """One demo service: its name, replica name, routes and outbound client."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.name: str = args.name
        self.replica: str = args.replica or f"{args.name}-1"
        self.access_log: bool = args.access_log
        self.work = args.work_ms / 1000.0
        self.mesh = MeshClient(*args.outbound) if args.outbound is not None else None
        self.workers = threading.BoundedSemaphore(max(1, args.workers))
        self.carts: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        self.order_ids = itertools.count(1001)
        self.outbox: Any = None
        self.mailer: Any = None
        if self.name == "checkout" and args.amqp:
            from meshlayer.demo.mail import Outbox

            self.outbox = Outbox(args.amqp)
        if self.name == "email" and args.amqp:
            from meshlayer.demo.mail import Mailer

            self.mailer = Mailer(args.amqp, self.work, args.prefetch)
        a = App
        routes: dict[str, list[tuple[str, str, Handler]]] = {
            "frontend": [
                ("GET", "/", a.home),
                ("GET", "/product/*", a.product),
                ("POST", "/checkout", a.checkout_page),
            ],
            "catalog": [("GET", "/items", a.items), ("GET", "/items/*", a.item)],
            "cart": [("GET", "/cart/*", a.cart_get), ("POST", "/cart/*", a.cart_add)],
            "recommendations": [("GET", "/recommendations/*", a.recommend)],
            "checkout": [("POST", "/orders", a.order)],
            "payment": [("POST", "/charge", a.charge)],
            "inventory": [("POST", "/reserve", a.reserve)],
            "email": [("GET", "/stats", a.email_stats)],
        }
        self.routes = routes[self.name]

    def backend(self) -> MeshClient:
        assert self.mesh is not None
        return self.mesh

    # -- frontend --------------------------------------------------------------

    @staticmethod
    def home(h: AppHandler, args: list[str], body: Any) -> Reply:
        mesh, fwd, user = h.app.backend(), h.forwarded(), h.user()
        items = mesh.call("GET", "catalog", "/items", fwd)["items"]
        cart = mesh.call("GET", "cart", f"/cart/{user}", fwd)
        pick = random.choice(items)
        recs = mesh.call("GET", "recommendations", f"/recommendations/{pick['id']}", fwd)
        return 200, {
            "user": user,
            "items": items,
            "cart": cart["items"],
            "recommended": recs["items"],
            "priority": propagation.current_priority(),
        }

    @staticmethod
    def product(h: AppHandler, args: list[str], body: Any) -> Reply:
        mesh, fwd = h.app.backend(), h.forwarded()
        try:
            item = mesh.call("GET", "catalog", f"/items/{args[0]}", fwd)["item"]
        except BackendError as e:
            if e.status == 404:
                return 404, {"error": "no-such-item", "item": args[0]}
            raise
        recs = mesh.call("GET", "recommendations", f"/recommendations/{item['id']}", fwd)
        return 200, {
            "item": item,
            "recommended": recs["items"],
            "priority": propagation.current_priority(),
        }

    @staticmethod
    def checkout_page(h: AppHandler, args: list[str], body: Any) -> Reply:
        mesh, fwd, user = h.app.backend(), h.forwarded(), h.user()
        wanted = body.get("items") if isinstance(body, dict) else None
        if not wanted:
            wanted = mesh.call("GET", "cart", f"/cart/{user}", fwd)["items"] or [1]
        order = mesh.call("POST", "checkout", "/orders", fwd, {"user": user, "items": wanted})
        return 201, {**order, "priority": propagation.current_priority()}

    # -- catalog, cart, recommendations ----------------------------------------

    @staticmethod
    def items(h: AppHandler, args: list[str], body: Any) -> Reply:
        return 200, {"items": list(ITEMS)}

    @staticmethod
    def item(h: AppHandler, args: list[str], body: Any) -> Reply:
        item = _find_item(args[0])
        if item is None:
            return 404, {"error": "no-such-item", "item": args[0]}
        return 200, {"item": item}

    @staticmethod
    def cart_get(h: AppHandler, args: list[str], body: Any) -> Reply:
        with h.app.lock:
            return 200, {"user": args[0], "items": list(h.app.carts.get(args[0], []))}

    @staticmethod
    def cart_add(h: AppHandler, args: list[str], body: Any) -> Reply:
        item = _find_item(str(body.get("item") if isinstance(body, dict) else ""))
        if item is None:
            return 400, {"error": "no-such-item"}
        with h.app.lock:
            cart = h.app.carts.setdefault(args[0], [])
            cart[:] = [*cart, item["id"]][-20:]
            return 200, {"user": args[0], "items": list(cart)}

    @staticmethod
    def recommend(h: AppHandler, args: list[str], body: Any) -> Reply:
        item = _find_item(args[0])
        if item is None:
            return 404, {"error": "no-such-item", "item": args[0]}
        with h.app.workers:  # a fixed number of model workers: a fixed capacity
            time.sleep(h.app.work)
        rng = random.Random(item["id"])
        others = [i for i in ITEMS if i["id"] != item["id"]]
        return 200, {"for": item["id"], "items": rng.sample(others, 3)}

    # -- checkout, payment, inventory, email ------------------------------------

    @staticmethod
    def order(h: AppHandler, args: list[str], body: Any) -> Reply:
        mesh, fwd = h.app.backend(), h.forwarded()
        if not isinstance(body, dict) or not body.get("items"):
            return 400, {"error": "no-items"}
        ids = [int(i) for i in body["items"] if _find_item(str(i)) is not None]
        amount = round(sum(_price(i) for i in ids), 2)
        mesh.call("POST", "inventory", "/reserve", fwd, {"items": ids})
        paid = mesh.call("POST", "payment", "/charge", fwd, {"amount": amount})
        order_id = next(h.app.order_ids)
        cls = propagation.current_priority() or "default"
        email = "off"
        if h.app.outbox is not None:
            message = {
                "order": order_id,
                "to": body.get("user", "guest"),
                "class": cls,
                "sent_at": time.time(),
            }
            email = "queued" if h.app.outbox.send(message, cls) else "failed"
        return 201, {"order": order_id, "amount": amount, "payment": paid, "email": email}

    @staticmethod
    def charge(h: AppHandler, args: list[str], body: Any) -> Reply:
        time.sleep(random.uniform(0.001, 0.003))
        amount = body.get("amount") if isinstance(body, dict) else None
        return 200, {"charged": amount, "receipt": f"r-{random.getrandbits(32):08x}"}

    @staticmethod
    def reserve(h: AppHandler, args: list[str], body: Any) -> Reply:
        items = body.get("items") if isinstance(body, dict) else None
        return 200, {"reserved": items or []}

    @staticmethod
    def email_stats(h: AppHandler, args: list[str], body: Any) -> Reply:
        if h.app.mailer is None:
            return 200, {"broker": None, "sent": {}, "wait": {}}
        return 200, h.app.mailer.stats()


def _find_item(key: str) -> dict[str, Any] | None:
    try:
        wanted = int(key)
    except ValueError:
        return None
    for item in ITEMS:
        if item["id"] == wanted:
            return item
    return None


def _price(key: int) -> float:
    item = _find_item(str(key))
    return float(item["price"]) if item else 0.0


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m meshlayer.demo.services",
        description=(
            "Run one app of the meshlayer demo shop. Apps call each other through "
            "their sidecar's outbound listener."
        ),
    )
    p.add_argument("name", choices=SERVICES, help="which service to run")
    p.add_argument("--port", type=int, required=True, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    p.add_argument(
        "--outbound",
        type=_address,
        metavar="HOST:PORT",
        help="the sidecar's outbound listener (required for frontend and checkout)",
    )
    p.add_argument("--replica", help="this instance's name, reported in answers (default: NAME-1)")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="recommendations: answers computed at once (default: %(default)s)",
    )
    p.add_argument(
        "--work-ms",
        type=float,
        default=25.0,
        help="recommendations: ms per answer; email: ms per email sent (default: %(default)s)",
    )
    p.add_argument(
        "--amqp",
        metavar="URL",
        help="checkout and email: the RabbitMQ broker (amqp://USER:PASS@HOST:PORT/); "
        "without it checkout queues no email and the email worker idles",
    )
    p.add_argument(
        "--prefetch", type=int, default=1, help="email: unacknowledged messages held at once"
    )
    p.add_argument("--access-log", action="store_true", help="log every request to stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.name in CALLERS and args.outbound is None:
        print(f"{args.name} needs --outbound HOST:PORT (its sidecar)", file=sys.stderr)
        return 2
    try:
        app = App(args)
    except Exception as e:
        print(f"{args.name}: cannot start: {e}", file=sys.stderr)
        return 1
    handler = type("Handler", (AppHandler,), {"app": app})

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    try:
        server = Server((args.host, args.port), handler)
    except OSError as e:
        print(f"{app.replica}: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if app.mailer is not None:
        app.mailer.start()
    print(f"{app.replica} ({app.name}) listening on {args.host}:{args.port}", file=sys.stderr)
    sys.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if app.mailer is not None:
            app.mailer.stop()
        if app.outbox is not None:
            app.outbox.close()
    print(f"{app.replica} stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
