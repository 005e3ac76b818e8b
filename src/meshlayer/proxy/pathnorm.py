"""Request path normalisation before authorization (sans-I/O).

Theory of operation: a rule on ``/admin`` must hold however a client spells
the path, and the app must see the path that was authorised, so the inbound
side rewrites the path to one normal form before matching and forwards that
form (as Envoy does with ``normalize_path`` and ``merge_slashes``). Only the
path is touched; the query string travels as sent. The steps, in order:

1. Split off the query at the first ``?``.
2. Refuse a raw backslash, a malformed escape (``%`` not followed by two hex
   digits) and an encoded slash or backslash (``%2F``, ``%5C``, any case):
   servers disagree on whether those separate segments, so no answer is safe.
3. Percent-decode the unreserved characters (RFC 3986 2.3: ALPHA, DIGIT,
   ``-._~``) and upper-case the hex of every escape left, once: ``%2561``
   stays ``%2561`` (it is ``%61`` to the app, never ``a``).
4. Merge runs of ``/`` into one.
5. Remove dot segments (RFC 3986 5.2.4), which now include decoded
   ``%2e``; ``..`` never climbs above the root, and a path ending in ``/.``
   or ``/..`` keeps its trailing ``/``.

The result is idempotent (normalising it again changes nothing) and has no
empty, ``.`` or ``..`` segment. Targets that are not a path (``*``) pass
unchanged. A refusal raises :class:`PathError`, which the request path turns
into a 400 without forwarding anything. Paths with none of ``%``, ``\\``,
``//`` and ``/.`` are already normal and return at once.
"""

from __future__ import annotations

import re

UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SLASHES = re.compile(rb"/{2,}")
_SUSPECT = re.compile(rb"[%\\]|//|/\.")  # what a path in normal form never holds


class PathError(ValueError):
    """A path that cannot be normalised safely; answered with 400."""

    status = 400


def needs_work(path: bytes) -> bool:
    """True when ``path`` (no query) may differ from its normal form or be refused."""
    return _SUSPECT.search(path) is not None


def normalize(target: bytes) -> bytes:
    """The normal form of an origin-form request target (query kept as sent).

    Raises:
        PathError: a raw backslash, a malformed escape, or an encoded ``/`` or ``\\``.
    """
    q = target.find(b"?")
    end = q if q >= 0 else len(target)
    if _SUSPECT.search(target, 0, end) is None or target[:1] != b"/":
        return target  # already normal, or not a path ("*" of OPTIONS)
    path, query = target[:end], target[end:]
    if b"\\" in path:
        raise PathError("backslash in path")
    if b"%" in path:
        path = _decode_unreserved(path)
    if b"//" in path:
        path = _SLASHES.sub(b"/", path)
    if b"/." in path:
        path = remove_dot_segments(path)
    return path + query


def normalize_path(path: str) -> str:
    """:func:`normalize` for a text path (config values); raises PathError."""
    return normalize(path.encode("latin-1")).decode("latin-1")


def _decode_unreserved(path: bytes) -> bytes:
    out = bytearray()
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c != 0x25:  # "%"
            out.append(c)
            i += 1
            continue
        pair = path[i + 1 : i + 3]
        if len(pair) < 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise PathError("malformed percent-encoding in path")
        value = int(pair, 16)
        if value in (0x2F, 0x5C):
            raise PathError("encoded slash or backslash in path")
        if value in UNRESERVED:
            out.append(value)
        else:
            out += b"%" + pair.upper()
        i += 3
    return bytes(out)


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 5.2.4 for an absolute path (starts with ``/``)."""
    segments = path.split(b"/")[1:]
    out: list[bytes] = []
    for seg in segments:
        if seg == b".":
            continue
        if seg == b"..":
            if out:
                out.pop()
            continue
        out.append(seg)
    result = b"/" + b"/".join(out)
    if segments[-1] in (b".", b"..") and out:
        result += b"/"
    return result
