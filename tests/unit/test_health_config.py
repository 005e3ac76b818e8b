"""``spec.healthCheck`` of a Service: defaults, durations, errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest

from meshlayer.config.errors import ConfigError
from meshlayer.config.load import parse_documents
from meshlayer.config.model import HealthCheck


def service(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "meshlayer/v1", "kind": "Service", "metadata": {"name": "web"}, "spec": spec}
    ]


def test_health_check_is_optional_and_has_defaults() -> None:
    assert parse_documents(service({}), "t").services[0].health_check is None
    (svc,) = parse_documents(service({"healthCheck": {}}), "t").services
    assert svc.health_check == HealthCheck()
    (svc,) = parse_documents(
        service(
            {
                "healthCheck": {
                    "path": "/ready?deep=1",
                    "interval": "250ms",
                    "timeout": 2,
                    "unhealthyThreshold": 1,
                    "healthyThreshold": 5,
                }
            }
        ),
        "t",
    ).services
    assert svc.health_check == HealthCheck("/ready?deep=1", 0.25, 2.0, 1, 5)


@pytest.mark.parametrize(
    ("check", "field", "problem"),
    [
        ({"path": "healthz"}, "spec.healthCheck.path", "must be an absolute path"),
        ({"path": "/a b"}, "spec.healthCheck.path", "must be an absolute path"),
        ({"interval": "soon"}, "spec.healthCheck.interval", "must be a duration"),
        ({"timeout": 0}, "spec.healthCheck.timeout", "must be positive"),
        ({"unhealthyThreshold": 0}, "spec.healthCheck.unhealthyThreshold", "integer >= 1"),
        ({"healthyThreshold": "2"}, "spec.healthCheck.healthyThreshold", "integer >= 1"),
        ({"port": 8080}, "spec.healthCheck.port", "unknown field"),
    ],
)
def test_health_check_errors_name_the_field(
    check: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_documents(service({"healthCheck": check}), "t")
    assert err.value.document == "t#1 (Service/web)"
    assert err.value.field == field
    assert problem in err.value.problem


def test_health_check_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"spec.healthCheck: must be a mapping"):
        parse_documents(service({"healthCheck": "yes"}), "t")
