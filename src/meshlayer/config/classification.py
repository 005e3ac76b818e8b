"""``kind: ClassificationRule``: how the gateway puts requests into priority classes.

Theory of operation: the gateway (``meshlayer gateway``) is the mesh's edge,
and the one place where a request gets its class from what it *is* rather
than from what it *claims*: a ClassificationRule names a PriorityClass and
the conditions a request must meet to get it. Rules are tried in ``order``
(lower first; ties by name) and the first whose conditions all hold wins; a
request no rule matches gets its destination service's default class
(``Service.priority_class``). Inside one condition list any entry may match
(``paths``, ``methods``, ``sourceCIDRs``, ``identities``, ``services``),
except headers and query parameters, which must all hold; an absent list
matches anything.

:mod:`meshlayer.config.load` reads a document's envelope and hands the
document's reader here; ``spec`` is read field by field through the same
strict reader, so errors name the document and the field path, e.g.
``mesh.yaml#4 (ClassificationRule/bots): spec.match.headers[0].value: not a
valid regular expression: unterminated character set at position 0``.

Paths are compared with the request's *normalised* path
(:mod:`meshlayer.proxy.pathnorm`, as authorization does: the gateway
normalises the path before routing and forwards the normal form), so a
client cannot spell ``/batch`` as ``/api/../batch`` to be classified as
``/api``; an ``Exact`` or ``PathPrefix`` value must itself be in normal form.
Regular expressions (Python syntax) must match the whole value. The fields
the mesh writes or rewrites on each hop (:data:`FORBIDDEN_HEADERS`: the class
header and baggage, the identity headers, ``x-forwarded-for``,
``x-meshlayer-source``) cannot be matched: at the edge the client writes
them, so they are what it would forge to promote itself (use ``identities``
or ``sourceCIDRs`` instead).

That ``priorityClass`` names a PriorityClass, and ``services`` defined
Services, is checked across documents (:func:`check_rule_refs`), for static
files only: a control plane's store may hold them in other applies, and the
gateway then treats an unknown class as ``default``.

This module imports nothing from :mod:`meshlayer.config.model` (which imports
it), so the model can hold the rules.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshlayer.config.errors import ConfigError
from meshlayer.config.fields import (
    ROUTE_METHODS,
    entries,
    header_name,
    header_value,
    is_name,
    normal_path,
    service_names,
    spiffe_ids,
    strings,
)

if TYPE_CHECKING:
    from meshlayer.config.load import _Reader

PATH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
FIELD_TYPES = ("Exact", "RegularExpression", "Present")
METHODS = tuple(m for m in ROUTE_METHODS if m != "CONNECT")
"""Methods a rule may name (the proxy refuses CONNECT with 405 before classifying)."""
DEFAULT_ORDER = 100
MAX_ORDER = 1_000_000
MAX_PATTERN = 1024
MAX_REGEX_INPUT = 1024
"""A header or query value longer than this never matches a regular expression."""
FORBIDDEN_HEADERS = frozenset(
    {
        "x-meshlayer-priority",
        "baggage",
        "x-meshlayer-peer-identity",
        "x-forwarded-client-cert",
        "x-forwarded-for",
        "x-meshlayer-source",
    }
)
"""Header names a rule may not match on: the fields the mesh writes on each hop
(``meshlayer.proxy.exchange.WATCHED`` but the request id and forwarded proto),
which at the edge only the client has written, so it could pick its own class."""


@dataclass(frozen=True, slots=True)
class PathCondition:
    """One entry of ``match.paths``."""

    type: str = "PathPrefix"
    """``Exact``, ``PathPrefix`` (whole segments) or ``RegularExpression`` (whole path)."""
    value: str = "/"
    """The path, prefix or pattern; compared with the normalised path, without query."""


@dataclass(frozen=True, slots=True)
class FieldCondition:
    """One entry of ``match.headers`` or ``match.queryParams``."""

    name: str
    """Header name (lower-cased, matched case-insensitively) or query parameter name (exact)."""
    type: str = "Exact"
    """``Exact``, ``RegularExpression`` (whole value) or ``Present`` (any value)."""
    value: str = ""
    """The value or pattern ("" for ``Present``)."""


@dataclass(frozen=True, slots=True)
class ClassificationMatch:
    """``spec.match``: every condition given must hold; an absent one matches any request."""

    paths: tuple[PathCondition, ...] = ()
    """Any of these paths."""
    methods: tuple[str, ...] = ()
    """Any of these methods."""
    headers: tuple[FieldCondition, ...] = ()
    """All of these header conditions."""
    query_params: tuple[FieldCondition, ...] = ()
    """All of these query parameter conditions."""
    source_cidrs: tuple[str, ...] = ()
    """The client's address (the TCP peer, never X-Forwarded-For) is in any of these networks."""
    identities: tuple[str, ...] = ()
    """The verified client certificate's SPIFFE ID is one of these (mTLS listeners only)."""
    services: tuple[str, ...] = ()
    """The destination service, after routing, is one of these."""


@dataclass(frozen=True, slots=True)
class ClassificationRule:
    """``kind: ClassificationRule``: requests that match get ``priority_class`` at the gateway."""

    name: str
    """``metadata.name``; the ``rule`` label of ``meshlayer_gateway_classified_total``."""
    priority_class: str
    """``spec.priorityClass``: the PriorityClass matching requests get."""
    order: int = DEFAULT_ORDER
    """``spec.order``: rules are tried lowest first, ties by name."""
    match: ClassificationMatch = field(default_factory=ClassificationMatch)
    """``spec.match``: the conditions (none: every request)."""


def sorted_rules(rules: Collection[ClassificationRule]) -> list[ClassificationRule]:
    """The order rules are tried in: ``order`` ascending, then name."""
    return sorted(rules, key=lambda r: (r.order, r.name))


def parse_classification_rule(r: _Reader, name: str) -> ClassificationRule:
    """Read the ``spec`` of a ClassificationRule document. Raises ConfigError."""
    spec = r.child("spec", required=True)
    cls = spec.string("priorityClass", required=True)
    if not is_name(cls):
        raise spec.error("priorityClass", f"must be a PriorityClass name, got {cls!r}")
    order = spec.get("order", DEFAULT_ORDER)
    if not isinstance(order, int) or isinstance(order, bool) or not 0 <= order <= MAX_ORDER:
        raise spec.error("order", f"must be an integer between 0 and {MAX_ORDER}, got {order!r}")
    match = _match(spec.child("match")) if spec.has("match") else ClassificationMatch()
    spec.finish()
    return ClassificationRule(name, cls, order, match)


def check_rule_refs(
    rule: ClassificationRule, classes: Collection[str], services: Collection[str], doc: str
) -> None:
    """The rule's class and services exist among the documents. Raises ConfigError."""
    if rule.priority_class not in classes:
        raise ConfigError(
            doc,
            "spec.priorityClass",
            f"names no PriorityClass: {rule.priority_class!r} "
            f"(known: {', '.join(sorted(classes))})",
        )
    for i, svc in enumerate(rule.match.services):
        if svc not in services:
            raise ConfigError(doc, f"spec.match.services[{i}]", f"no Service named {svc!r}")


def _match(r: _Reader) -> ClassificationMatch:
    paths = tuple(_path(pr) for pr in entries(r, "paths"))
    methods = []
    for where, value in strings(r, "methods"):
        if value not in METHODS:
            raise r.error(where, f"must be one of {', '.join(METHODS)}, got {value!r}")
        methods.append(value)
    headers = tuple(_field(hr, header=True) for hr in entries(r, "headers"))
    _no_repeats(r, "headers", [h.name for h in headers])
    queries = tuple(_field(qr, header=False) for qr in entries(r, "queryParams"))
    _no_repeats(r, "queryParams", [q.name for q in queries])
    cidrs = []
    for where, value in strings(r, "sourceCIDRs"):
        try:
            cidrs.append(str(ipaddress.ip_network(value, strict=True)))
        except ValueError as exc:
            raise r.error(where, f"must be a network like 10.0.0.0/8 or ::1/128: {exc}") from None
    identities = spiffe_ids(r, "identities")
    services = service_names(r, "services")
    r.finish()
    return ClassificationMatch(
        paths,
        tuple(methods),
        headers,
        queries,
        tuple(cidrs),
        tuple(identities),
        tuple(services),
    )


def _no_repeats(r: _Reader, key: str, names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise r.error(key, f"names a field twice: {names}")


def _pattern(r: _Reader, key: str, value: str) -> None:
    if len(value) > MAX_PATTERN:
        raise r.error(key, f"must be at most {MAX_PATTERN} characters")
    if not value.isascii():  # compiled as a bytes pattern: request fields are bytes
        raise r.error(key, f"must be ASCII (escape other characters), got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        raise r.error(key, f"not a valid regular expression: {exc}, got {value!r}") from None


def _path(r: _Reader) -> PathCondition:
    kind = r.string("type", "PathPrefix")
    if kind not in PATH_TYPES:
        raise r.error("type", f"must be one of {', '.join(PATH_TYPES)}, got {kind!r}")
    value = r.string("value", required=True)
    if kind == "RegularExpression":
        _pattern(r, "value", value)
    else:
        normal_path(r, "value", value)
    r.finish()
    return PathCondition(kind, value)


def _field(r: _Reader, header: bool) -> FieldCondition:
    if header:
        name = header_name(r).lower()
        if name in FORBIDDEN_HEADERS:
            raise r.error(
                "name",
                f"{name!r} is what a client would forge: the gateway never trusts it "
                "(match identities, sourceCIDRs or other headers instead)",
            )
    else:
        name = r.string("name", required=True)
        if len(name) > 256:
            raise r.error("name", "must be at most 256 characters")
    kind = r.string("type", "Exact")
    if kind not in FIELD_TYPES:
        raise r.error("type", f"must be one of {', '.join(FIELD_TYPES)}, got {kind!r}")
    value = ""
    if kind == "Present":
        if r.has("value"):
            raise r.error("value", "must be left out with type Present")
    elif kind == "Exact" and header:
        value = header_value(r)
    else:
        raw = r.get("value")
        if not isinstance(raw, str):
            raise r.error("value", f"must be a string, got {raw!r}")
        if kind == "RegularExpression":
            _pattern(r, "value", raw)
        value = raw
    r.finish()
    return FieldCondition(name, kind, value)


def rule_dict(rule: ClassificationRule) -> dict[str, object]:
    """A JSON-able view of a rule, in the document's field names (admin ``/config``)."""
    m = rule.match
    match: dict[str, object] = {}
    if m.paths:
        match["paths"] = [{"type": p.type, "value": p.value} for p in m.paths]
    if m.methods:
        match["methods"] = list(m.methods)
    for key, conds in (("headers", m.headers), ("queryParams", m.query_params)):
        if conds:
            match[key] = [
                {
                    "name": c.name,
                    "type": c.type,
                    **({"value": c.value} if c.type != "Present" else {}),
                }
                for c in conds
            ]
    for key, values in (
        ("sourceCIDRs", m.source_cidrs),
        ("identities", m.identities),
        ("services", m.services),
    ):
        if values:
            match[key] = list(values)
    return {
        "name": rule.name,
        "priorityClass": rule.priority_class,
        "order": rule.order,
        "match": match,
    }
