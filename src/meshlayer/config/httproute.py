"""Validate ``kind: HTTPRoute`` documents (the Gateway API shape, GAMMA style).

Theory of operation: :mod:`meshlayer.config.load` reads the document's
envelope (``apiVersion``, ``kind``, ``metadata``) and hands the whole
document's reader here; this module reads ``spec`` field by field through the
same strict reader, so an unknown field or a bad value is an error naming the
document and the field path, e.g.
``mesh.yaml#3 (HTTPRoute/catalog-canary): spec.rules[0].backendRefs[1].weight:
must be an integer between 0 and 1000000, got -1``.

What is checked here is everything that one document can say about itself.
Whether ``parentRefs`` and ``backendRefs`` name services that exist depends on
the other documents, so :func:`check_refs` runs after all are read (and only
for static files: the control plane's registry may supply services later).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import TYPE_CHECKING

from meshlayer.config.errors import ConfigError
from meshlayer.config.fields import header_name, header_value, is_name
from meshlayer.config.model import (
    PATH_MATCH_TYPES,
    ROUTE_METHODS,
    BackendRef,
    HeaderMatch,
    HTTPRoute,
    PathMatch,
    RouteMatch,
    RouteRetry,
    RouteRule,
)

if TYPE_CHECKING:
    from meshlayer.config.load import _Reader

MAX_WEIGHT = 1_000_000
MAX_PATH = 1024
_PATH_CHARS_RE = re.compile(r"^/[\x21-\x7e]*$")
# Path spellings the Gateway API refuses: they are ambiguous after normalisation.
_BAD_PATH_PARTS = ("//", "/./", "/../", "%2f", "%2F", "#", "?")


def parse_http_route(r: _Reader, name: str) -> HTTPRoute:
    """Read the ``spec`` of an HTTPRoute document. Raises ConfigError."""
    spec = r.child("spec", required=True)
    parents = []
    for pr in spec.each("parentRefs"):
        _service_kind(pr)
        parents.append(_ref_name(pr))
        pr.finish()
    if not parents:
        raise spec.error("parentRefs", "must name at least one Service")
    if len(set(parents)) != len(parents):
        raise spec.error("parentRefs", f"names a service twice: {parents}")
    # No rules: one rule that matches everything and goes to the parent (Gateway API default).
    rules = [_rule(rr) for rr in spec.each("rules")] or [RouteRule()]
    spec.finish()
    return HTTPRoute(name, tuple(parents), tuple(rules))


def check_refs(route: HTTPRoute, services: Collection[str], doc: str) -> None:
    """Every parentRef and backendRef names a defined service. Raises ConfigError."""
    for i, parent in enumerate(route.parent_refs):
        if parent not in services:
            raise ConfigError(doc, f"spec.parentRefs[{i}].name", f"no Service named {parent!r}")
    for i, rule in enumerate(route.rules):
        for j, ref in enumerate(rule.backend_refs):
            if ref.name not in services:
                raise ConfigError(
                    doc, f"spec.rules[{i}].backendRefs[{j}].name", f"no Service named {ref.name!r}"
                )


def _service_kind(r: _Reader) -> None:
    kind = r.get("kind", "Service")
    if kind != "Service":
        raise r.error("kind", f"must be Service, got {kind!r}")


def _ref_name(r: _Reader) -> str:
    ref = r.string("name", required=True)
    if not is_name(ref):
        raise r.error("name", f"must be a service name (lowercase DNS name), got {ref!r}")
    return ref


def _rule(r: _Reader) -> RouteRule:
    # No matches (absent or empty) means every request, as in the Gateway API.
    matches = tuple(_match(mr) for mr in r.each("matches")) or (RouteMatch(),)

    backends = []
    for br in r.each("backendRefs"):
        _service_kind(br)
        backends.append(BackendRef(_ref_name(br), _weight(br)))
        br.finish()
    if backends and not any(b.weight > 0 for b in backends):
        raise r.error("backendRefs", "at least one backendRef needs a weight above 0")
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise r.error("backendRefs", f"names a service twice: {names}")

    timeout = None
    if r.has("timeouts"):
        tr = r.child("timeouts")
        if tr.has("request"):
            timeout = tr.duration("request", 0.0)
        tr.finish()

    retry = None
    if r.has("retry"):
        rr = r.child("retry")
        attempts = rr.integer("attempts", 0) if rr.has("attempts") else None
        codes = None
        if rr.has("codes"):
            raw = rr.get("codes")
            if (
                not isinstance(raw, list)
                or not all(isinstance(c, int) and not isinstance(c, bool) for c in raw)
                or not all(500 <= c <= 599 for c in raw)
            ):
                raise rr.error("codes", f"must be a list of 5xx statuses, got {raw!r}")
            codes = tuple(raw)
        rr.finish()
        retry = RouteRetry(attempts, codes)
    r.finish()
    return RouteRule(matches, tuple(backends), timeout, retry)


def _weight(r: _Reader) -> int:
    value = r.get("weight", 1)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_WEIGHT:
        raise r.error("weight", f"must be an integer between 0 and {MAX_WEIGHT}, got {value!r}")
    return value


def _match(r: _Reader) -> RouteMatch:
    path = PathMatch()
    if r.has("path"):
        pr = r.child("path")
        kind = pr.string("type", "PathPrefix")
        if kind not in PATH_MATCH_TYPES:
            raise pr.error("type", f"must be one of {', '.join(PATH_MATCH_TYPES)}, got {kind!r}")
        value = pr.string("value", "/")
        problem = _path_problem(value)
        if problem:
            raise pr.error("value", f"{problem}, got {value!r}")
        pr.finish()
        path = PathMatch(kind, value)

    headers = []
    for hr in r.each("headers"):
        kind = hr.string("type", "Exact")
        if kind != "Exact":
            raise hr.error("type", f"must be Exact (the only header match supported), got {kind!r}")
        hname = header_name(hr)
        hvalue = header_value(hr)
        hr.finish()
        headers.append(HeaderMatch(hname.lower(), hvalue))
    seen = [h.name for h in headers]
    if len(set(seen)) != len(seen):
        raise r.error("headers", f"names a header twice: {seen}")

    method = None
    if r.has("method"):
        method = r.string("method")
        if method not in ROUTE_METHODS:
            raise r.error("method", f"must be one of {', '.join(ROUTE_METHODS)}, got {method!r}")
    r.finish()
    return RouteMatch(path, tuple(headers), method)


def _path_problem(value: str) -> str:
    """Why a path match value is invalid, or "" when it is fine."""
    if not value.startswith("/"):
        return "must start with '/'"
    if len(value) > MAX_PATH:
        return f"must be at most {MAX_PATH} characters"
    if not _PATH_CHARS_RE.match(value):
        return "must be printable ASCII without spaces"
    for part in _BAD_PATH_PARTS:
        if part in value:
            return f"must not contain {part!r}"
    if value.endswith(("/.", "/..")):
        return "must not end in '/.' or '/..'"
    return ""
