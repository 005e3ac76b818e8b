from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Start real processes for one test; all are stopped (by PID) afterwards."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
