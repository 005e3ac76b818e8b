"""The config loader: durations, defaults, and errors that name document, field and problem."""

from __future__ import annotations

import pytest

from meshlayer.config import (
    CircuitBreaker,
    ConfigError,
    Endpoint,
    MeshConfig,
    OutlierDetection,
    RetryPolicy,
    Service,
    Timeouts,
    load_documents,
    load_file,
)
from meshlayer.config.load import parse_address

HEAD = "apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: catalog}\nspec:\n"
DOC = "mesh.yaml#1 (Service/catalog)"


def _load(spec: str) -> Service:
    return load_documents(HEAD + spec, "mesh.yaml").services["catalog"]


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_documents(text, "mesh.yaml")
    return info.value


def _spec_error(spec: str) -> ConfigError:
    return _error(HEAD + spec)


# -- durations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1m", 60.0),
        ("2h", 7200.0),
        ("1.5s", 1.5),
        ("0.5m", 30.0),
        ("' 3s '", 3.0),
        ("7", 7.0),
        ("0.25", 0.25),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    svc = _load(f"  timeouts:\n    request: {text}\n")
    assert svc.timeouts.request == pytest.approx(seconds)
    assert isinstance(svc.timeouts.request, float)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0", "must be positive, got 0"),
        ("0ms", "must be positive, got '0ms'"),
        ("-1", "must be positive, got -1"),
        ("-1s", "must be a duration like 250ms, 5s or 1m, got '-1s'"),
        ("5 seconds", "must be a duration like 250ms, 5s or 1m, got '5 seconds'"),
        ("5S", "must be a duration like 250ms, 5s or 1m, got '5S'"),
        ("1d", "must be a duration like 250ms, 5s or 1m, got '1d'"),
        ("true", "must be a duration like 250ms, 5s or 1m, got True"),
        ("[1]", "must be a duration like 250ms, 5s or 1m, got [1]"),
        (".nan", "must be positive, got nan"),
        (".inf", "must be finite, got inf"),
    ],
)
def test_bad_durations(text: str, problem: str) -> None:
    err = _spec_error(f"  timeouts:\n    idle: {text}\n")
    assert (err.document, err.field, err.problem) == (DOC, "spec.timeouts.idle", problem)
    assert str(err) == f"{DOC}: spec.timeouts.idle: {problem}"


def test_outlier_durations() -> None:
    svc = _load("  outlierDetection: {baseEjectionTime: 500ms, maxEjectionTime: 2m}\n")
    assert svc.outlier_detection.base_ejection == 0.5
    assert svc.outlier_detection.max_ejection == 120.0
    err = _spec_error("  outlierDetection: {baseEjectionTime: soon}\n")
    assert err.field == "spec.outlierDetection.baseEjectionTime"


# -- defaults ------------------------------------------------------------------------


def test_defaults() -> None:
    svc = _load("  endpoints:\n    - address: 10.0.0.1:8080\n")
    assert svc == Service(
        "catalog",
        (Endpoint("10.0.0.1", 8080, meshed=True),),
        "p2c-ewma",
        Timeouts(connect=5.0, request=15.0, idle=300.0),
        RetryPolicy(attempts=2, budget_percent=20.0, min_per_second=10.0, on_status=(503,)),
        CircuitBreaker(max_connections=1024, max_pending=1024, max_requests=1024),
        OutlierDetection(5, 10.0, 300.0, 50.0),
    )


def test_empty_spec_and_empty_documents() -> None:
    svc = load_documents(HEAD.replace("spec:\n", "spec: {}\n"), "m.yaml").services["catalog"]
    assert svc.endpoints == ()
    cfg = load_documents("---\n---\n", "m.yaml")
    assert cfg.services == {}
    assert load_documents("", "m.yaml").services == {}


def test_everything_set() -> None:
    svc = _load(
        """\
  endpoints:
    - {address: "a.example:80"}
    - {address: "[::1]:8443", meshed: false}
  loadBalancer: least-request
  timeouts: {connect: 100ms, request: 2s, idle: 1m}
  retries: {attempts: 0, budgetPercent: 50, minPerSecond: 1.5, onStatus: [502, 503, 504]}
  circuitBreaker: {maxConnections: 8, maxPendingRequests: 0, maxRequests: 16}
  outlierDetection:
    consecutiveFailures: 3
    baseEjectionTime: 1s
    maxEjectionTime: 10s
    maxEjectionPercent: 100
"""
    )
    assert svc.endpoints == (Endpoint("a.example", 80, True), Endpoint("::1", 8443, False))
    assert svc.endpoints[1].address == "[::1]:8443"
    assert svc.load_balancer == "least-request"
    assert svc.timeouts == Timeouts(0.1, 2.0, 60.0)
    assert svc.retries == RetryPolicy(0, 50.0, 1.5, (502, 503, 504))
    assert svc.circuit_breaker == CircuitBreaker(8, 0, 16)
    assert svc.outlier_detection == OutlierDetection(3, 1.0, 10.0, 100.0)


def test_several_documents_and_version() -> None:
    text = HEAD + "  endpoints: []\n---\n" + HEAD.replace("catalog", "orders") + "  {}\n"
    text = text.replace("spec:\n  {}", "spec: {}")
    cfg = load_documents(text, "mesh.yaml")
    assert isinstance(cfg, MeshConfig)
    assert sorted(cfg.services) == ["catalog", "orders"]
    assert cfg.source == "mesh.yaml"
    assert len(cfg.version) == 12
    assert cfg.version == load_documents(text, "other.yaml").version  # content, not name
    assert cfg.version != load_documents(text + "\n# changed\n", "mesh.yaml").version
    view = cfg.to_dict()
    assert view["version"] == cfg.version
    assert list(view["services"]) == ["catalog", "orders"]  # type: ignore[call-overload]


def test_metadata_namespace_default_is_allowed_others_and_labels_are_errors() -> None:
    # Nothing is silently dropped: a namespace or labels the mesh would not keep is an error.
    text = HEAD.replace("{name: catalog}", "{name: catalog, namespace: default}")
    assert "catalog" in load_documents(text + "  endpoints: []\n", "m.yaml").services
    err = _error(HEAD.replace("{name: catalog}", "{name: catalog, namespace: shop}"))
    assert err.field == "metadata.namespace"
    assert "only 'default' is supported, got 'shop'" in err.problem
    err = _error(HEAD.replace("{name: catalog}", "{name: catalog, labels: {a: b}}"))
    assert err.field == "metadata.labels" and "not supported" in err.problem


# -- errors name the document, the field path and the problem -------------------------


@pytest.mark.parametrize(
    ("spec", "field", "problem"),
    [
        ("  endpoint: []\n", "spec.endpoint", "unknown field"),
        ("  endpoints: {address: 'a:1'}\n", "spec.endpoints", "must be a list, got a mapping"),
        ("  endpoints: [a]\n", "spec.endpoints[0]", "must be a mapping, got a string"),
        ("  endpoints: [{}]\n", "spec.endpoints[0].address", "is required"),
        (
            "  endpoints: [{address: 'a:1'}, {address: 'b'}]\n",
            "spec.endpoints[1].address",
            "'b' is not HOST:PORT",
        ),
        ("  endpoints: [{address: ':80'}]\n", "spec.endpoints[0].address", "is not HOST:PORT"),
        ("  endpoints: [{address: 'a:0'}]\n", "spec.endpoints[0].address", "must be 1-65535"),
        ("  endpoints: [{address: 'a:65536'}]\n", "spec.endpoints[0].address", "1-65535"),
        ("  endpoints: [{address: 'a:x'}]\n", "spec.endpoints[0].address", "1-65535"),
        ("  endpoints: [{address: '[zz]:80'}]\n", "spec.endpoints[0].address", "IPv6"),
        ("  endpoints: [{address: 80}]\n", "spec.endpoints[0].address", "non-empty string"),
        (
            "  endpoints: [{address: 'a:1', meshed: 'yes'}]\n",
            "spec.endpoints[0].meshed",
            "must be true or false, got 'yes'",
        ),
        ("  endpoints: [{address: 'a:1', port: 1}]\n", "spec.endpoints[0].port", "unknown field"),
        (
            "  loadBalancer: random\n",
            "spec.loadBalancer",
            "must be one of round-robin, least-request, p2c-ewma, got 'random'",
        ),
        ("  loadBalancer: ''\n", "spec.loadBalancer", "must be a non-empty string"),
        ("  timeouts: {requst: 1s}\n", "spec.timeouts.requst", "unknown field"),
        ("  timeouts: 5s\n", "spec.timeouts", "must be a mapping, got a string"),
        ("  retries: {attempts: -1}\n", "spec.retries.attempts", "must be an integer >= 0"),
        ("  retries: {attempts: 1.5}\n", "spec.retries.attempts", "must be an integer >= 0"),
        ("  retries: {onStatus: [404]}\n", "spec.retries.onStatus", "list of 5xx statuses"),
        ("  retries: {onStatus: 503}\n", "spec.retries.onStatus", "list of 5xx statuses"),
        ("  retries: {budgetPercent: -1}\n", "spec.retries.budgetPercent", "between 0 and 1000"),
        ("  retries: {minPerSecond: .nan}\n", "spec.retries.minPerSecond", "between"),
        (
            "  circuitBreaker: {maxRequests: 0}\n",
            "spec.circuitBreaker.maxRequests",
            "must be an integer >= 1, got 0",
        ),
        (
            "  circuitBreaker: {maxConnections: true}\n",
            "spec.circuitBreaker.maxConnections",
            "must be an integer >= 1, got True",
        ),
        (
            "  outlierDetection: {maxEjectionPercent: 101}\n",
            "spec.outlierDetection.maxEjectionPercent",
            "between 0 and 100",
        ),
        (
            "  outlierDetection: {consecutiveFailures: 0}\n",
            "spec.outlierDetection.consecutiveFailures",
            "must be an integer >= 1",
        ),
    ],
)
def test_spec_errors(spec: str, field: str, problem: str) -> None:
    err = _spec_error(spec)
    assert err.document == DOC
    assert err.field == field
    assert problem in err.problem, err.problem
    assert str(err).startswith(f"{DOC}: {field}: ")


@pytest.mark.parametrize(
    ("text", "document", "field", "problem"),
    [
        (HEAD.replace("meshlayer/v1", "v1"), "mesh.yaml#1", "apiVersion", "got 'v1'"),
        (HEAD.replace("apiVersion: meshlayer/v1\n", ""), "mesh.yaml#1", "apiVersion", "None"),
        (HEAD.replace("Service", "Deployment"), "mesh.yaml#1", "kind", "got 'Deployment'"),
        (HEAD.replace("metadata: {name: catalog}\n", ""), "mesh.yaml#1", "metadata", "required"),
        (HEAD.replace("{name: catalog}", "{}"), "mesh.yaml#1", "metadata.name", "required"),
        (HEAD.replace("catalog", "Cat_alog"), "mesh.yaml#1", "metadata.name", "DNS name"),
        (
            HEAD.replace("{name: catalog}", "{name: catalog, nmae: x}"),
            "mesh.yaml#1",
            "metadata.nmae",
            "unknown field",
        ),
        (HEAD.replace("spec:\n", ""), DOC, "spec", "is required"),
        (HEAD + "  endpoints: []\nstatus: {}\n", DOC, "status", "unknown field"),
        ("- just\n- a list\n", "mesh.yaml#1", "", "must be a mapping, got a list"),
        ("42\n", "mesh.yaml#1", "", "must be a mapping, got int"),
    ],
)
def test_document_errors(text: str, document: str, field: str, problem: str) -> None:
    err = _error(text)
    assert (err.document, err.field) == (document, field)
    assert problem in err.problem, err.problem


def test_errors_name_the_right_document() -> None:
    good = HEAD + "  endpoints: []\n"
    bad = HEAD.replace("catalog", "orders") + "  endpoints: [{address: nope}]\n"
    err = _error(good + "---\n" + bad)
    assert err.document == "mesh.yaml#2 (Service/orders)"
    assert err.field == "spec.endpoints[0].address"


def test_duplicate_service_names() -> None:
    doc = HEAD + "  endpoints: []\n"
    err = _error(doc + "---\n" + doc)
    assert (err.document, err.field) == (DOC.replace("#1", "#2"), "metadata.name")
    assert err.problem == "duplicate Service 'catalog'"


def test_bad_yaml_names_the_line() -> None:
    err = _error(HEAD + "  endpoints: [\n    {address: 'a:1'\n")
    assert err.document == "mesh.yaml"
    assert err.field == ""
    assert err.problem.startswith("not valid YAML at line ")
    err = _error("a: b\n c: d\n")
    assert "not valid YAML at line 2" in err.problem


def test_load_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "mesh.yaml"
    path.write_text(HEAD + "  endpoints: [{address: 'a:1'}]\n")
    cfg = load_file(path)
    assert cfg.source == "mesh.yaml"
    assert cfg.services["catalog"].endpoints == (Endpoint("a", 1, True),)
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path / "absent.yaml")
    assert info.value.document == str(tmp_path / "absent.yaml")
    assert "cannot read" in info.value.problem
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path)  # a directory
    assert "cannot read" in info.value.problem
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError) as info:
        load_file(binary)
    assert "cannot read" in info.value.problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:8080", ("::1", 8080)),
        ("[2001:db8::1]:1", ("2001:db8::1", 1)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text", ["", "80", ":80", "host", "host:", "host:0", "host:-1", "[::1]", "[::1]80", "[x]:80"]
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)
