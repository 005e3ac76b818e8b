"""Carry a request's priority class through an app's outgoing calls.

Theory of operation: a sidecar classifies each request it handles and tells the
app through the ``x-meshlayer-priority: <class>`` header (or the W3C ``baggage``
entry ``meshlayer-priority=<class>``, which OpenTelemetry already forwards).
The app only has to copy that class onto the calls it makes while serving the
request, so the next sidecar sees it too. This module does that copy:

- a server-side middleware (ASGI :class:`PriorityMiddleware`, WSGI
  :func:`wsgi_middleware`) reads the class from the incoming request and puts
  it in a :class:`contextvars.ContextVar` for as long as the request is served;
- a client-side hook (httpx, requests, aiohttp) reads the context variable and
  adds ``x-meshlayer-priority`` to each outgoing request that does not carry
  one already.

A context variable follows asyncio tasks and (via :func:`contextvars.copy_context`)
work the app hands on explicitly, and each thread of a threaded WSGI server has
its own, so concurrent requests never see each other's class.

One-liners::

    app = PriorityMiddleware(app)                         # ASGI (Starlette, FastAPI, ...)
    app.wsgi_app = wsgi_middleware(app.wsgi_app)          # WSGI (Flask, Django's WSGI handler)
    httpx.Client(event_hooks={"request": [httpx_event_hook]})
    httpx.AsyncClient(event_hooks={"request": [httpx_async_event_hook]})
    session = requests_session()                          # or requests_session(existing)
    aiohttp.ClientSession(trace_configs=[aiohttp_trace_config()])

httpx, requests and aiohttp are imported only inside their hooks, so none of
them is a dependency of meshlayer.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from meshlayer.baggage import class_values

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    import aiohttp
    import httpx
    import requests

HEADER = "x-meshlayer-priority"
"""The header that carries the class between services."""
BAGGAGE_KEY = "meshlayer-priority"
"""The W3C baggage key that carries the class when the header is absent."""

_CLASS_RE = re.compile(r"[a-z0-9-]{1,63}")
_priority: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "meshlayer_priority", default=None
)

Headers = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def current_priority() -> str | None:
    """The class of the request being served in this context, or None."""
    return _priority.get()


def set_priority(cls: str | None) -> contextvars.Token[str | None]:
    """Set the current class (validated; an invalid one sets None); reset with the token."""
    return _priority.set(valid_class(cls) if cls is not None else None)


def reset_priority(token: contextvars.Token[str | None]) -> None:
    """Undo a :func:`set_priority`."""
    _priority.reset(token)


def valid_class(value: str) -> str | None:
    """``value`` as a class name (stripped, lower-cased) if it is one, else None."""
    name = value.strip().lower()
    return name if _CLASS_RE.fullmatch(name) else None


def class_from_baggage(value: str) -> str | None:
    """The class in a W3C ``baggage`` header value, or None.

    Members are ``key=value`` with optional ``;properties``, comma-separated;
    values are percent-encoded. Malformed members and invalid class names are
    skipped; the first valid ``meshlayer-priority`` member wins.
    """
    for raw in class_values(value.encode("latin-1", "replace")):
        try:
            decoded = unquote(raw.decode("latin-1"), errors="strict")
        except UnicodeDecodeError:
            continue
        cls = valid_class(decoded)
        if cls is not None:
            return cls
    return None


def priority_from_headers(headers: Headers) -> str | None:
    """The class carried by request headers: ``x-meshlayer-priority``, else ``baggage``.

    ``headers`` is a mapping or (name, value) pairs of str or bytes (ASGI's
    form); names match case-insensitively. A valid header wins over baggage;
    an invalid header value is ignored.
    """
    items = headers.items() if isinstance(headers, Mapping) else headers
    header: str | None = None
    baggage: list[str] = []
    for name, value in items:
        n = name.decode("latin-1") if isinstance(name, bytes) else name
        v = value.decode("latin-1") if isinstance(value, bytes) else value
        n = n.lower()
        if n == HEADER and header is None:
            header = valid_class(v)
        elif n == "baggage":
            baggage.append(v)
    if header is not None:
        return header
    return class_from_baggage(",".join(baggage)) if baggage else None


class PriorityMiddleware:
    """ASGI middleware: the request's class is :func:`current_priority` while it is served.

    ``app = PriorityMiddleware(app)``
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = _priority.set(priority_from_headers(scope.get("headers") or ()))
        try:
            await self.app(scope, receive, send)
        finally:
            _priority.reset(token)


class _ContextIterable:
    """A WSGI response body whose iteration (and close) runs in the request's context."""

    def __init__(self, ctx: contextvars.Context, body: Iterable[bytes]) -> None:
        self._ctx = ctx
        self._body = body
        self._it: Iterator[bytes] = ctx.run(iter, body)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return self._ctx.run(next, self._it)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            self._ctx.run(close)


def _environ_class(environ: WSGIEnvironment) -> str | None:
    headers: list[tuple[str, str]] = []
    for key, name in (("HTTP_X_MESHLAYER_PRIORITY", HEADER), ("HTTP_BAGGAGE", "baggage")):
        value = environ.get(key)
        if isinstance(value, str):
            headers.append((name, value))
    return priority_from_headers(headers)


def wsgi_middleware(app: WSGIApplication) -> WSGIApplication:
    """WSGI middleware: the request's class is :func:`current_priority` while it is served.

    ``app.wsgi_app = wsgi_middleware(app.wsgi_app)`` (Flask) or
    ``application = wsgi_middleware(get_wsgi_application())`` (Django). The app
    and the iteration of its response body run in a copy of the caller's
    context, so streaming bodies that call out keep the class too.
    """

    def wrapped(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        ctx = contextvars.copy_context()
        ctx.run(_priority.set, _environ_class(environ))
        body = ctx.run(app, environ, start_response)
        return _ContextIterable(ctx, body)

    return wrapped


def _add_header(headers: MutableMapping[str, str]) -> None:
    cls = _priority.get()
    if cls is not None and HEADER not in headers:
        headers[HEADER] = cls


def httpx_event_hook(request: httpx.Request) -> None:
    """httpx request hook: ``httpx.Client(event_hooks={"request": [httpx_event_hook]})``."""
    _add_header(request.headers)


async def httpx_async_event_hook(request: httpx.Request) -> None:
    """The same for ``httpx.AsyncClient(event_hooks={"request": [httpx_async_event_hook]})``."""
    _add_header(request.headers)


def requests_session(session: requests.Session | None = None) -> requests.Session:
    """A requests session (new, or ``session``) that adds the class to every request.

    ``session = requests_session()``. It mounts an adapter for ``http://`` and
    ``https://`` that keeps the ``max_retries`` of the adapter it replaces.
    """
    import requests
    from requests.adapters import HTTPAdapter

    class PriorityAdapter(HTTPAdapter):
        def add_headers(self, request: requests.PreparedRequest, **kwargs: Any) -> None:
            super().add_headers(request, **kwargs)
            _add_header(request.headers)

    s = session if session is not None else requests.Session()
    for prefix in ("http://", "https://"):
        old = s.adapters.get(prefix)
        retries = old.max_retries if isinstance(old, HTTPAdapter) else 0
        s.mount(prefix, PriorityAdapter(max_retries=retries))
    return s


def aiohttp_trace_config() -> aiohttp.TraceConfig:
    """An aiohttp trace config that adds the class to every request.

    ``aiohttp.ClientSession(trace_configs=[aiohttp_trace_config()])``
    """
    import aiohttp

    async def on_request_start(
        session: aiohttp.ClientSession,
        ctx: Any,
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        cls = _priority.get()
        if cls is not None and HEADER not in params.headers:
            params.headers[HEADER] = cls

    config = aiohttp.TraceConfig()
    config.on_request_start.append(on_request_start)
    return config
