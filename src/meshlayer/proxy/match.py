"""Request matching primitives that routing, authorization and classification share.

Theory of operation: three stages look at the same parts of a request —
HTTPRoute selection (:mod:`meshlayer.proxy.routes`), authorization
(:mod:`meshlayer.proxy.authz`) and the gateway's classification
(:mod:`meshlayer.proxy.classify`) — and must agree on what "this header" and
"under this path" mean, or a request could be routed by one reading and
authorised or classified by another. So there is one of each:

- :func:`header_map`: a request's header fields by lower-cased name, each
  value without the whitespace around it, in the order they came;
- :func:`under`: a path is a prefix or below it *on whole segments*: the
  prefix ``/api`` covers ``/api``, ``/api/`` and ``/api/x`` but not
  ``/apix``. A prefix is compiled once with :func:`segment_prefix`, which
  drops its trailing ``/`` (``/api/`` covers ``/api`` too, as in the Gateway
  API), so the prefix ``/`` (compiled: empty) covers every path.

Everything is bytes, as the parser hands it out; nothing here allocates per
request beyond the map itself.
"""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]


def header_map(headers: Headers) -> dict[bytes, list[bytes]]:
    """Header values by lower-cased name, stripped of edge whitespace, in order."""
    out: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        out.setdefault(name.lower(), []).append(value.strip(b" \t"))
    return out


def segment_prefix(value: bytes) -> bytes:
    """A path prefix as :func:`under` takes it: without its trailing ``/``."""
    return value.rstrip(b"/")


def under(path: bytes, prefix: bytes) -> bool:
    """``path`` is ``prefix`` or below it on whole segments (``prefix`` from
    :func:`segment_prefix`; empty covers everything)."""
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == 47)
