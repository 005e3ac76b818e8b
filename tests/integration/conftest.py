"""Fixtures shared by the integration tests (the suite-wide ones are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.netns import NetnsPair, netns_unavailable


@pytest.fixture
def netns() -> Iterator[NetnsPair]:
    """Two network namespaces joined by a veth pair; skips where they cannot be made."""
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    pair = NetnsPair()
    try:
        pair.create()
        yield pair
    finally:
        pair.remove()
