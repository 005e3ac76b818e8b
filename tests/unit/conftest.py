"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshlayer.proxy.codec import request as request_module
from meshlayer.proxy.codec import response as response_module


@pytest.fixture(scope="module", params=["fields", "blocks"])
def parser_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """The codec's parsers take heads field by field (as interpreted) and in one
    block (as compiled by mypyc): a module that uses this runs every test in both."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(request_module, "_NATIVE", request.param == "blocks")
        mp.setattr(response_module, "_NATIVE", request.param == "blocks")
        yield request.param
