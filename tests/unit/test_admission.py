"""Admission control without sockets: the limit, class order, weights and shedding.

``meshlayer.proxy.admission`` is sans-I/O: these tests drive it with a fake
clock (``now`` passed in) and waiters that record what they were told.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from dataclasses import replace

import pytest

from meshlayer.config import ConfigError, load_documents
from meshlayer.config.model import DEFAULT_PRIORITY_CLASSES, Admission, PriorityClass
from meshlayer.proxy.admission import (
    BURST,
    TRIAL_RTTS,
    AdaptiveLimit,
    AdmissionControl,
    admission_for,
)
from meshlayer.proxy.classes import ClassState, ClassTable
from meshlayer.proxy.errors import MeshError


def table(**targets: float) -> ClassTable:
    """The shipped classes; ``critical=2.0`` overrides a class's queue-delay target."""
    classes = {
        c.name: replace(c, queue_delay_target=targets.get(c.name, c.queue_delay_target))
        for c in DEFAULT_PRIORITY_CLASSES
    }
    return ClassTable(classes)


class W:
    """A waiter that records its fate; ``log`` (shared) gets its admission order."""

    def __init__(self, cls: ClassState, t0: float, log: list[W] | None = None) -> None:
        self.cls = cls
        self.t0 = t0
        self.log = log
        self.admitted_at: float | None = None
        self.err: MeshError | None = None

    def admitted(self, now: float) -> None:
        self.admitted_at = now
        if self.log is not None:
            self.log.append(self)

    def shed(self, err: MeshError) -> None:
        self.err = err


def enter(adm: AdmissionControl, w: W, now: float) -> MeshError | None:
    """What the exchange does: ``AdmissionControl.enter`` (the fast path, else ``arrive``);
    admitted at once, it goes on (here: records it)."""
    got = adm.enter(w, w.cls, now)
    if got is True:
        w.admitted(now)
    return None if isinstance(got, bool) else got


def fixed(n: int) -> AdmissionControl:
    return AdmissionControl(Admission(n), "inbound", "web")


# -- order and weights ---------------------------------------------------------


def test_fast_path_until_the_limit_then_queue() -> None:
    adm = fixed(2)
    t = table()
    crit = t.get("critical")
    assert crit is not None
    ws = [W(crit, 0.0) for _ in range(3)]
    assert [enter(adm, w, 0.0) for w in ws] == [None, None, None]
    assert [w.admitted_at for w in ws] == [0.0, 0.0, None]
    assert (adm.in_use, adm.queued) == (2, 1)
    adm.release(1.0)
    assert ws[2].admitted_at == 1.0
    assert (adm.in_use, adm.queued) == (2, 0)


def test_a_burst_is_admitted_in_strict_rank_order() -> None:
    adm = fixed(1)
    t = table(critical=60, default=60, batch=60)
    order: list[W] = []
    enter(adm, W(t.by_name["batch"], 0.0), 0.0)  # holds the slot
    for name in ("batch", "critical", "default"):
        for _ in range(5):
            assert enter(adm, W(t.by_name[name], 0.0, order), 0.0) is None
    for i in range(15):
        adm.release(1.0 + i)
    assert [w.cls.name for w in order] == ["critical"] * 5 + ["default"] * 5 + ["batch"] * 5


@pytest.mark.parametrize(
    "present", [("critical", "default", "batch"), ("critical", "batch"), ("default", "batch")]
)
def test_backlogged_classes_get_their_weight_share(present: tuple[str, ...]) -> None:
    adm = fixed(4)
    t = table(critical=1e6, default=1e6, batch=1e6)
    order: list[W] = []
    for _ in range(4):
        enter(adm, W(t.by_name["critical"], 0.0), 0.0)
    for name in present:  # every class keeps 3 waiting: always backlogged
        for _ in range(3):
            adm.arrive(W(t.by_name[name], 0.0, order), t.by_name[name], 0.0)
    for i in range(2000):
        adm.release(float(i))
        adm.arrive(W(order[-1].cls, float(i), order), order[-1].cls, float(i))
    counts = Counter(w.cls.name for w in order[-1500:])
    wsum = sum(t.by_name[n].weight for n in present)
    for name in present:
        share = counts[name] / 1500
        assert share == pytest.approx(t.by_name[name].weight / wsum, abs=0.02), counts


def test_a_lone_batch_request_is_not_starved_by_a_critical_flood() -> None:
    adm = fixed(1)
    t = table(critical=1e6, batch=1e6)
    crit, batch = t.by_name["critical"], t.by_name["batch"]
    order: list[W] = []
    enter(adm, W(crit, 0.0), 0.0)
    lone = W(batch, 0.0, order)
    adm.arrive(lone, batch, 0.0)
    for _ in range(5):
        adm.arrive(W(crit, 0.0, order), crit, 0.0)
    for i in range(200):
        adm.release(float(i))
        adm.arrive(W(crit, float(i), order), crit, float(i))  # critical never goes idle
        if lone.admitted_at is not None:
            break
    share = batch.weight / (batch.weight + crit.weight)
    assert lone.admitted_at is not None
    assert order.index(lone) <= BURST / share + 1


def test_dispatch_survives_waiters_that_finish_at_once() -> None:
    """A waiter whose request fails synchronously releases its slot inside ``admitted``:
    the queue drains without recursion."""
    adm = fixed(1)
    classes = {c.name: c for c in DEFAULT_PRIORITY_CLASSES}
    classes["default"] = replace(classes["default"], max_queue_length=10_000)
    default = ClassTable(classes).by_name["default"]
    done: list[int] = []

    class Failing(W):
        def admitted(self, now: float) -> None:
            done.append(1)
            adm.release(now)

    enter(adm, W(default, 0.0), 0.0)
    for _ in range(5000):
        adm.arrive(Failing(default, 0.0), default, 0.0)
    adm.release(1.0)
    assert len(done) == 5000
    assert (adm.in_use, adm.queued) == (0, 0)


def test_leave_takes_a_waiter_out() -> None:
    adm = fixed(1)
    t = table(default=1e6)
    default = t.by_name["default"]
    order: list[W] = []
    enter(adm, W(default, 0.0), 0.0)
    a, b = W(default, 0.0, order), W(default, 0.0, order)
    adm.arrive(a, default, 0.0)
    adm.arrive(b, default, 0.0)
    assert adm.leave(a)
    assert not adm.leave(a)
    assert adm.queued == 1
    adm.release(1.0)
    assert order == [b]


# -- shedding ------------------------------------------------------------------


def test_a_full_class_queue_sheds_at_arrival() -> None:
    classes = {c.name: c for c in DEFAULT_PRIORITY_CLASSES}
    classes["batch"] = replace(classes["batch"], max_queue_length=2, queue_delay_target=60)
    t = ClassTable(classes)
    batch = t.by_name["batch"]
    adm = fixed(1)
    enter(adm, W(batch, 0.0), 0.0)
    assert enter(adm, W(batch, 0.0), 0.0) is None
    assert enter(adm, W(batch, 0.0), 0.0) is None
    err = enter(adm, W(batch, 0.0), 0.0)
    assert err is not None
    assert (err.status, err.reason) == (503, "shed")
    assert err.retry_after >= 1
    assert "full" in err.message
    assert adm.queues["batch"].shed_total == 1
    assert adm.queued == 2


def learn_service_time(adm: AdmissionControl, seconds: float, now: float = 0.0) -> None:
    adm.sample(seconds, now)
    assert adm.service_time == seconds


def test_predicted_wait_sheds_lower_classes_at_smaller_depths() -> None:
    """Service time 100 ms, limit 2: a dispatch every 50 ms. Targets: critical 500 ms,
    default 100 ms, batch 50 ms. Each class is refused once its predicted wait (the
    requests of its rank or higher ahead of it) passes its target."""
    adm = fixed(2)
    t = table()
    learn_service_time(adm, 0.1)
    for _ in range(2):
        enter(adm, W(t.by_name["critical"], 0.0), 0.0)

    def depth_until_shed(name: str) -> int:
        for depth in range(100):
            err = adm.arrive(W(t.by_name[name], 0.0), t.by_name[name], 0.0)
            if err is not None:
                return depth
        raise AssertionError(f"{name} never shed")

    # batch: (0 ahead + 1) * 50 ms = 50 ms fits; 1 ahead -> 100 ms > 50 ms
    assert depth_until_shed("batch") == 1
    # default does not count the batch request ahead of it: 0, 1 fit; 2 ahead -> 150 ms
    assert depth_until_shed("default") == 2
    # critical: up to 9 ahead fit (500 ms)
    assert depth_until_shed("critical") == 10
    # now everything queued is critical or default: batch and default arrivals are refused
    for name in ("batch", "default"):
        err = adm.arrive(W(t.by_name[name], 0.0), t.by_name[name], 0.0)
        assert err is not None and err.reason == "shed"
    assert adm.queues["batch"].shed_total == 2
    assert adm.queues["critical"].shed_total == 1


def test_weight_share_shortens_the_predicted_wait_of_a_lower_class() -> None:
    """With critical backlogged past batch's own share, batch is served by its weight:
    the prediction counts its share, not every critical request ahead."""
    adm = fixed(1)
    t = table(critical=1e6, batch=10.0)
    crit, batch = t.by_name["critical"], t.by_name["batch"]
    learn_service_time(adm, 0.01)
    enter(adm, W(crit, 0.0), 0.0)
    for _ in range(500):
        adm.arrive(W(crit, 0.0), crit, 0.0)
    # strict position: 501 * 10 ms = 5 s; by share (10/70): ~(4 + 0) / 0.143 + 1 = 29 dispatches
    assert adm.predict(adm.queues.get("batch") or adm._add_queue(batch)) < 0.5
    assert adm.arrive(W(batch, 0.0), batch, 0.0) is None


def test_a_late_higher_class_trims_the_lowest_class_newest_first() -> None:
    adm = fixed(1)
    t = table(critical=1.5, default=60, batch=60)
    crit, batch = t.by_name["critical"], t.by_name["batch"]
    learn_service_time(adm, 1.0)  # slow: keep = 60 s * 1/s * 10/70 = 8 batch requests stay
    enter(adm, W(crit, 0.0), 0.0)
    batches = [W(batch, 0.1 * i) for i in range(20)]
    for w in batches:
        assert adm.arrive(w, batch, w.t0) is None
    head = W(crit, 2.0)
    assert adm.arrive(head, crit, 2.0) is None
    adm.tick(3.4)  # the critical head has waited 1.4 s: within its target
    assert all(w.err is None for w in batches)
    adm.tick(3.6)
    shed = [w for w in batches if w.err is not None]
    assert len(shed) == 12
    assert shed == batches[8:]  # the newest went
    assert all(w.err is not None and w.err.reason == "shed" for w in shed)
    assert adm.queued == 9
    assert adm.queues["batch"].shed_total == 12
    adm.release(4.0)
    assert head.admitted_at == 4.0  # the critical head goes first


def test_shedding_start_and_stop_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    adm = fixed(1)
    t = table(batch=60)
    classes = {c.name: c for c in DEFAULT_PRIORITY_CLASSES}
    classes["batch"] = replace(classes["batch"], max_queue_length=0)
    batch = ClassTable(classes).by_name["batch"]
    enter(adm, W(t.by_name["critical"], 0.0), 0.0)
    with caplog.at_level(logging.INFO, "meshlayer.admission"):
        for i in range(5):
            assert adm.arrive(W(batch, 0.0), batch, 0.01 * i) is not None
        adm.tick(0.5)
        adm.tick(1.2)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("shedding class batch" in m for m in msgs) == 1, msgs
    assert sum("shedding of class batch stopped (5 shed)" in m for m in msgs) == 1, msgs


# -- the adaptive limit -----------------------------------------------------------


def run_windows(
    adm: AdmissionControl,
    rtt: float,
    load: int | None,
    windows: int,
    now: float,
    step: float = 0.12,
) -> float:
    """Feed ``windows`` windows of 10 samples of ``rtt`` each, with ``load`` in use
    (None: as many as the limit allows, i.e. demand exceeds it)."""
    for _ in range(windows):
        adm.in_use = adm.limit if load is None else load
        for _ in range(10):
            now += step / 10
            adm.sample(rtt, now)
    adm.in_use = 0
    return now


def adaptive(**kw: object) -> AdmissionControl:
    spec = replace(Admission(), **kw)  # type: ignore[arg-type]
    return AdmissionControl(spec, "inbound", "web", random.Random(1))


def test_adaptive_limit_drops_when_latency_rises_and_recovers() -> None:
    adm = adaptive(initial_limit=20, min_limit=2, max_limit=200)
    now = run_windows(adm, 0.010, load=None, windows=5, now=0.0)
    assert adm.limit > 20  # at the no-load latency, fully used: it grows
    high = adm.limit
    now = run_windows(adm, 0.050, load=None, windows=25, now=now)
    assert adm.limit <= high / 2
    low = adm.limit
    now = run_windows(adm, 0.010, load=None, windows=25, now=now)
    assert adm.limit >= 2 * low
    assert adm.limit > 10


def test_adaptive_limit_does_not_grow_while_app_limited() -> None:
    adm = adaptive(initial_limit=20)
    run_windows(adm, 0.010, load=3, windows=50, now=0.0)
    assert adm.limit == 7  # it follows the load down to 2 x 3 + 1, untested beyond


def test_adaptive_limit_stays_within_bounds() -> None:
    adm = adaptive(initial_limit=10, min_limit=4, max_limit=12)
    now = run_windows(adm, 0.010, load=10, windows=100, now=0.0)
    assert adm.limit == 12
    run_windows(adm, 1.0, load=12, windows=100, now=now)
    assert adm.limit == 4


def test_probe_remeasures_the_no_load_latency() -> None:
    """Latency that rose for good becomes the baseline after a probe at minLimit."""
    adm = adaptive(initial_limit=20, min_limit=2, probe_interval=5.0)
    assert adm.adaptive is not None
    now = run_windows(adm, 0.010, load=20, windows=3, now=0.0)
    now = run_windows(adm, 0.025, load=20, windows=30, now=now)  # 3 s: no probe yet
    assert adm.adaptive.min_rtt == pytest.approx(0.010)
    dropped = adm.limit
    for _ in range(40):  # past 5 s +- jitter
        now = run_windows(adm, 0.025, load=dropped, windows=1, now=now)
        if adm.adaptive.probing:
            break
    assert adm.adaptive.probing
    assert adm.limit == 2
    before = round(adm.adaptive.saved)
    assert adm.capacity == before > 2  # predictions keep using the real capacity
    now = run_windows(adm, 0.025, load=2, windows=1, now=now)  # at minLimit: a clean sample
    assert not adm.adaptive.probing
    assert adm.adaptive.min_rtt == pytest.approx(0.025)
    assert adm.limit == before  # restored
    run_windows(adm, 0.025, load=None, windows=25, now=now)
    assert adm.limit > dropped  # 40 ms is the new normal: the limit grows again


@pytest.mark.parametrize(("workers", "at_most"), [(1, 3), (4, 10)])
def test_adaptive_limit_settles_near_the_app_concurrency(workers: int, at_most: float) -> None:
    """An app serving ``workers`` at a time at 2 ms each, under more demand than it can take:
    latency grows with what is admitted past its workers, and the limit settles at about
    twice its concurrency (latency near ``tolerance`` times the minimum), not at sqrt's
    floor of 4, where a one-at-a-time app keeps three requests waiting in it."""
    g = AdaptiveLimit(Admission(initial_limit=20, min_limit=1), random.Random(1))
    now = 0.1
    g.update(0.002, 1, False, now)  # light load first: the no-load latency
    for _ in range(300):  # windows
        rtt = 0.002 * max(1.0, g.limit / workers)
        now += 0.1
        g.update(rtt, g.limit, True, now)
    assert g.limit <= at_most
    assert g.limit >= workers


def test_gradient_never_more_than_halves_per_window() -> None:
    g = AdaptiveLimit(Admission(initial_limit=100, max_limit=1000), random.Random(1))
    g.update(0.01, 100, True, 0.0)
    before = g.limit
    g.update(10.0, 100, True, 0.1)  # a thousandfold latency
    assert g.limit == before // 2


def test_unlimited_has_no_admission_control() -> None:
    assert admission_for(Admission("unlimited"), "outbound", "x") is None
    adm = admission_for(Admission(3), "outbound", "x")
    assert adm is not None and adm.limit == 3


# -- config ----------------------------------------------------------------------------


def service(spec: str) -> str:
    return (
        "apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: web}\n"
        "spec:\n  endpoints: []\n" + "".join(f"  {line}\n" for line in spec.splitlines())
    )


def test_config_defaults_adaptive_inbound_unlimited_outbound() -> None:
    svc = load_documents(service(""), "t").services["web"]
    assert svc.inbound.concurrency == "adaptive"
    assert svc.outbound.concurrency == "unlimited"


def test_config_reads_fixed_and_adaptive() -> None:
    text = service(
        "inbound: {concurrency: 8}\n"
        "outbound: {concurrency: adaptive, initialLimit: 5, minLimit: 3, maxLimit: 50, "
        "tolerance: 2, sampleWindow: 50ms, probeInterval: 10s}"
    )
    svc = load_documents(text, "t").services["web"]
    assert svc.inbound == Admission(8)
    assert svc.outbound == Admission("adaptive", 5, 3, 50, 2.0, 0.05, 10.0)


@pytest.mark.parametrize(
    ("spec", "field", "problem"),
    [
        ("inbound: {concurrency: 0}", "spec.inbound.concurrency", "must be adaptive, unlimited"),
        ("inbound: {concurrency: lots}", "spec.inbound.concurrency", "got 'lots'"),
        ("inbound: {concurrency: true}", "spec.inbound.concurrency", "got True"),
        ("outbound: {concurrency: 4, minLimit: 2}", "spec.outbound.minLimit", "only applies"),
        ("outbound: {maxLimit: 9}", "spec.outbound.maxLimit", "only applies"),
        ("inbound: {minLimit: 9, maxLimit: 3}", "spec.inbound.minLimit", "must not exceed"),
        ("inbound: {initialLimit: 0}", "spec.inbound.initialLimit", ">= 1"),
        ("inbound: {initialLimit: 500, maxLimit: 100}", "spec.inbound.initialLimit", "between"),
        ("inbound: {tolerance: 0.5}", "spec.inbound.tolerance", "between 1"),
        ("inbound: {sampleWindow: -1s}", "spec.inbound.sampleWindow", "duration"),
        ("inbound: {limit: 3}", "spec.inbound.limit", "unknown field"),
        ("inbound: 3", "spec.inbound", "must be a mapping"),
    ],
)
def test_config_errors_name_the_field(spec: str, field: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_documents(service(spec), "t")
    assert f"(Service/web): {field}: " in str(info.value)
    assert problem in str(info.value)


def test_admission_keeps_working_when_a_class_changes() -> None:
    """A reload may give a class another target: the queue follows the new settings."""
    adm = fixed(1)
    t = table(batch=60)
    enter(adm, W(t.by_name["critical"], 0.0), 0.0)
    assert adm.arrive(W(t.by_name["batch"], 0.0), t.by_name["batch"], 0.0) is None
    strict = {c.name: c for c in DEFAULT_PRIORITY_CLASSES}
    strict["batch"] = PriorityClass("batch", 10, max_queue_length=1)
    batch2 = ClassTable(strict).by_name["batch"]
    err = adm.arrive(W(batch2, 0.0), batch2, 0.0)
    assert err is not None and "full" in err.message


# -- review fixes ----------------------------------------------------------------------


def test_fast_errors_are_not_latency_samples() -> None:
    """A burst of 1 ms sheds (or 5xx) must not become the no-load latency."""
    adm = adaptive(initial_limit=40, min_limit=2, max_limit=200)
    assert adm.adaptive is not None
    now = run_windows(adm, 0.010, load=None, windows=5, now=0.0)
    before = adm.limit
    for _ in range(200):  # 200 ms of sheds from a peer, 1 ms each
        now += 0.001
        adm.in_use = adm.limit
        adm.sample(0.001, now, ok=False)
    now = run_windows(adm, 0.010, load=None, windows=10, now=now)
    assert adm.adaptive.min_rtt == pytest.approx(0.010)
    assert adm.limit >= before


def test_a_window_of_mostly_errors_does_not_lower_the_baseline() -> None:
    adm = adaptive(initial_limit=40)
    assert adm.adaptive is not None
    now = run_windows(adm, 0.010, load=None, windows=3, now=0.0)
    for _ in range(5):  # a window: 5 fast successes among 50 errors
        for _ in range(10):
            adm.sample(0.001, now, ok=False)
        now += 0.03
        adm.sample(0.002, now)
    assert adm.adaptive.min_rtt == pytest.approx(0.010)


def test_latency_that_rises_while_the_limit_is_not_binding_does_not_shrink_it() -> None:
    """A frontend waiting on a slow backend: 8 in use of 20, latency 8x. Shrinking the
    limit would only cut throughput (finding: end-to-end latency is not congestion)."""
    adm = adaptive(initial_limit=20, min_limit=2)
    now = run_windows(adm, 0.010, load=8, windows=5, now=0.0)
    run_windows(adm, 0.080, load=8, windows=30, now=now)
    assert adm.limit == 17  # 2 x 8 + 1: it stays loose enough not to bind


def stalled(n: int, now: float) -> AdmissionControl:
    """A fixed limit ``n``, 10 ms service time learned, all ``n`` slots taken at ``now``."""
    adm = fixed(n)
    learn_service_time(adm, 0.010, now - 1.0)
    t = table()
    crit = t.by_name["critical"]
    for _ in range(n):
        assert enter(adm, W(crit, now), now) is None
    return adm


def test_a_stalled_app_sheds_at_arrival_and_from_the_only_queue() -> None:
    adm = stalled(2, 10.0)
    crit = table().by_name["critical"]  # target 0.5 s
    early = [W(crit, 10.0) for _ in range(3)]
    assert [enter(adm, w, 10.0) for w in early] == [None] * 3  # 10 ms each: fits
    late = W(crit, 10.2)
    assert enter(adm, late, 10.2) is None  # 200 ms without progress: still fits
    err = enter(adm, W(crit, 10.5), 10.5)  # 500 ms: the wait is predicted from the stall
    assert err is not None and err.reason == "shed"
    adm.tick(11.1)  # the early heads waited 1.1 s > 2 x 0.5 s: shed, not left to time out
    assert all(w.err is not None and w.err.reason == "shed" for w in early)
    assert late.err is None and adm.queued == 1


def test_a_late_class_trims_lower_classes_upward_until_it_fits() -> None:
    t = table(critical=0.3, default=2.0, batch=2.0)
    adm = fixed(1)
    learn_service_time(adm, 0.1, 0.0)
    crit, default, batch = (t.by_name[n] for n in ("critical", "default", "batch"))
    assert enter(adm, W(crit, 1.0), 1.0) is None  # holds the slot
    lows = [W(c, 1.0) for c in (default, batch) for _ in range(10)]
    assert [enter(adm, w, 1.0) for w in lows] == [None] * 20
    for _ in range(2):
        assert enter(adm, W(crit, 1.0), 1.0) is None
    adm.tick(1.35)  # critical's head is late
    by_class = {q.name: q.count for q in adm.classes()}
    assert by_class["batch"] < 10 and by_class["default"] < 10, by_class
    assert by_class["critical"] == 2
    newest_first = [w.err is not None for w in lows[:10]]
    assert newest_first == sorted(newest_first)  # the newest default requests went


def test_make_room_sheds_the_newest_waiter_of_a_lower_class() -> None:
    t = table(batch=60)
    adm = fixed(1)
    crit, batch = t.by_name["critical"], t.by_name["batch"]
    assert enter(adm, W(crit, 0.0), 0.0) is None
    ws = [W(batch, 0.0) for _ in range(2)]
    assert [enter(adm, w, 0.0) for w in ws] == [None, None]
    assert not adm.make_room(batch, 0.0)  # equal rank gives way to nobody
    assert adm.make_room(crit, 0.0)
    assert ws[0].err is None and ws[1].err is not None and ws[1].err.reason == "shed"
    assert adm.queued == 1


def test_no_probe_while_requests_queue() -> None:
    """Pinning the limit at minLimit under a queue is a latency spike every minute."""
    adm = adaptive(initial_limit=20, min_limit=2, max_limit=20, probe_interval=1.0)
    assert adm.adaptive is not None
    crit = table(critical=60).by_name["critical"]
    now = run_windows(adm, 0.010, load=None, windows=3, now=0.0)
    adm.in_use = adm.limit
    for _ in range(100):  # a backlog that lasts
        assert adm.arrive(W(crit, now), crit, now) is None
    for _ in range(300):  # 3.6 s: past the probe time; every slot stays taken
        now += 0.012
        adm.sample(0.010, now)
        assert adm.queued and not adm.adaptive.probing
    assert adm.limit > 2


def test_a_waiter_that_raises_does_not_keep_its_slot(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(W):
        def admitted(self, now: float) -> None:
            raise RuntimeError("boom")

    adm = fixed(1)
    crit = table().by_name["critical"]
    assert enter(adm, W(crit, 0.0), 0.0) is None
    assert adm.arrive(Broken(crit, 0.0), crit, 0.0) is None
    ok = W(crit, 0.0)
    assert adm.arrive(ok, crit, 0.0) is None
    with caplog.at_level(logging.ERROR, "meshlayer.admission"):
        adm.release(0.1)
    assert ok.admitted_at == 0.1 and adm.in_use == 1 and adm.queued == 0
    assert "admitted waiter failed" in caplog.text


def test_leave_is_a_tombstone_that_dispatch_skips() -> None:
    adm = fixed(1)
    crit = table().by_name["critical"]
    order: list[W] = []
    assert enter(adm, W(crit, 0.0), 0.0) is None
    ws = [W(crit, 0.0, order) for _ in range(4)]
    for w in ws:
        assert adm.arrive(w, crit, 0.0) is None
    assert adm.leave(ws[0]) and adm.leave(ws[2])
    assert not adm.leave(ws[0])
    assert adm.queued == 2 and next(adm.classes()).count == 2
    for i in range(3):
        adm.release(0.1 * (i + 1))
    assert order == [ws[1], ws[3]]
    assert adm.queued == 0 and not adm._left


def test_removed_classes_are_forgotten_once_empty() -> None:
    adm = fixed(1)
    t = table()
    crit, batch = t.by_name["critical"], t.by_name["batch"]
    assert enter(adm, W(crit, 0.0), 0.0) is None
    assert adm.arrive(W(batch, 0.0), batch, 0.0) is None
    kept = [crit, t.by_name["default"]]
    adm.keep_classes(kept)
    assert [q.name for q in adm.classes()] == ["batch"]  # still has a waiter
    adm.release(0.01)
    adm.keep_classes(kept)
    assert list(adm.classes()) == []
    default = t.by_name["default"]
    assert adm.arrive(W(default, 0.1), default, 0.1) is None
    adm.release(0.2)  # admitted: its queue is empty now
    adm.keep_classes([], keep=("default",))  # a name kept without a class (--priority off)
    assert [q.name for q in adm.classes()] == ["default"]
    adm.keep_classes([])
    assert list(adm.classes()) == []


def test_a_reload_reorders_waiting_queues_at_once() -> None:
    """Ranks swapped by a reload apply to requests already waiting: the dispatch order
    and the top class's reserved slots follow the new table, not each class's next
    arrival."""
    adm = adaptive(initial_limit=1, min_limit=1)
    t = table()
    crit, batch = t.by_name["critical"], t.by_name["batch"]
    assert enter(adm, W(batch, 0.0), 0.0) is None  # holds the one slot
    order: list[W] = []
    waiting = [W(crit, 0.0, order), W(batch, 0.0, order)]
    adm.in_use = adm.limit + adm.reserve  # every slot taken, the reserved ones too
    for w in waiting:
        assert adm.arrive(w, w.cls, 0.0) is None
    swapped = {
        c.name: replace(c, rank={"critical": 10, "batch": 1000}.get(c.name, c.rank))
        for c in DEFAULT_PRIORITY_CLASSES
    }
    new = ClassTable(swapped)
    adm.keep_classes(new.ordered)
    assert [q.name for q in adm.classes()] == ["batch", "critical"]
    assert next(q for q in adm.classes() if q.name == "critical").top is False
    adm.in_use = 1  # the reserved slots free up; the one shared slot is still taken
    adm.release(0.1)
    assert order == [waiting[1]]  # batch, the top class now, took a slot first


def test_reconfigure_keeps_slots_and_queues() -> None:
    adm = fixed(1)
    crit = table().by_name["critical"]
    assert enter(adm, W(crit, 0.0), 0.0) is None
    ws = [W(crit, 0.0) for _ in range(3)]
    for w in ws:
        assert adm.arrive(w, crit, 0.0) is None
    adm.reconfigure(Admission(2), 0.5)
    assert (adm.limit, adm.in_use, adm.queued) == (2, 2, 2)
    assert ws[0].admitted_at == 0.5
    adm.reconfigure(Admission("unlimited"), 0.6)  # everyone waiting goes
    assert adm.queued == 0 and all(w.admitted_at is not None for w in ws)


def test_config_probe_interval_spans_ten_windows() -> None:
    with pytest.raises(ConfigError) as info:
        load_documents(service("inbound: {sampleWindow: 1s, probeInterval: 5s}"), "t")
    assert "spec.inbound.probeInterval: must be at least 10 x sampleWindow" in str(info.value)


# -- the adaptive limit: Little's law, upward trials, the reserve ------------------------


def crowd(
    g: AdaptiveLimit, workers: int, windows: int, now: float, service: float = 0.002
) -> list[int]:
    """An app serving ``workers`` at a time at ``service`` each, always more demand than
    the limit: latency grows with what is admitted past its workers. The limits seen."""
    seen = []
    for _ in range(windows):
        rtt = service * max(1.0, g.limit / workers)
        now += 0.1
        g.update(rtt, g.limit, True, now)
        seen.append(round(g.limit))
    return seen


@pytest.mark.parametrize(("workers", "settled"), [(1, 1), (2, 3), (4, 6), (40, 60)])
def test_the_limit_settles_at_tolerance_times_the_served_concurrency(
    workers: int, settled: int
) -> None:
    """From initialLimit 20 (or below), the limit reaches floor(workers x 1.5) in a few
    windows, not seconds, and stays there but for one-window upward trials."""
    for start in (20, 1):
        g = AdaptiveLimit(Admission(initial_limit=start, min_limit=1), random.Random(1))
        g.update(0.002, 1, False, 0.1)  # light load first: the no-load latency
        seen = crowd(g, workers, 300, 0.1)
        assert settled in seen[:12], (start, seen[:12])
        later = seen[50:]
        assert Counter(later).most_common(1)[0][0] == settled, Counter(later)
        assert sum(v != settled for v in later) <= len(later) // 10, Counter(later)


def test_upward_trials_back_off_when_they_do_not_pay() -> None:
    g = AdaptiveLimit(Admission(initial_limit=1, min_limit=1), random.Random(1))
    g.update(0.002, 1, False, 0.1)
    seen = crowd(g, 1, 400, 0.1)
    trials = [i for i, v in enumerate(seen) if v > 1]
    gaps = [b - a for a, b in itertools.pairwise(trials)]
    assert gaps == sorted(gaps)  # each trial waits at least as long as the one before
    assert gaps[-1] >= 32


def test_a_faster_app_is_found_by_trials() -> None:
    """A limit of 1 cannot grow by the rule (floor(1 x 1.5) = 1): the trial shows that a
    second slot doubles what is served, and the limit climbs to the new concurrency."""
    g = AdaptiveLimit(Admission(initial_limit=1, min_limit=1), random.Random(1))
    g.update(0.002, 1, False, 0.1)
    crowd(g, 1, 100, 0.1)  # the trials back off against a one-worker app
    seen = crowd(g, 8, 200, 10.1)  # it gets 8 workers
    assert 12 in seen[-20:]


def serve(adm: AdmissionControl, workers: int, seconds: float, service: float = 0.002) -> list[int]:
    """A destination of ``workers`` with more demand than the limit, sample by sample:
    each response's latency grows with what is admitted past its workers; completions
    come ``service / min(limit, workers)`` apart. The limit after each sample."""
    now, seen = 0.0, []
    while now < seconds:
        adm.in_use = adm.limit
        adm.queued_seen = True  # requests wait beyond the limit
        now += service / min(adm.limit, workers)
        adm.sample(service * max(1.0, adm.limit / workers), now)
        seen.append(adm.limit)
    return seen


def runs_above(seen: list[int], base: int) -> list[int]:
    """Lengths (in samples) of the stretches where the limit was above ``base``."""
    return [len(list(g)) for above, g in itertools.groupby(seen, lambda v: v > base) if above]


def test_a_failed_upward_trial_ends_as_soon_as_its_latency_shows_it() -> None:
    """Against a one-worker app a second slot only doubles every request's latency, the
    top class's too: the trial is called off after TRIAL_RTTS x 2 samples (12 ms here),
    not kept for its whole window (100 ms, 50 samples)."""
    adm = adaptive(initial_limit=1, min_limit=1)
    seen = serve(adm, 1, 20.0)
    trials = runs_above(seen, 1)
    assert len(trials) >= 5  # trials ran (and backed off: see the AdaptiveLimit tests)
    assert max(trials) <= TRIAL_RTTS * 2, trials


def test_a_trial_that_pays_keeps_its_window() -> None:
    """With spare workers the latency stays at the no-load one: nothing is called off,
    and the limit climbs to the destination's concurrency."""
    adm = adaptive(initial_limit=1, min_limit=1)
    seen = serve(adm, 8, 5.0)
    assert seen[-1] >= 8
    first = runs_above(seen, 1)[0]
    assert first >= 50  # the first trial ran its whole window (0.1 s at 2 ms a sample)


def test_the_top_class_takes_a_reserved_slot_while_lower_classes_queue() -> None:
    adm = adaptive(initial_limit=4, min_limit=1)
    t = table(critical=60, default=60, batch=60)
    crit, default, batch = (t.by_name[n] for n in ("critical", "default", "batch"))
    assert (adm.limit, adm.reserve) == (4, 2)
    held = [W(batch, 0.0) for _ in range(4)]
    for w in held:
        assert enter(adm, w, 0.0) is None and w.admitted_at == 0.0
    queued = [W(batch, 0.0), W(default, 0.0)]
    for w in queued:
        assert enter(adm, w, 0.0) is None and w.admitted_at is None
    crits = [W(crit, 0.0) for _ in range(3)]
    for w in crits:
        assert enter(adm, w, 0.0) is None
    assert [w.admitted_at for w in crits] == [0.0, 0.0, None]  # the two reserved slots
    adm.release(1.0)
    assert crits[2].admitted_at == 1.0  # the top class first
    adm.release(2.0)
    adm.release(3.0)  # in use 4 of 4 (+2 reserved): nothing below the top may go
    assert all(w.admitted_at is None for w in queued)
    adm.release(4.0)
    assert queued[1].admitted_at == 4.0  # default, then batch, into the shared slots
    adm.release(5.0)
    assert queued[0].admitted_at == 5.0


def test_a_fixed_limit_has_no_reserve() -> None:
    adm = fixed(2)
    crit = table().by_name["critical"]
    ws = [W(crit, 0.0) for _ in range(3)]
    assert [enter(adm, w, 0.0) for w in ws] == [None] * 3
    assert adm.reserve == 0 and ws[2].admitted_at is None


def test_priority_off_never_takes_the_reserve() -> None:
    """--priority off puts everyone in ``default``, which is not the top class."""
    adm = adaptive(initial_limit=2, min_limit=1)
    t = table(default=60)
    assert not t.fallback.top and t.by_name["critical"].top
    ws = [W(t.fallback, 0.0) for _ in range(3)]
    assert [enter(adm, w, 0.0) for w in ws] == [None] * 3
    assert ws[2].admitted_at is None and adm.in_use == 2


def test_lower_classes_never_fill_the_reserve_among_themselves() -> None:
    """``default`` and ``batch`` backlogged, no critical: however owed and late ``batch``
    gets, the slots above the limit stay free for the top class."""
    adm = adaptive(initial_limit=8, min_limit=1)
    t = table(default=0.1, batch=0.1)
    default, batch, crit = (t.by_name[n] for n in ("default", "batch", "critical"))
    assert (adm.limit, adm.reserve) == (8, 2)
    now = 0.0
    for i in range(8):
        enter(adm, W(default if i % 2 else batch, now), now)
    for _ in range(400):  # a backlog of both that lasts, heads growing late
        now += 0.01
        for cls in (default, batch):
            adm.arrive(W(cls, now - 0.5), cls, now)
        adm.release(now)
        assert adm.in_use <= adm.limit
    first = W(crit, now)
    assert enter(adm, first, now) is None and first.admitted_at == now


def test_an_idle_gap_decays_the_limit_at_most_by_half_per_window() -> None:
    adm = adaptive(initial_limit=20, min_limit=1)
    now = run_windows(adm, 0.010, load=15, windows=5, now=0.0)
    before = adm.limit
    adm.in_use = 1
    adm.sample(0.010, now + 5.0)  # after 5 s idle: this window's time-averaged load is tiny
    assert adm.window_start == now + 5.0  # (the window closed)
    assert adm.limit == before // 2


def test_would_wait_follows_enter() -> None:
    adm = adaptive(initial_limit=1, min_limit=1)
    t = table(batch=60, critical=60)
    crit, batch = t.by_name["critical"], t.by_name["batch"]
    assert not adm.would_wait(batch)
    enter(adm, W(batch, 0.0), 0.0)
    enter(adm, W(batch, 0.0), 0.0)  # queued
    assert adm.would_wait(batch)
    assert not adm.would_wait(crit)  # a reserved slot is free
    for _ in range(2):
        enter(adm, W(crit, 0.0), 0.0)
    assert adm.would_wait(crit)
