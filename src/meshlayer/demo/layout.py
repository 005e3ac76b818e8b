"""Where the demo's parts live: its instances, their ports, its state directory.

The port layout is in :mod:`meshlayer.demo.run`'s docstring (``pydoc meshlayer.demo.run``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meshlayer.demo.procs import HOST, port_free

STATE_DIR = Path(".meshlayer") / "demo"
"""Config, state and logs, relative to the working directory."""
CONFIG_NAME = "mesh.yaml"
"""The mesh config the demo writes and applies (in ``STATE_DIR``)."""
DB_NAME = "control.db"
"""The control plane's SQLite store (in ``STATE_DIR``)."""
SLOT = 10
"""Ports per instance block (four used)."""
AMQP_OFFSET = 5
"""The demo's RabbitMQ listens for AMQP on ``--port-base`` + this."""
AMQP_DIST_OFFSET = 6
"""RabbitMQ's Erlang distribution port."""
EPMD_OFFSET = 7
"""The Erlang port mapper of the demo's RabbitMQ (its own, not the host's)."""
MESH_OFFSET = 8
"""The control plane's mesh (mTLS) listener is on ``--port-base`` + this."""
CONTROL_OFFSET = 9
"""The control plane listens on ``--port-base`` + this."""
ADMIN_TOKEN_NAME = "admin-token"
"""The control plane's generated admin token (in ``STATE_DIR``, mode 0600)."""


@dataclass(frozen=True)
class Instance:
    """One instance: a sidecar registered for ``service``, and its app (except the gateway)."""

    name: str
    service: str
    slot: int
    has_app: bool = True

    def outbound(self, base: int) -> int:
        return base + SLOT * self.slot

    def inbound(self, base: int) -> int:
        return base + SLOT * self.slot + 1

    def app_port(self, base: int) -> int:
        return base + SLOT * self.slot + 2

    def admin(self, base: int) -> int:
        return base + SLOT * self.slot + 3

    def ports(self, base: int) -> list[tuple[int, str]]:
        """The ports this instance listens on, with what each is for."""
        out = [
            (self.outbound(base), f"{self.name} sidecar outbound"),
            (self.inbound(base), f"{self.name} sidecar inbound"),
            (self.admin(base), f"{self.name} sidecar admin"),
        ]
        if self.has_app:
            out.append((self.app_port(base), f"{self.name} app"))
        return sorted(out)


GATEWAY = Instance("gateway", "gateway", 0, has_app=False)
INSTANCES = (
    GATEWAY,
    Instance("frontend-1", "frontend", 1),
    Instance("catalog-1", "catalog", 2),
    Instance("cart-1", "cart", 3),
    Instance("recommendations-1", "recommendations", 4),
    Instance("checkout-1", "checkout", 5),
    Instance("payment-1", "payment", 6),
    Instance("inventory-1", "inventory", 7),
    Instance("email-1", "email", 8),
)
APPS = tuple(i for i in INSTANCES if i.has_app)
"""The instances with an app, in call-graph order (the service rows of the view)."""
PORT_SPAN = SLOT * (len(INSTANCES) - 1) + 4
"""Ports from the base up to the last one used."""


def instance(name: str) -> Instance:
    for inst in INSTANCES:
        if inst.name == name or (inst.service == name and inst.has_app):
            return inst
    raise KeyError(name)


def control_port(base: int) -> int:
    return base + CONTROL_OFFSET


def mesh_port(base: int) -> int:
    return base + MESH_OFFSET


def amqp_port(base: int) -> int:
    return base + AMQP_OFFSET


def expected_sidecars(base: int) -> dict[str, str]:
    """Inbound address each sidecar registers → instance name."""
    return {f"{HOST}:{inst.inbound(base)}": inst.name for inst in INSTANCES}


def busy_ports(base: int, with_broker: bool = True) -> list[tuple[int, str]]:
    """The demo's ports something else already listens on (or we may not bind)."""
    wanted = [(control_port(base), "control plane"), (mesh_port(base), "control plane mTLS")]
    if with_broker:
        wanted += [
            (amqp_port(base), "rabbitmq AMQP"),
            (base + AMQP_DIST_OFFSET, "rabbitmq distribution"),
            (base + EPMD_OFFSET, "rabbitmq epmd"),
        ]
    for inst in INSTANCES:
        wanted.extend(inst.ports(base))
    return [(port, what) for port, what in sorted(wanted) if not port_free(port)]
