"""Field checks that several kinds of document share.

Theory of operation: HTTPRoute, AuthorizationPolicy and ClassificationRule
documents (and the loader's envelope) say some of the same things — a
service name, a SPIFFE ID, a header name and value to match, a list that
must not be empty when given, a path that must already be in normal form —
and each must be refused with the same words, whichever document says it.
The helpers here read such a field through the strict reader
(:class:`meshlayer.config.load._Reader`), so their errors name the document
and the field path like every other error.

This module imports nothing from :mod:`meshlayer.config.model` (which
imports the document modules that import this one), so any of them can use
it; the model re-exports :data:`ROUTE_METHODS` from here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypeGuard

from meshlayer.proxy.pathnorm import PathError, normalize_path

if TYPE_CHECKING:
    from meshlayer.config.load import _Reader

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
"""A resource or service name: a lowercase DNS name (at most 253 characters, checked apart)."""
MAX_NAME = 253
SPIFFE_RE = re.compile(
    r"^spiffe://([a-z0-9._-]{1,255})/ns/([a-z0-9]([-a-z0-9]*[a-z0-9])?)"
    r"/sa/([a-z0-9]([-a-z0-9.]*[a-z0-9])?)$"
)
"""spiffe://<trust domain>/ns/<namespace>/sa/<service>, the IDs the mesh's CA issues."""
ROUTE_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
"""HTTP methods a match may name."""
MAX_PATH = 1024

_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}$")
_FIELD_VALUE_RE = re.compile(r"^[\x20-\x7e\t]{0,4096}$")
_PATH_CHARS_RE = re.compile(r"^/[\x21-\x7e]*$")


def is_name(value: object) -> TypeGuard[str]:
    """``value`` is a resource or service name."""
    return isinstance(value, str) and len(value) <= MAX_NAME and NAME_RE.match(value) is not None


def header_name(r: _Reader) -> str:
    """``name`` of a header match, as written (compare it lower-cased)."""
    name = r.string("name", required=True)
    if not _TOKEN_RE.match(name):
        raise r.error("name", f"must be an HTTP header name, got {name!r}")
    return name


def header_value(r: _Reader) -> str:
    """``value`` of a header match: a valid field value without edge whitespace.

    A parser strips the whitespace around a field value, so a value with some
    could never match.
    """
    value = r.get("value")
    if not isinstance(value, str) or not _FIELD_VALUE_RE.match(value):
        raise r.error("value", f"must be a string valid as a header value, got {value!r}")
    if value != value.strip(" \t"):
        raise r.error("value", f"must not start or end with whitespace, got {value!r}")
    return value


def entries(r: _Reader, key: str) -> list[_Reader]:
    """A list of mappings: absent means any; present, it must not be empty."""
    if r.has(key) and r.get(key) == []:
        raise r.error(key, "must not be empty (leave it out to match any)")
    return r.each(key)


def strings(r: _Reader, key: str) -> list[tuple[str, str]]:
    """A list of non-empty strings, each with its field path for errors."""
    raw = r.items(key)
    out = []
    for i, value in enumerate(raw):
        if not isinstance(value, str) or not value:
            raise r.error(f"{key}[{i}]", f"must be a non-empty string, got {value!r}")
        out.append((f"{key}[{i}]", value))
    if r.has(key) and not out:
        raise r.error(key, "must not be empty (leave it out to match any)")
    return out


def normal_path(r: _Reader, key: str, value: str) -> str:
    """A path compared with the *normalised* request path: it must be in normal form.

    A value that normalisation would change (``/a//b``, ``/a/./b``, ``/%61dmin``)
    could never match, so it is refused with its normal form in the message.
    """
    if not value.startswith("/"):
        raise r.error(key, f"must start with '/', got {value!r}")
    if len(value) > MAX_PATH or not _PATH_CHARS_RE.match(value):
        raise r.error(
            key,
            f"must be printable ASCII without spaces, at most {MAX_PATH} characters, got {value!r}",
        )
    if "?" in value or "#" in value:
        raise r.error(key, f"must be a path without query or fragment, got {value!r}")
    try:
        normal = normalize_path(value)
    except PathError as exc:
        raise r.error(key, f"{exc} (requests with it are refused), got {value!r}") from None
    if normal != value:
        raise r.error(key, f"must be in normal form {normal!r} (requests are normalised first)")
    return value


def spiffe_ids(r: _Reader, key: str) -> list[str]:
    """A list of SPIFFE IDs (absent: empty; present: not empty)."""
    out = []
    for where, value in strings(r, key):
        if not SPIFFE_RE.match(value):
            raise r.error(
                where,
                "must be a SPIFFE ID spiffe://<trust-domain>/ns/<namespace>/sa/<service>, "
                f"got {value!r}",
            )
        out.append(value)
    return out


def service_names(r: _Reader, key: str) -> list[str]:
    """A list of service names (absent: empty; present: not empty)."""
    out = []
    for where, value in strings(r, key):
        if not is_name(value):
            raise r.error(where, f"must be a service name (lowercase DNS name), got {value!r}")
        out.append(value)
    return out
