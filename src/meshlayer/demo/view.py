"""The demo's live view (like ``top``) and its summary, from the mesh's own metrics.

Theory of operation: :class:`Monitor` samples, once a tick, the ``/metrics``
of the gateway and of every app's sidecar (:class:`~meshlayer.demo.scrape.Scrape`)
and the email worker's ``/stats``, and keeps the last few seconds of samples.
A row is the difference between the newest sample and the one about
:data:`~meshlayer.demo.load.WINDOW` seconds older: requests per second,
success (status below 500), p50/p99 interpolated from the histogram buckets,
and sheds per second.

- Per class, from the gateway: its listener's requests by ``priority``, and
  ``meshlayer_shed_total`` summed over every sidecar (a request shed deep in
  the call graph fails its page at the gateway too, as a 503).
- Per service, from its sidecar's inbound side: the requests the app was
  given, the sheds there, what is queued now by class, the concurrency limit.
- The email worker: emails sent and their wait in RabbitMQ, by class.
- The load generator's own view, end to end, by the class it expects, with
  the class the frontend said it served: the check that classification and
  propagation happened.

:func:`render_summary` is the same over the whole run (first sample to last).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from meshlayer.demo.layout import APPS, GATEWAY
from meshlayer.demo.load import CLASSES, WINDOW, LoadGenerator, quantile
from meshlayer.demo.procs import http_get
from meshlayer.demo.scrape import NO_CLASS, Scrape, Traffic

KEEP = 30
"""Samples kept per sidecar (the window needs a few seconds of them)."""


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    v = seconds * 1000.0
    return f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


def pct(ok: int, total: int) -> str:
    if total == 0:
        return "-"
    # Rounded down: anything short of every request never shows as 100.0%.
    return f"{(ok * 1000 // total) / 10:.1f}%"


@dataclass
class Sample:
    """One tick: every sidecar's scrape (by instance name) and the email worker's stats."""

    at: float
    scrapes: dict[str, Scrape]
    email: dict[str, Any] | None


@dataclass
class Monitor:
    """Samples the mesh's metrics; computes the rows of the view."""

    base: int
    load: LoadGenerator | None = None
    first: Sample | None = None
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=KEEP))

    def sample(self) -> Sample:
        scrapes = {GATEWAY.name: Scrape.fetch(GATEWAY.admin(self.base))}
        for inst in APPS:
            scrapes[inst.name] = Scrape.fetch(inst.admin(self.base))
        s = Sample(time.monotonic(), scrapes, self.email_stats())
        if self.first is None:
            self.first = s
        self.samples.append(s)
        return s

    def email_stats(self) -> dict[str, Any] | None:
        email = next(i for i in APPS if i.service == "email")
        try:
            status, body = http_get(email.app_port(self.base), "/stats", timeout=1.0)
            data = json.loads(body) if status == 200 else None
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def pair(self, whole: bool = False) -> tuple[Sample, Sample] | None:
        """(older, newest): about WINDOW seconds apart, or the whole run."""
        if not self.samples:
            return None
        new = self.samples[-1]
        if whole and self.first is not None:
            return self.first, new
        old = self.samples[0]
        for s in self.samples:
            if new.at - s.at >= WINDOW:
                old = s
        return old, new


# -- rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    requests: int
    seconds: float
    traffic: Traffic
    shed: int
    extra: str = ""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def shed_rate(self) -> float:
        return self.shed / self.seconds if self.seconds > 0 else 0.0


def class_rows(old: Sample, new: Sample) -> tuple[list[Row], bool]:
    """Per class at the gateway; and whether the gateway's metrics carried classes at all."""
    dt = max(new.at - old.at, 1e-6)
    gw_new, gw_old = new.scrapes[GATEWAY.name], old.scrapes[GATEWAY.name]
    seen = gw_new.classes()
    for sc in new.scrapes.values():
        seen |= sc.classes()
    labelled = bool(seen - {NO_CLASS})
    order: list[str] = [c for c in ("critical", "default", "batch") if c in seen or c in CLASSES]
    order += sorted(seen - set(order) - {NO_CLASS})
    if not labelled:
        order = [NO_CLASS]
    rows = []
    for cls in order:
        t = gw_new.traffic(not_direction="inbound", priority=cls) - gw_old.traffic(
            not_direction="inbound", priority=cls
        )
        shed = sum(
            new.scrapes[n].shed_of(cls) - old.scrapes[n].shed_of(cls)
            for n in new.scrapes
            if n in old.scrapes
        )
        if t.total or shed or cls in CLASSES or not labelled:
            rows.append(Row(cls, t.total, dt, t, shed))
    return rows, labelled


def service_rows(old: Sample, new: Sample) -> list[Row]:
    dt = max(new.at - old.at, 1e-6)
    rows = []
    for inst in APPS:
        if inst.service == "email":  # fed through RabbitMQ: no requests to show
            continue
        a, b = old.scrapes[inst.name], new.scrapes[inst.name]
        t = b.traffic(direction="inbound", service=inst.service) - a.traffic(
            direction="inbound", service=inst.service
        )
        shed = b.shed_of(direction="inbound") - a.shed_of(direction="inbound")
        queued = " ".join(
            f"{c[0]}{b.queued_of(c, 'inbound')}"
            for c in ("critical", "default", "batch")
            if b.queued_of(c, "inbound")
        )
        limit = b.limit.get("inbound")
        extra = (f"limit {limit:.0f}" if limit else "") + (f"  queued {queued}" if queued else "")
        if not b.ok:
            extra = "metrics unavailable"
        rows.append(Row(inst.service, t.total, dt, t, shed, extra))
    return rows


def email_line(new: Sample) -> str:
    st = new.email
    if st is None:
        return "email worker: no answer from GET /stats"
    if st.get("broker") is None:
        return "emails: off (no RabbitMQ)"
    if not st.get("broker") and not st.get("sent"):
        return "email worker: not connected to RabbitMQ (see email-1.log)"
    sent: dict[str, int] = st.get("sent") or {}
    waits: dict[str, dict[str, float]] = st.get("wait_ms") or {}
    parts = []
    for cls in sorted(sent, key=lambda c: CLASSES.index(c) if c in CLASSES else len(CLASSES)):
        w = waits.get(cls) or {}
        parts.append(
            f"{cls} {sent[cls]} (waited p50 {w.get('p50', '-')} ms, p99 {w.get('p99', '-')} ms)"
        )
    depth = st.get("depth")
    return (
        f"emails sent through RabbitMQ queue {st.get('queue', 'emails')} "
        f"(x-max-priority, prefetch 1; {depth if depth is not None else '?'} waiting): "
        + ("; ".join(parts) if parts else "none yet")
    )


FIFO_NOTE = (
    "  (sheds under a class without requests: FIFO sidecars (--priority off) queue and "
    "shed every request as default)"
)


def _fifo_note(rows: list[Row]) -> list[str]:
    return [FIFO_NOTE] if any(r.shed and not r.requests for r in rows) else []


def _table(rows: list[Row], first: str, whole: bool) -> list[str]:
    if whole:
        head = f"  {first:<16}{'requests':>9}{'success':>9}{'p50':>10}{'p99':>10}{'shed':>8}"
    else:
        head = f"  {first:<16}{'req/s':>9}{'success':>9}{'p50':>10}{'p99':>10}{'shed/s':>8}"
    out = [head]
    for r in rows:
        count = f"{r.requests:>9}" if whole else f"{r.rate:>9.1f}"
        shed = f"{r.shed:>8}" if whole else f"{r.shed_rate:>8.1f}"
        out.append(
            f"  {r.name:<16}{count}{pct(r.traffic.ok, r.traffic.total):>9}"
            f"{ms(r.traffic.quantile(0.5)):>10}{ms(r.traffic.quantile(0.99)):>10}{shed}"
            + (f"  {r.extra}" if r.extra else "")
        )
    return out


def load_lines(load: LoadGenerator, whole: bool) -> list[str]:
    """The load generator's own view, by the class it expects the gateway to give."""
    head = "requests" if whole else "req/s"
    out = [
        f"  {'expected class':<16}{head:>9}{'success':>9}{'p50':>10}{'p99':>10}"
        f"{'shed' if whole else 'shed/s':>8}  served as"
    ]
    snap = load.rec.snapshot()
    for cls in CLASSES:
        st = snap[cls]
        served = ", ".join(f"{c} {n}" for c, n in st.seen.most_common(3)) or "-"
        if whole:
            out.append(
                f"  {cls:<16}{st.total:>9}{pct(st.ok, st.total):>9}"
                f"{ms(quantile(st.latencies, 0.5)):>10}{ms(quantile(st.latencies, 0.99)):>10}"
                f"{st.shed:>8}  {served}"
            )
        else:
            w = load.rec.window(cls)
            ok = f"{w.success * 100:.1f}%" if w.success is not None else "-"
            out.append(
                f"  {cls:<16}{w.rate:>9.1f}{ok:>9}{ms(w.p50):>10}{ms(w.p99):>10}"
                f"{w.shed_rate:>8.1f}  {served}"
            )
    return out


def render_live(mon: Monitor, header: str, footer: str = "") -> str:
    """One frame of the live view."""
    pair = mon.pair()
    lines = [header, ""]
    if pair is None or pair[0] is pair[1]:
        return "\n".join([*lines, "  (collecting the first samples ...)", footer])
    old, new = pair
    rows, labelled = class_rows(old, new)
    lines.append(f"by class, at the gateway (shed: all sidecars), last {WINDOW:.0f}s:")
    lines += _table(rows, "class", whole=False) + _fifo_note(rows)
    if not labelled:
        lines.append("  (the sidecars' metrics carry no priority label: classes not shown)")
    lines.append("")
    lines.append("by service, at its sidecar's inbound side (what the app was given):")
    lines += _table(service_rows(old, new), "service", whole=False)
    lines.append("")
    lines.append(email_line(new))
    if mon.load is not None:
        lines.append("")
        lines.append("the load generator's own view, end to end:")
        lines += load_lines(mon.load, whole=False)
    if footer:
        lines += ["", footer]
    return "\n".join(lines)


def render_summary(mon: Monitor) -> str:
    """The whole run: per class at the gateway, per service, emails, the load generator."""
    pair = mon.pair(whole=True)
    if pair is None:
        return "  no samples"
    old, new = pair
    rows, labelled = class_rows(old, new)
    lines = [f"by class, at the gateway, the whole run ({new.at - old.at:.0f}s):"]
    lines += _table(rows, "class", whole=True) + _fifo_note(rows)
    if not labelled:
        lines.append("  (the sidecars' metrics carry no priority label: classes not shown)")
    lines += ["", "by service, at its sidecar's inbound side:"]
    lines += _table(service_rows(old, new), "service", whole=True)
    lines += ["", email_line(new)]
    if mon.load is not None:
        lines += ["", "the load generator's own view, end to end:"]
        lines += load_lines(mon.load, whole=True)
        dropped = sum(mon.load.rec.dropped.values())
        if dropped:
            lines.append(f"  ({dropped} arrivals not sent: every client thread was busy)")
    return "\n".join("  " + line if line and not line.startswith("  ") else line for line in lines)
