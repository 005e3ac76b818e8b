"""Validate a Service's ``spec.inbound`` and ``spec.outbound`` admission settings.

``concurrency`` is ``adaptive`` (a limit learned from latency, see
:mod:`meshlayer.proxy.admission`), ``unlimited``, or a fixed integer >= 1.
The tuning fields only mean something for ``adaptive``; given with another
mode they are errors, so a typo in the mode cannot silently drop them.
``probeInterval`` must span at least ten ``sampleWindow``s: each probe costs a
window or more at ``minLimit``, so it has to be a rare event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshlayer.config.model import ADMISSION_MODES, Admission

if TYPE_CHECKING:
    from meshlayer.config.load import _Reader

MAX_LIMIT = 1_000_000
PROBE_WINDOWS = 10  # probeInterval >= this many sampleWindows: a probe is a rare event
_TUNING = ("initialLimit", "minLimit", "maxLimit", "tolerance", "sampleWindow", "probeInterval")


def parse_admission(spec: _Reader, key: str, default: Admission) -> Admission:
    """Read ``spec.<key>`` (``inbound`` or ``outbound``); ``default`` when absent."""
    if not spec.has(key):
        spec.get(key)
        return default
    r = spec.child(key)
    raw = r.get("concurrency", default.concurrency)
    mode = isinstance(raw, str) and raw in ADMISSION_MODES
    number = isinstance(raw, int) and not isinstance(raw, bool) and 1 <= raw <= MAX_LIMIT
    if not (mode or number):
        raise r.error(
            "concurrency",
            f"must be adaptive, unlimited or an integer between 1 and {MAX_LIMIT}, got {raw!r}",
        )
    concurrency: str | int = raw
    if concurrency != "adaptive":
        for field in _TUNING:
            if r.has(field):
                raise r.error(field, "only applies with concurrency: adaptive")
        r.finish()
        return Admission(concurrency)
    base = Admission()
    minimum = r.integer("minLimit", base.min_limit, 1)
    maximum = r.integer("maxLimit", base.max_limit, 1)
    if maximum > MAX_LIMIT:
        raise r.error("maxLimit", f"must be at most {MAX_LIMIT}, got {maximum}")
    if minimum > maximum:
        raise r.error("minLimit", f"must not exceed maxLimit ({maximum}), got {minimum}")
    initial = r.integer("initialLimit", min(max(base.initial_limit, minimum), maximum), 1)
    if not minimum <= initial <= maximum:
        raise r.error(
            "initialLimit",
            f"must be between minLimit ({minimum}) and maxLimit ({maximum}), got {initial}",
        )
    window = r.duration("sampleWindow", base.sample_window)
    probe = r.duration("probeInterval", base.probe_interval)
    if probe < PROBE_WINDOWS * window:
        raise r.error(
            "probeInterval",
            f"must be at least {PROBE_WINDOWS} x sampleWindow ({PROBE_WINDOWS * window:g}s), "
            f"got {probe:g}s",
        )
    admission = Admission(
        "adaptive",
        initial_limit=initial,
        min_limit=minimum,
        max_limit=maximum,
        tolerance=r.number("tolerance", base.tolerance, 1.0, 100.0),
        sample_window=window,
        probe_interval=probe,
    )
    r.finish()
    return admission
