"""The gateway's classification stage: ClassificationRules compiled for the request path.

Theory of operation: a gateway's listener has a ``classify`` hook
(:class:`Classifier`), which ``Exchange.start`` calls right after routing
instead of reading the client's ``x-meshlayer-priority`` or ``baggage``: at
the edge the class comes from what the request *is*, never from what it
claims, so a user cannot promote itself. The exchange then forwards the
resolved class as ``x-meshlayer-priority`` and in ``baggage``, replacing the
client's.

The path a rule sees is the path the app gets. ``Exchange.start`` puts a
gateway request's target in normal form (:func:`gateway_path`, the
normalisation authorization uses: escapes of unreserved characters decoded,
``//`` merged, dot segments removed; an encoded ``/`` or ``\\`` refused with
400 ``bad-path``) *before* routing, and forwards that form. So
``/crawl/../api`` is routed, classified and forwarded as ``/api``: the
HTTPRoute, the rule and the app all see one path.

The classifier is compiled once per config (and per change of the priority
classes) into flat data, and the request path is one function
(:meth:`Classifier._first`) with no object or closure per request:

- The conditions that depend only on the method and the destination service
  are decided once per (method, service) pair: the *plan* for that pair is
  the list of the rules that can still match, cut after the first rule that
  has no other condition (it always matches), plus the header names and
  query parameter names those rules read. Plans are memoised; a method no
  rule names shares one plan per service, so clients cannot grow the memo.
- What the remaining conditions read is computed at most once per request,
  when a rule first needs it: the path without the query; one scan of the
  header fields that keeps only the names the plan reads (bytes, lower-cased
  names; ``Exact`` values pre-encoded, regular expressions compiled as bytes
  patterns); the query, parsed only when one of the plan's names occurs in
  it (fully, with percent-decoding, when it holds ``%`` or ``+``). The
  client address is parsed once per peer (a small cache keyed by the raw
  address) into (version, integer), and networks are (version, network,
  mask) integers.
- A header or query value longer than ``MAX_REGEX_INPUT`` (1 KiB) never
  matches a regular expression: patterns run on client data, and a bounded
  input bounds what a backtracking pattern can cost.

The client address is the TCP peer (never ``X-Forwarded-For``, which the
client writes); an identity is the verified client certificate's SPIFFE ID,
which only an mTLS listener has: compiled for a plaintext listener
(``mtls=False``, the gateway's), a rule with ``identities`` could never
match, so it is left out with a warning.

Every decision counts in ``meshlayer_gateway_classified_total{rule,priority}``
(rule ``none`` when no rule matched); the children are bound at compile time,
so counting is one ``inc`` per request. :meth:`Classifier.series` names the
children a classifier bound, so a reload can remove those of rules that are
gone.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from meshlayer.config.classification import (
    MAX_REGEX_INPUT,
    ClassificationRule,
    FieldCondition,
    sorted_rules,
)
from meshlayer.proxy.errors import MeshError
from meshlayer.proxy.match import segment_prefix, under
from meshlayer.proxy.pathnorm import PathError, normalize

if TYPE_CHECKING:
    from meshlayer.config.model import Service
    from meshlayer.proxy.classes import ClassState, ClassTable
    from meshlayer.proxy.exchange import Exchange
    from meshlayer.proxy.runtime import ServiceRuntime

log = logging.getLogger("meshlayer.gateway")

NO_RULE = "none"
"""The ``rule`` label of requests no rule matched."""
MAX_PLANS = 4096
"""(method, service) plans kept; more are computed per request (never in practice)."""
MAX_PEERS = 4096
"""Parsed client addresses kept; the cache starts over when it is full."""

Peer = tuple[int, int]
"""A client address: (IP version, address as an integer)."""
Net = tuple[int, int, int]
"""A network: (IP version, network address, mask), as integers."""

_UNSET: Any = object()
_PRESENT, _EXACT, _REGEX = 0, 1, 2


def gateway_path(target: bytes) -> bytes:
    """The normal form of a gateway request's origin-form target (query kept).

    Raises:
        MeshError: 400 ``bad-path`` for a target that cannot be normalised safely.
    """
    try:
        return normalize(target)
    except PathError as exc:
        raise MeshError(400, "bad-path", f"{exc}: refused by the gateway") from None


class _Field:
    """One header or query parameter condition: a test of the field's values."""

    __slots__ = ("join", "kind", "name", "rx", "want")

    def __init__(self, cond: FieldCondition, header: bool) -> None:
        self.kind = {"Present": _PRESENT, "Exact": _EXACT}.get(cond.type, _REGEX)
        # header fields are bytes (lower-cased names), query parameters decoded text
        self.name: Any = cond.name.encode("latin-1") if header else cond.name
        self.want: Any = cond.value.encode("latin-1") if header else cond.value
        self.join: Any = b", " if header else ", "
        self.rx: re.Pattern[Any] | None = None
        if self.kind == _REGEX:
            self.rx = re.compile(self.want)

    def test(self, values: list[Any]) -> bool:
        """Any one value matches, or all of them joined by ``", "``."""
        kind = self.kind
        if kind == _PRESENT:
            return True
        if kind == _EXACT:
            return self.want in values or (len(values) > 1 and self.join.join(values) == self.want)
        rx = self.rx
        assert rx is not None
        for v in values:
            if len(v) <= MAX_REGEX_INPUT and rx.fullmatch(v) is not None:
                return True
        if len(values) > 1:
            joined = self.join.join(values)
            return len(joined) <= MAX_REGEX_INPUT and rx.fullmatch(joined) is not None
        return False


class _Rule:
    """One rule, compiled: each condition ``None`` (or empty) when the rule has none."""

    __slots__ = (
        "count",
        "exact",
        "has_paths",
        "headers",
        "identities",
        "methods",
        "name",
        "nets",
        "patterns",
        "prefixes",
        "queries",
        "rest",
        "services",
        "state",
    )

    def __init__(self, rule: ClassificationRule, state: ClassState, count: Any) -> None:
        m = rule.match
        self.name = rule.name
        self.state = state
        self.count = count
        self.methods = frozenset(x.encode() for x in m.methods) if m.methods else None
        self.services = frozenset(m.services) if m.services else None
        self.identities = frozenset(m.identities) if m.identities else None
        self.nets = tuple(_net(c) for c in m.source_cidrs) if m.source_cidrs else None
        self.exact = frozenset(p.value.encode() for p in m.paths if p.type == "Exact")
        self.prefixes = tuple(
            segment_prefix(p.value.encode()) for p in m.paths if p.type == "PathPrefix"
        )
        self.patterns = tuple(
            re.compile(p.value.encode()) for p in m.paths if p.type == "RegularExpression"
        )
        self.has_paths = bool(m.paths)
        self.headers = tuple(_Field(c, header=True) for c in m.headers)
        self.queries = tuple(_Field(c, header=False) for c in m.query_params)
        self.rest = bool(
            self.identities or self.nets or self.has_paths or self.headers or self.queries
        )
        """Some condition is left once the method and the service are known."""

    def path_matches(self, path: bytes) -> bool:
        if path in self.exact:
            return True
        for prefix in self.prefixes:
            if under(path, prefix):
                return True
        for rx in self.patterns:  # noqa: SIM110 (no generator per request)
            if rx.fullmatch(path) is not None:
                return True
        return False


class _Plan:
    """The rules left for one (method, service) and the fields they read."""

    __slots__ = ("header_lens", "header_names", "probes", "rules")

    def __init__(self, rules: list[_Rule]) -> None:
        self.rules = tuple(rules)
        self.header_names = frozenset(f.name for r in rules for f in r.headers)
        self.header_lens = frozenset(len(n) for n in self.header_names)
        self.probes = tuple({f.name.encode() for r in rules for f in r.queries})
        """Query parameter names as they appear unescaped in a raw query."""


class Classifier:
    """A gateway's ClassificationRules, compiled: ``classifier(ex, svc, conf) -> ClassState``."""

    __slots__ = ("_classes", "_counter", "_methods", "_none", "_peers", "_plans", "rules")

    def __init__(
        self,
        rules: Iterable[ClassificationRule],
        classes: ClassTable,
        counter: Any = None,
        mtls: bool = True,
    ) -> None:
        """``counter``: the ``meshlayer_gateway_classified`` Counter (labels rule,
        priority), or None to count nothing (unit tests). ``mtls``: the listener
        verifies client certificates (else rules that need an identity are left out)."""
        self._classes = classes
        self._counter = counter
        self._none: dict[str, Any] = {}
        self._plans: dict[tuple[bytes, str], _Plan] = {}
        self._peers: dict[bytes, Peer | None] = {}
        self.rules: list[_Rule] = []
        """In the order they are tried."""
        for rule in sorted_rules(list(rules)):
            if rule.match.identities and not mtls:
                log.warning(
                    "ClassificationRule %s matches identities, which a plaintext listener never "
                    "has: it never applies here",
                    rule.name,
                )
                continue
            state = classes.get(rule.priority_class)
            if state is None:
                state = classes.default_for(rule.priority_class)
                log.warning(
                    "ClassificationRule %s names no PriorityClass %r: it classifies as %s",
                    rule.name,
                    rule.priority_class,
                    state.name,
                )
            count = counter.labels(rule.name, state.name) if counter is not None else None
            self.rules.append(_Rule(rule, state, count))
        self._methods = frozenset(m for r in self.rules for m in r.methods or ())

    def __repr__(self) -> str:
        return f"<Classifier {[(r.name, r.state.name) for r in self.rules]}>"

    def series(self) -> set[tuple[str, str]]:
        """The (rule, priority) label pairs this classifier counts in."""
        out = {(r.name, r.state.name) for r in self.rules}
        out.update((NO_RULE, name) for name in self._none)
        return out

    def _plan(self, key: tuple[bytes, str]) -> _Plan:
        method, service = key
        rules = []
        for r in self.rules:
            if r.methods is not None and method not in r.methods:
                continue
            if r.services is not None and service not in r.services:
                continue
            rules.append(r)
            if not r.rest:  # matches every request it gets: no rule after it is tried
                break
        plan = _Plan(rules)
        if len(self._plans) < MAX_PLANS:
            self._plans[key] = plan
        return plan

    def _peer(self, raw: bytes) -> Peer | None:
        peer = self._peers.get(raw, _UNSET)
        if peer is _UNSET:
            if len(self._peers) >= MAX_PEERS:
                self._peers.clear()
            peer = self._peers[raw] = _parse_peer(raw)
        return peer  # type: ignore[no-any-return]

    def _first(self, ex: Exchange, service: str) -> _Rule | None:
        """The first rule that matches a request routed to ``service``, or None."""
        method = ex.head.method
        key = (method if method in self._methods else b"", service)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(key)
        path: bytes | None = None
        headers: dict[bytes, list[bytes]] | None = None
        query: dict[str, list[str]] | None = None
        peer: Any = _UNSET
        for r in plan.rules:
            if not r.rest:
                return r
            if r.identities is not None and ex.down.peer_identity not in r.identities:
                continue
            if r.nets is not None:
                if peer is _UNSET:
                    peer = self._peer(ex.down.peer_ip)
                if peer is None or not _in_nets(peer, r.nets):
                    continue
            if r.has_paths:
                if path is None:
                    target = ex.path
                    q = target.find(b"?")
                    path = target if q < 0 else target[:q]
                if not r.path_matches(path):
                    continue
            if r.headers:
                if headers is None:
                    headers = _header_fields(ex.head.headers, plan)
                if not _fields_match(r.headers, headers):
                    continue
            if r.queries:
                if query is None:
                    query = _query(ex.path, plan.probes)
                if not _fields_match(r.queries, query):
                    continue
            return r
        return None

    def decide(self, ex: Exchange, service: str, default_class: str) -> tuple[str, ClassState]:
        """(rule name or ``none``, class) for a request routed to ``service``; counts nothing."""
        rule = self._first(ex, service)
        if rule is not None:
            return rule.name, rule.state
        return NO_RULE, self._classes.default_for(default_class)

    def __call__(self, ex: Exchange, svc: ServiceRuntime, conf: Service) -> ClassState:
        rule = self._first(ex, svc.name)
        if rule is not None:
            if rule.count is not None:
                rule.count.inc()
            return rule.state
        state = self._classes.default_for(conf.priority_class)
        if self._counter is not None:
            child = self._none.get(state.name)
            if child is None:
                child = self._none[state.name] = self._counter.labels(NO_RULE, state.name)
            child.inc()
        return state


def _header_fields(headers: list[tuple[bytes, bytes]], plan: _Plan) -> dict[bytes, list[bytes]]:
    """The values of the header fields the plan reads, by lower-cased name."""
    names = plan.header_names
    lens = plan.header_lens
    out: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if len(name) in lens and (low := name.lower()) in names:
            out.setdefault(low, []).append(value.strip(b" \t"))
    return out


def _query(target: bytes, probes: tuple[bytes, ...]) -> dict[str, list[str]]:
    """Query parameter values (percent-decoded, ``+`` a space) by name; {} when no
    name the plan reads can be in the query."""
    q = target.find(b"?")
    out: dict[str, list[str]] = {}
    if q < 0:
        return out
    if target.find(b"%", q) >= 0 or target.find(b"+", q) >= 0:  # a name may be escaped
        text = target[q + 1 :].decode("utf-8", "replace")
        for name, value in parse_qsl(text, keep_blank_values=True, errors="replace"):
            out.setdefault(name, []).append(value)
        return out
    for probe in probes:
        if target.find(probe, q) >= 0:
            break
    else:
        return out  # none of the names: nothing to parse
    for pair in target[q + 1 :].split(b"&"):
        if pair:
            key, _, raw = pair.partition(b"=")
            out.setdefault(key.decode("utf-8", "replace"), []).append(
                raw.decode("utf-8", "replace")
            )
    return out


def _fields_match(fields: tuple[_Field, ...], have: dict[Any, list[Any]]) -> bool:
    for f in fields:
        values = have.get(f.name)
        if not values or not f.test(values):
            return False
    return True


def _net(cidr: str) -> Net:
    net = ipaddress.ip_network(cidr)
    return net.version, int(net.network_address), int(net.netmask)


def _parse_peer(raw: bytes) -> Peer | None:
    """A client address as (version, integer); an IPv4-mapped IPv6 address as IPv4."""
    try:
        addr = ipaddress.ip_address(raw.decode("latin-1").split("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.version, int(addr)


def _in_nets(peer: Peer, nets: tuple[Net, ...]) -> bool:
    version, value = peer
    for v, net, mask in nets:  # noqa: SIM110 (no generator per request)
        if v == version and value & mask == net:
            return True
    return False
