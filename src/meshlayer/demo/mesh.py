"""The demo's mesh config, and what the demo asks its control plane.

The demo configures its mesh the way a user would: it writes the documents to
``mesh.yaml`` and sends that file's documents to ``POST /v1/apply`` (what
``meshlayer apply -f mesh.yaml`` does, through the same reader and client).
No Service lists meshed endpoints: each sidecar registers its own inbound
listener, and the control plane pushes every service's endpoints with the
config in one versioned snapshot.

What the config shows off:

* The priority classes (``critical``, ``default``, ``batch``: the shipped
  ones, written out so they can be changed) and the gateway's
  ClassificationRules: a crawler's or a back-office job's user agent makes a
  request ``batch``; a shopper's pages (``/``, ``/product/...``,
  ``/checkout``) are ``critical``; anything else gets the frontend's default.
  A class a client sends itself is ignored at the gateway.
* ``recommendations`` admits :data:`RECS_LIMIT` requests at once to its app
  (``spec.inbound.concurrency``): past that its sidecar queues by class and
  sheds ``batch`` first when the queue's delay passes the class's target.
* The backends ask the control plane for active health checks, so a killed
  app leaves rotation mesh-wide within seconds.

:class:`MeshStatus` reads ``GET /v1/status``: the mesh version and, per
sidecar, whether it is connected and which version it applied. The demo
sends no traffic until every one of its sidecars is registered and at the
current version (:func:`wait_in_sync`).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlayer.cli.client import ControlAPI
from meshlayer.cli.resources import read_documents

RECS_LIMIT = 2
"""Requests the recommendations sidecar admits to its app at once (the app's workers)."""
RULES = ("crawlers", "batch-jobs", "shoppers")
"""The gateway's ClassificationRules, in the order they are tried."""

_HEALTH = "healthCheck: {path: /healthz, interval: 2s, timeout: 1s, unhealthyThreshold: 2}"


def _service(name: str, comment: str, extra: str = "") -> str:
    return f"""\
---
apiVersion: meshlayer/v1
kind: Service
metadata: {{name: {name}}}    # {comment}
spec:
  timeouts: {{connect: 1s, request: 10s}}
  retries: {{attempts: 2, onStatus: [502]}}   # a 503 is overload: retrying it adds load
  {_HEALTH}{extra}
"""


def render_mesh(control_url: str, path: str) -> str:
    """The mesh config as YAML documents, with a header saying how to change it live."""
    token_file = str(Path(path).with_name("admin-token"))
    recs = f"\n  inbound: {{concurrency: {RECS_LIMIT}}}   # its app has {RECS_LIMIT} workers"
    # An aggregator's latency is its backends': an adaptive limit on it would read their
    # queueing as its own overload and hold critical pages behind batch ones waiting
    # downstream. Admission belongs where the capacity is (recommendations).
    aggregator = "\n  inbound: {concurrency: unlimited}   # it waits on its backends"
    services = "".join(
        [
            _service("frontend", "the shop's pages", "\n  priorityClass: default" + aggregator),
            _service("catalog", "the items"),
            _service("cart", "each user's cart"),
            _service(
                "recommendations",
                "the bottleneck: a model with a fixed capacity",
                recs,
            ),
            _service("checkout", "payment, inventory, then an email through RabbitMQ", aggregator),
            _service("payment", "charges"),
            _service("inventory", "reservations"),
            _service("email", "the worker consuming RabbitMQ's queue emails; GET /stats"),
        ]
    )
    return f"""\
# The demo's mesh, written by `meshlayer demo` (afresh each run) and applied to its
# control plane at {control_url}. Change it while the demo runs (a rule, a class's
# weight or queueDelayTarget), then apply it again; every sidecar and the gateway pick
# the new version up within a second:
#   meshlayer apply -f {path} --control {control_url} \\
#     --admin-token "$(cat {token_file})"
# No Service lists its meshed endpoints: each sidecar registers its own inbound
# listener with the control plane, which pushes the endpoints with the config.
#
# Priority classes: the shipped ones, written out. Higher rank goes first; weight is
# the share a class keeps under contention; past queueDelayTarget the lowest class
# is shed (503, Retry-After, x-meshlayer-error: shed).
apiVersion: meshlayer/v1
kind: PriorityClass
metadata: {{name: critical}}
spec: {{rank: 100, weight: 60, queueDelayTarget: 500ms, dscp: EF, soPriority: 6}}
---
apiVersion: meshlayer/v1
kind: PriorityClass
metadata: {{name: default}}
spec: {{rank: 50, weight: 30, queueDelayTarget: 100ms}}
---
apiVersion: meshlayer/v1
kind: PriorityClass
metadata: {{name: batch}}
spec: {{rank: 10, weight: 10, queueDelayTarget: 50ms, dscp: CS1, soPriority: 1}}
---
# The gateway's rules, tried in order; the first that matches gives the class. What a
# client says about its own class (x-meshlayer-priority, baggage) is never trusted.
apiVersion: meshlayer/v1
kind: ClassificationRule
metadata: {{name: crawlers}}
spec:
  order: 10
  priorityClass: batch
  match:
    headers: [{{name: user-agent, type: RegularExpression, value: "(?i).*(bot|crawler|spider).*"}}]
---
apiVersion: meshlayer/v1
kind: ClassificationRule
metadata: {{name: batch-jobs}}
spec:
  order: 20
  priorityClass: batch
  match:
    headers: [{{name: user-agent, type: RegularExpression, value: "[a-z-]+-job/.*"}}]
---
apiVersion: meshlayer/v1
kind: ClassificationRule
metadata: {{name: shoppers}}
spec:
  order: 100
  priorityClass: critical
  match:
    services: [frontend]
    paths:
    - {{type: Exact, value: /}}
    - {{type: PathPrefix, value: /product}}
    - {{type: Exact, value: /checkout}}
{services}"""


def apply_file(api: ControlAPI, path: Path) -> dict[str, Any]:
    """Send every document of ``path`` in one apply, as ``meshlayer apply -f`` does.

    Returns the answer (``version``, ``results``). Raises ``CLIError`` when the
    file cannot be read or the control plane refuses it.
    """
    docs = read_documents([str(path)], io.StringIO())
    answer: dict[str, Any] = api.expect(
        "POST", "/v1/apply", {"documents": [doc for _, _, doc in docs]}
    )
    return answer


# -- status ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarState:
    """One entry of ``GET /v1/status``."""

    sidecar: str
    service: str | None
    address: str | None
    applied: int
    error: str | None
    connected: bool
    healthy: bool


@dataclass(frozen=True)
class MeshStatus:
    """The mesh version and every sidecar's state, as the control plane sees them."""

    version: int
    store_ok: bool
    store: str
    sidecars: tuple[SidecarState, ...]

    @classmethod
    def fetch(cls, api: ControlAPI) -> MeshStatus:
        """``GET /v1/status``; raises ``CLIError`` when the control plane does not answer."""
        data = api.expect("GET", "/v1/status")
        store = data.get("store") or {}
        sidecars = tuple(
            SidecarState(
                sidecar=str(s.get("sidecar")),
                service=s.get("service"),
                address=s.get("address"),
                applied=int(s.get("applied") or 0),
                error=s.get("error"),
                connected=bool(s.get("connected")),
                healthy=bool(s.get("healthy", True)),
            )
            for s in data.get("sidecars") or []
        )
        return cls(
            int(data.get("version") or 0),
            bool(store.get("ok")),
            str(store.get("detail") or ""),
            sidecars,
        )

    def registered(self) -> list[SidecarState]:
        """Sidecars with a registration (a stream alone has ``service: null``)."""
        return [s for s in self.sidecars if s.service is not None]

    def current(self, s: SidecarState) -> bool:
        """Connected, and applied the mesh version without rejecting it."""
        return s.connected and s.error is None and s.applied == self.version

    def lagging(self, expected: Mapping[str, str]) -> list[str]:
        """What keeps ``expected`` (inbound address → instance name) from being ready for
        traffic: one phrase per instance not registered, not connected, not at the
        current version, or failing its health check."""
        by_address = {s.address: s for s in self.registered()}
        out = []
        for address, name in expected.items():
            s = by_address.get(address)
            if s is None:
                out.append(f"{name} not registered")
            elif s.error is not None:
                out.append(f"{name} rejected {s.error}")
            elif not s.connected:
                out.append(f"{name} not connected")
            elif s.applied != self.version:
                out.append(f"{name} at version {s.applied}")
            elif not s.healthy:
                out.append(f"{name} failing its health check")
        return out

    def line(self, url: str, expected: Mapping[str, str]) -> str:
        """``URL  mesh version N  sidecars connected C/T, at version N: K/T``; T counts the
        demo's sidecars and any other registered one."""
        registered = self.registered()
        total = len(set(expected) | {s.address for s in registered})
        connected = sum(1 for s in registered if s.connected)
        current = sum(1 for s in registered if self.current(s))
        store = "" if self.store_ok else "  STORE UNHEALTHY"
        return (
            f"{url}  mesh version {self.version}  sidecars connected {connected}/{total}, "
            f"at version {self.version}: {current}/{total}{store}"
        )


def wait_in_sync(
    api: ControlAPI,
    expected: Mapping[str, str],
    timeout: float,
    alive: Callable[[], None] = lambda: None,
) -> tuple[MeshStatus, bool]:
    """Poll ``GET /v1/status`` until every expected sidecar (inbound address → instance
    name) is registered, connected, healthy and at the mesh version, or ``timeout`` passes.

    ``alive`` is called between polls (it raises when a child died). Returns the
    last status and whether it was in sync.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive()
        status = MeshStatus.fetch(api)
        if not status.lagging(expected):
            return status, True
        if time.monotonic() >= deadline:
            return status, False
        time.sleep(0.05)
