"""API documents to store writes: validation with the sidecar's own loader.

An apply body is ``{"documents": [doc, ...]}``. The documents are checked by
:func:`meshlayer.config.load.parse_documents` (the code a sidecar runs on a
snapshot) with ``strict_refs=False``: an HTTPRoute may name a Service that
only the registry supplies. The loader's errors name the document
(``doc#N (Kind/name)``), the field path and the problem; they become a 400.
"""

from __future__ import annotations

from typing import Any

from meshlayer.config.errors import ConfigError
from meshlayer.config.load import KINDS, parse_documents
from meshlayer.control.http import HTTPError
from meshlayer.control.store import Resource, Write

SOURCE = "doc"
"""How errors name a document of an apply: ``doc#N``."""

_KIND_NAMES: dict[str, str] = {}
for _kind in KINDS:
    _KIND_NAMES[_kind.lower()] = _kind
    _KIND_NAMES[_kind.lower() + "s"] = _kind
    if _kind.endswith(("s", "sh", "ch", "x")):  # priorityclasses, meshes
        _KIND_NAMES[_kind.lower() + "es"] = _kind
    elif _kind.endswith("y"):  # authorizationpolicies
        _KIND_NAMES[_kind.lower()[:-1] + "ies"] = _kind
SHORT_NAMES = {"svc": "Service", "route": "HTTPRoute", "routes": "HTTPRoute", "pc": "PriorityClass"}
"""Short names accepted wherever a kind is (``get svc``, ``describe svc``, ``delete route``)."""
_KIND_NAMES.update({k: v for k, v in SHORT_NAMES.items() if v in KINDS})


def canonical_kind(text: str) -> str:
    """``services``, ``Service``, ``svc``, ``route`` ... → the canonical kind; 404 if unknown."""
    kind = _KIND_NAMES.get(text.lower())
    if kind is None:
        raise HTTPError(404, "not-found", f"unknown kind {text!r}; known kinds: {', '.join(KINDS)}")
    return kind


def parse_apply(body: Any) -> list[Write]:
    """The writes of an apply body. Raises HTTPError 400 naming doc, field and problem."""
    if not isinstance(body, dict) or not isinstance(body.get("documents"), list):
        raise HTTPError(400, "bad-request", 'body must be {"documents": [doc, ...]}')
    extra = set(body) - {"documents"}
    if extra:
        raise HTTPError(400, "bad-request", f"unknown field {sorted(extra)[0]!r} in apply body")
    docs: list[Any] = body["documents"]
    try:
        parse_documents(docs, SOURCE, strict_refs=False)
    except ConfigError as exc:
        raise HTTPError(
            400,
            "invalid",
            str(exc),
            {"document": exc.document, "field": exc.field, "problem": exc.problem},
        ) from None
    writes = []
    for doc in docs:
        if doc is None:
            continue
        meta = doc["metadata"]
        rv = meta.get("resourceVersion")
        spec = doc.get("spec")
        writes.append(Write(Resource(doc["kind"], meta["name"], dict(spec) if spec else {}), rv))
    return writes


def parse_resource_version(text: str | None) -> int | None:
    """A ``?resourceVersion=N`` query value. Raises HTTPError 400."""
    if text is None or text == "":
        return None
    if not text.isdigit():
        raise HTTPError(400, "bad-request", f"resourceVersion must be an integer, got {text!r}")
    return int(text)
