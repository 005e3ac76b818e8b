"""Fixtures for control-plane tests: a `meshlayer control` process per store kind.

``STORES`` lists the store kinds every ``control`` test runs against;
``store_url`` builds the ``--store`` URL for one of them (a fresh, empty
store per test).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.control import Control, start_control
from tests.support.etcd import EtcdCluster, unique_prefix
from tests.support.procs import Cluster

STORES = ["sqlite", "etcd"]


def store_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The ``--store`` URL of a fresh store of ``kind`` for one test."""
    if kind == "sqlite":
        return f"sqlite:{tmp_path / 'control.db'}"
    if kind == "etcd":  # the session's 3-member cluster, a key prefix of the test's own
        etcd: EtcdCluster = request.getfixturevalue("etcd_cluster")
        return etcd.url + unique_prefix()
    raise ValueError(f"unknown store kind {kind!r}")


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL, once per kind in STORES."""
    return store_url(str(request.param), tmp_path, request)


@pytest.fixture
def control(store: str, cluster: Cluster) -> Iterator[Control]:
    """A running control process on ``store``; stopped (by PID) at teardown."""
    yield start_control(cluster.tmp, store, procs=cluster.procs)
