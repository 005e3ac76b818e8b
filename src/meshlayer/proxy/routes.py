"""The routing stage: HTTPRoute rules compiled into a per-service match table.

Theory of operation: :func:`compile_routes` turns the ``HTTPRoute``s of a
config into one :class:`ServiceRoutes` per parent service. Every (rule, match)
pair becomes an ``_Entry`` and the entries are sorted once, at compile time,
into the Gateway API's precedence: an ``Exact`` path before any prefix, a
longer prefix before a shorter one, then a match naming a method, then more
header matches, then route name (alphabetical) and the order of rules and
matches within a route. ``select`` then walks the entries in that order and
takes the first whose conditions all hold, so no sorting or scoring happens
per request: exact paths are one dict lookup, prefixes a short scan.

Paths are compared as bytes, without the query string, on segment
boundaries: the prefix ``/items`` matches ``/items``, ``/items/`` and
``/items/1`` but not ``/itemsx``; a trailing ``/`` in a prefix is ignored and
the prefix ``/`` matches everything. Header values are compared exactly,
names case-insensitively; the request's header map is only built when an
entry that needs it is reached.

A matched rule picks its backend by smooth weighted round-robin (nginx's
algorithm): deterministic, interleaved, and exact over every cycle of the
total weight, so a 90/10 canary split is 90/10 to the request. Backends of
weight 0 get nothing. The result is the backend (generic: the proxy passes
its service runtimes, tests pass names) and the effective service config,
the backend's own with the rule's request timeout and retry overrides
applied, computed at compile time.

A service that no route names has no ``ServiceRoutes`` at all, so the common
path costs the caller one ``is None`` test. When a service has routes but
none matches the request, ``select`` raises a 404 ``no-route`` mesh error,
as Gateway API implementations do.

Nothing here does I/O; a new table is compiled on every config change and
swapped in whole, so a request in flight keeps the backend it was given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Generic, TypeVar

from meshlayer.config.model import HTTPRoute, RouteRule, Service
from meshlayer.proxy.errors import MeshError
from meshlayer.proxy.match import header_map, segment_prefix, under

T = TypeVar("T")

Headers = list[tuple[bytes, bytes]]


class WeightedChoice(Generic[T]):
    """Smooth weighted round-robin over a rule's backends."""

    __slots__ = ("_current", "_only", "_total", "_weights", "targets")

    def __init__(self, targets: list[tuple[T, Service]], weights: list[int]) -> None:
        keep = [i for i, w in enumerate(weights) if w > 0]
        if not keep:
            raise ValueError("at least one backend needs a weight above 0")
        self.targets = [targets[i] for i in keep]
        self._weights = [weights[i] for i in keep]
        self._total = sum(self._weights)
        self._current = [0] * len(self.targets)
        self._only = self.targets[0] if len(self.targets) == 1 else None

    def pick(self) -> tuple[T, Service]:
        """The next backend and its effective config."""
        if self._only is not None:
            return self._only
        current = self._current
        weights = self._weights
        best = 0
        for i in range(len(current)):
            current[i] += weights[i]
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return self.targets[best]

    def __repr__(self) -> str:
        return f"<WeightedChoice weights={self._weights} current={self._current}>"


class _Entry(Generic[T]):
    """One match of one rule, ready to test."""

    __slots__ = ("choice", "exact", "headers", "key", "method", "prefix", "where")

    def __init__(
        self,
        exact: bytes | None,
        prefix: bytes,
        method: bytes | None,
        headers: tuple[tuple[bytes, bytes], ...],
        choice: WeightedChoice[T],
        key: tuple[object, ...],
        where: str,
    ) -> None:
        self.exact = exact
        self.prefix = prefix
        self.method = method
        self.headers = headers
        self.choice = choice
        self.key = key
        self.where = where


class ServiceRoutes(Generic[T]):
    """The compiled routes of one parent service."""

    __slots__ = ("_exact", "_prefix", "entries", "name")

    def __init__(self, name: str, entries: list[_Entry[T]]) -> None:
        self.name = name
        self.entries = sorted(entries, key=lambda e: e.key)
        """Every entry in precedence order (for tests and ``repr``)."""
        self._exact: dict[bytes, list[_Entry[T]]] = {}
        self._prefix: list[_Entry[T]] = []
        for e in self.entries:
            if e.exact is not None:
                self._exact.setdefault(e.exact, []).append(e)
            else:
                self._prefix.append(e)

    def match(self, method: bytes, target: bytes, headers: Headers) -> _Entry[T] | None:
        """The entry that governs a request, or None when no rule matches.

        ``target`` is the origin-form request target; its query is ignored.
        """
        q = target.find(b"?")
        path = target[:q] if q >= 0 else target
        hmap: dict[bytes, list[bytes]] | None = None
        exact = self._exact.get(path)
        for group in (exact, self._prefix) if exact else (self._prefix,):
            for e in group:
                if e.exact is None and e.prefix and not under(path, e.prefix):
                    continue
                if e.method is not None and e.method != method:
                    continue
                if e.headers:
                    if hmap is None:
                        hmap = header_map(headers)
                    if not _headers_match(e.headers, hmap):
                        continue
                return e
        return None

    def select(self, method: bytes, target: bytes, headers: Headers) -> tuple[T, Service]:
        """Route a request: its backend and effective config.

        Raises MeshError (404 ``no-route``) when the service has routes and none matches.
        """
        e = self.match(method, target, headers)
        if e is None:
            raise MeshError(
                404,
                "no-route",
                f"no HTTPRoute rule for service {self.name!r} matches "
                f"{method.decode('latin-1')} {target[:200].decode('latin-1')}",
            )
        return e.choice.pick()

    def __repr__(self) -> str:
        return f"<ServiceRoutes {self.name} {[e.where for e in self.entries]}>"


def _headers_match(wanted: tuple[tuple[bytes, bytes], ...], have: dict[bytes, list[bytes]]) -> bool:
    for name, value in wanted:
        values = have.get(name)
        if values is None or value not in values:
            return False
    return True


def effective_config(service: Service, rule: RouteRule) -> Service:
    """``service`` with the rule's request timeout and retry overrides applied."""
    out = service
    if rule.request_timeout is not None:
        out = replace(out, timeouts=replace(out.timeouts, request=rule.request_timeout))
    retry = rule.retry
    if retry is not None:
        retries = out.retries
        if retry.attempts is not None:
            retries = replace(retries, attempts=retry.attempts)
        if retry.codes is not None:
            retries = replace(retries, on_status=retry.codes)
        out = replace(out, retries=retries)
    return out


def compile_routes(
    routes: Iterable[HTTPRoute],
    services: Mapping[str, Service],
    backend: Callable[[str], T],
) -> dict[str, ServiceRoutes[T]]:
    """Compile routes into one table per parent service.

    Args:
        routes: the config's HTTPRoutes.
        services: service configs by name; a name missing here gets default settings.
        backend: what ``select`` hands out for a service name (the proxy's runtime).

    Returns:
        The table of every service some route names as a parent.
    """
    by_parent: dict[str, list[_Entry[T]]] = {}
    for route in routes:
        for parent in route.parent_refs:
            entries = by_parent.setdefault(parent, [])
            for ri, rule in enumerate(route.rules):
                refs = rule.backend_refs
                names = [b.name for b in refs] if refs else [parent]
                weights = [b.weight for b in refs] if refs else [1]
                targets = [
                    (backend(n), effective_config(services.get(n) or Service(n), rule))
                    for n in names
                ]
                choice = WeightedChoice(targets, weights)
                for mi, m in enumerate(rule.matches):
                    value = m.path.value.encode("ascii")
                    exact = value if m.path.type == "Exact" else None
                    prefix = segment_prefix(value)
                    key = (
                        0 if exact is not None else 1,
                        -len(prefix),
                        0 if m.method else 1,
                        -len(m.headers),
                        route.name,
                        ri,
                        mi,
                    )
                    entries.append(
                        _Entry(
                            exact,
                            prefix,
                            m.method.encode("ascii") if m.method else None,
                            tuple(
                                (h.name.encode("ascii"), h.value.encode("ascii")) for h in m.headers
                            ),
                            choice,
                            key,
                            f"{route.name}.rules[{ri}].matches[{mi}]",
                        )
                    )
    return {name: ServiceRoutes(name, entries) for name, entries in by_parent.items()}
