from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.etcd import EtcdCluster, etcd_binary, start_cluster
from tests.support.procs import Cluster
from tests.support.rabbitmq import Broker, rabbitmq_missing, start_broker


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Start real processes for one test; all are stopped (by PID) afterwards."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One 3-member etcd cluster for the session; tests keep apart by key prefix."""
    if etcd_binary() is None:
        pytest.skip("etcd not installed (`make test` installs Debian's etcd-server)")
    c = start_cluster(tmp_path_factory.mktemp("etcd"))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One private RabbitMQ broker for the session; tests keep apart by queue name."""
    reason = rabbitmq_missing()
    if reason is not None:
        pytest.skip(reason)
    b = start_broker(tmp_path_factory.mktemp("rabbitmq"))
    try:
        yield b
    finally:
        b.stop()
