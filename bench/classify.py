"""Cost of the gateway's classification stage per request, with 8 rules.

Run: ``python bench/classify.py``. Prints microseconds per request (best of
five runs) for a request no rule matches (it falls through all eight) and for
one the last rule matches. The exchanges are real ones, parsed by the real
request parser (see ``tests/unit/test_classification.py``).
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.unit.test_classification import CLASSES, exchange, load, rule_doc

from meshlayer.config import Service
from meshlayer.proxy.classify import Classifier
from meshlayer.proxy.runtime import ServiceRuntime

RULES: list[tuple[str, str, dict[str, Any], int]] = [
    ("by-identity", "critical", {"identities": ["spiffe://meshlayer.local/ns/x/sa/web"]}, 0),
    (
        "bots",
        "batch",
        {"headers": [{"name": "user-agent", "type": "RegularExpression", "value": ".*bot.*"}]},
        1,
    ),
    ("reports", "batch", {"queryParams": [{"name": "mode", "value": "batch"}]}, 2),
    ("far-ops", "critical", {"sourceCIDRs": ["10.0.0.0/8"], "paths": [{"value": "/ops"}]}, 3),
    ("local-ops", "critical", {"sourceCIDRs": ["127.0.0.0/8"], "paths": [{"value": "/ops"}]}, 4),
    ("writes", "critical", {"methods": ["POST", "PUT"]}, 5),
    ("to-cart", "batch", {"services": ["cart"]}, 6),
    (
        "api",
        "critical",
        {"paths": [{"value": "/api"}, {"type": "RegularExpression", "value": "/v[0-9]+/.*"}]},
        10,
    ),
]
HEADERS = {
    "user-agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
    "accept": "*/*",
    "accept-encoding": "gzip",
    "accept-language": "en",
    "cookie": "a=b; c=d",
    "x-request-id": "abc",
    "referer": "http://x/",
}


def per_request(fn: Any, n: int = 50_000) -> float:
    """Microseconds per call, best of five runs."""
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6


def main() -> None:
    rules = load(
        *[rule_doc(n, {"priorityClass": c, "order": o, "match": m}) for n, c, m, o in RULES],
        strict=False,
    )
    c = Classifier(rules, CLASSES)
    rt = ServiceRuntime(Service("catalog"))
    miss = exchange("/web/page?x=1&y=2", headers=HEADERS, peer="127.0.0.1")
    hit = exchange("/api/x", headers=HEADERS, peer="127.0.0.1")
    assert c(miss, rt, rt.service).name == "default"
    assert c(hit, rt, rt.service).name == "critical"
    print(f"no rule matches (all 8 tried): {per_request(lambda: c(miss, rt, rt.service)):.2f} us")
    print(f"the last rule matches:          {per_request(lambda: c(hit, rt, rt.service)):.2f} us")


if __name__ == "__main__":
    main()
