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
CONTROL_OFFSET = 9
"""The control plane listens on ``--port-base`` + this."""
MESH_OFFSET = 8
"""The control plane's mesh (mTLS) listener is on ``--port-base`` + this."""
ADMIN_TOKEN_NAME = "admin-token"
"""The control plane's generated admin token (in ``STATE_DIR``, mode 0600)."""
ROWS = ("frontend", "catalog", "reviews")
"""The rows of the summary table (the apps), in call-graph order."""


@dataclass(frozen=True)
class Instance:
    """One instance: a sidecar registered for ``service``, and an ``app`` (except the edge)."""

    name: str
    service: str
    app: str
    """Which demo app runs behind the sidecar (its table row); "" for the edge."""
    slot: int

    @property
    def has_app(self) -> bool:
        return bool(self.app)

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


EDGE = Instance("edge", "edge", "", 0)
INSTANCES = (
    EDGE,
    Instance("frontend-1", "frontend", "frontend", 1),
    Instance("catalog-v1-1", "catalog-v1", "catalog", 2),
    Instance("catalog-v1-2", "catalog-v1", "catalog", 3),
    Instance("catalog-v2-1", "catalog-v2", "catalog", 4),
    Instance("reviews-1", "reviews", "reviews", 5),
)
PORT_SPAN = SLOT * (len(INSTANCES) - 1) + 4
"""Ports from the base up to the last one used."""


def control_port(base: int) -> int:
    return base + CONTROL_OFFSET


def mesh_port(base: int) -> int:
    return base + MESH_OFFSET


def expected_sidecars(base: int) -> dict[str, str]:
    """Inbound address each sidecar registers → instance name."""
    return {f"{HOST}:{inst.inbound(base)}": inst.name for inst in INSTANCES}


def busy_ports(base: int) -> list[tuple[int, str]]:
    """The demo's ports something else already listens on (or we may not bind)."""
    wanted = [(control_port(base), "control plane"), (mesh_port(base), "control plane mTLS")]
    for inst in INSTANCES:
        wanted.extend(inst.ports(base))
    return [(port, what) for port, what in sorted(wanted) if not port_free(port)]
