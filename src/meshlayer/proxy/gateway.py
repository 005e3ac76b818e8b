"""``meshlayer gateway``: the mesh's edge, where requests get their priority class.

Theory of operation: a gateway is a :class:`~meshlayer.proxy.sidecar.Sidecar`
in gateway mode (``SidecarOptions.gateway``): it has no local app and no
inbound listener, only one outbound-style listener (``--listen``) that
outside clients send plain HTTP to, and the admin listener. That listener
routes exactly as a sidecar's outbound one does — by ``Host`` or an
absolute-form target to a service of the mesh, then by HTTPRoutes — and
speaks mTLS to meshed endpoints when the gateway has an identity (a join
token for its ``--name``). Config comes from a file or from the control
plane, and reloads without a restart, like a sidecar's.

What makes it the edge is the listener's ``classify`` hook: a
:class:`~meshlayer.proxy.classify.Classifier` compiled from the config's
ClassificationRules, rebuilt on every reload. ``Exchange.start`` calls it
right after routing instead of reading the client's ``x-meshlayer-priority``
or ``baggage``, and forwards the class it returns (header and baggage), so an
outside client can never pick its own class. Before routing, the exchange
puts the path in normal form, so routes, rules and the app see one path.
Decisions are counted in ``meshlayer_gateway_classified_total{rule,priority}``;
a reload removes the series of rules that are gone. The client listener is
plain HTTP, so rules that need a client identity are left out (with a
warning).

A gateway has no app: it reports no inbound concurrency limit, no app pool.

With a control plane the gateway registers under its name like any sidecar
(so ``meshlayer check`` and certificate rotation see it), which makes it an
endpoint of a service of that name; it refuses to route requests to itself,
so a client cannot loop it.
"""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any

from prometheus_client import Counter

from meshlayer.config import ConfigError, MeshConfig
from meshlayer.config.classification import rule_dict, sorted_rules
from meshlayer.proxy.admission import AdmissionControl
from meshlayer.proxy.classify import NO_RULE, Classifier
from meshlayer.proxy.errors import MeshError
from meshlayer.proxy.exchange import Exchange
from meshlayer.proxy.loop import loop_name
from meshlayer.proxy.runtime import ServiceRuntime
from meshlayer.proxy.sidecar import (
    Sidecar,
    SidecarOptions,
    common_options,
    flag_address,
    run_cli,
)

log = logging.getLogger("meshlayer.gateway")

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
NO_APP = ("127.0.0.1", 9)
"""A gateway has no app; the sidecar machinery still wants an address it never dials."""


class Gateway(Sidecar):
    """A sidecar in gateway mode: one listener for outside clients that classifies."""

    def __init__(self, opts: SidecarOptions, config: MeshConfig) -> None:
        super().__init__(opts, config)
        self.classified = Counter(
            "meshlayer_gateway_classified",
            "Requests classified at the gateway, by the rule that matched (none: no rule "
            "matched, the destination's default class) and the class given",
            ["rule", "priority"],
            registry=self.metrics.registry,
        )
        self.outbound.classify = self.classifier = self._classifier(config)

    def _classifier(self, config: MeshConfig) -> Classifier:
        # the client listener is plain HTTP: rules on client identities never apply
        return Classifier(config.classification_rules, self.classes, self.classified, mtls=False)

    def reload(self, config: MeshConfig) -> None:
        """As a sidecar's, then the rules again (against the classes now in force);
        the counter series of rules that are gone (or classes, for ``none``) go too."""
        super().reload(config)
        old = self.classifier
        self.outbound.classify = self.classifier = self._classifier(config)
        keep = self.classifier.series() | {(NO_RULE, c.name) for c in self.classes.ordered}
        for labels in old.series() - keep:
            try:
                self.classified.remove(*labels)
            except KeyError:
                pass
        log.info(
            "gateway %s: %d classification rules in force",
            self.name,
            len(config.classification_rules),
        )

    def _route_outbound(self, ex: Exchange) -> ServiceRuntime:
        rt = super()._route_outbound(ex)
        if rt.name == self.name:  # registered under its own name: never route to itself
            raise MeshError(404, "no-route", f"{self.name} is this gateway, not a service")
        return rt

    def _config_view(self) -> dict[str, Any]:
        view = super()._config_view()
        view["sidecar"] = {
            "gateway": self.name,
            "listen": "{}:{}".format(*self.opts.outbound),
            "admin": "{}:{}".format(*self.opts.admin),
            "loop": loop_name(),
        }
        view["classificationRules"] = [
            rule_dict(r) for r in sorted_rules(self.config.classification_rules)
        ]
        return view

    def _admissions(self) -> list[tuple[str, str, AdmissionControl]]:
        """Outbound only: a gateway has no app, so no inbound concurrency limit."""
        return [a for a in super()._admissions() if a[0] != "inbound"]

    def _watch_pool(self, rt: ServiceRuntime) -> None:
        if rt is not self.app:  # a gateway has no app: no gauge for it
            super()._watch_pool(rt)

    def _state(self) -> dict[str, list[tuple[tuple[str, ...], float]]]:
        state = super()._state()
        app = f"{self.name}(app)"  # a gateway has none
        return {k: [s for s in v if s[0][:1] != (app,)] for k, v in state.items()}

    async def start(self) -> None:
        await super().start()
        log.info(
            "gateway %s ready: listening on %s:%d, admin %s:%d (%s, config %s with %d "
            "services, %d classification rules, mTLS to the mesh %s)",
            self.name,
            *self.opts.outbound,
            *self.opts.admin,
            loop_name(),
            self.config.version,
            len(self.config.services),
            len(self.config.classification_rules),
            "on" if self.tls is not None else "off",
        )


def options_from_args(args: argparse.Namespace) -> SidecarOptions:
    """Validate the ``meshlayer gateway`` flags; raises ConfigError naming the flag."""
    name = args.name
    if not _NAME_RE.match(name) or len(name) > 63:
        raise ConfigError("command line", "--name", f"must be a DNS label, got {name!r}")
    listen = flag_address("--listen", args.listen)
    return SidecarOptions(
        service=name,
        app=NO_APP,
        inbound=listen,
        outbound=listen,
        gateway=True,
        **common_options(args, name, listen, "gateway"),
    )


def run_gateway_cli(args: argparse.Namespace) -> int:
    """``meshlayer gateway``: exit 2 on bad flags or config, nothing started."""
    return run_cli(args, options_from_args, Gateway, "gateway")
