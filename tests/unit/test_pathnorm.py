"""Path normalisation before authorization: the spellings that must not slip past a
rule on ``/admin``, refusals, and properties over generated paths."""

from __future__ import annotations

import posixpath
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlayer.proxy.pathnorm import PathError, normalize, normalize_path, remove_dot_segments


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (b"/admin", b"/admin"),
        (b"//admin", b"/admin"),
        (b"///admin//x", b"/admin/x"),
        (b"/a/../admin", b"/admin"),
        (b"/%61dmin", b"/admin"),
        (b"/%41DMIN", b"/ADMIN"),
        (b"/admin/.", b"/admin/"),
        (b"/admin/./x", b"/admin/x"),
        (b"/%2e%2e/admin", b"/admin"),
        (b"/%2E%2E/admin", b"/admin"),
        (b"/.%2e/admin", b"/admin"),
        (b"/x/%2e%2e/admin", b"/admin"),
        (b"/../../admin", b"/admin"),
        (b"/a/b/..", b"/a/"),
        (b"/..", b"/"),
        (b"/", b"/"),
        (b"/a%7e%2d%5f%2E", b"/a~-_."),
        (b"/a%3ab", b"/a%3Ab"),  # reserved stays encoded, hex upper-cased
        (b"/%2561dmin", b"/%2561dmin"),  # decoded once only: the app sees %61, never a
        (b"/a%20b", b"/a%20b"),
        (b"/admin?x=//..%2F", b"/admin?x=//..%2F"),  # the query travels as sent
        (b"//a/../admin?q", b"/admin?q"),
        (b"*", b"*"),
    ],
)
def test_normal_forms(raw: bytes, normal: bytes) -> None:
    assert normalize(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [b"/admin%2Fx", b"/admin%2fx", b"/admin%5Cx", b"/admin%5cx", b"/admin\\x", b"/a%zz", b"/a%4"],
)
def test_refused(raw: bytes) -> None:
    with pytest.raises(PathError):
        normalize(raw)


def test_encoded_slash_in_query_is_not_refused() -> None:
    assert normalize(b"/admin?next=%2Fhome") == b"/admin?next=%2Fhome"


def test_already_normal_is_returned_as_is() -> None:
    target = b"/items/42?x=1"
    assert normalize(target) is target


def test_text_variant() -> None:
    assert normalize_path("/a/./b//c") == "/a/b/c"


_segment = st.sampled_from(
    ["a", "admin", ".", "..", "", "%2e", "%2E%2e", "%61", "%7E", "%3a", "b~c", "%25"]
)
_paths = st.lists(_segment, max_size=8).map(lambda segs: "/" + "/".join(segs))


@given(_paths)
def test_idempotent(path: str) -> None:
    once = normalize(path.encode())
    assert normalize(once) == once


@given(_paths)
def test_no_dot_or_empty_segments_left(path: str) -> None:
    out = normalize(path.encode()).decode()
    assert out.startswith("/")
    inner = out[1:].removesuffix("/").split("/") if out != "/" else []
    assert all(seg not in ("", ".", "..") for seg in inner)
    # every escape left is upper-case and not an unreserved character
    for esc in re.findall(r"%(..)", out):
        assert esc == esc.upper()
        assert not re.match(r"[A-Za-z0-9\-._~]", chr(int(esc, 16)))


@given(st.lists(st.sampled_from(["a", "b", ".", "..", "c"]), min_size=1, max_size=8))
def test_dot_removal_agrees_with_posixpath(segs: list[str]) -> None:
    path = "/" + "/".join(segs)
    ours = remove_dot_segments(path.encode()).decode()
    # posixpath drops the trailing slash RFC 3986 keeps; compare without it
    assert ours.rstrip("/") == posixpath.normpath(path).rstrip("/").replace("//", "/")


@given(st.text(alphabet="/.%2eEfF5cCaA\\?", max_size=16))
def test_never_crashes_otherwise(text: str) -> None:
    try:
        out = normalize(("/" + text).encode())
    except PathError:
        return
    assert normalize(out) == out
