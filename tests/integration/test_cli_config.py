"""The command line: help, and refusing bad configs and flags before anything starts."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.procs import Cluster, free_port, run_meshlayer, service_yaml

GOOD = service_yaml("catalog", ["127.0.0.1:8081"])
HEAD = "apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: catalog}\nspec:\n"


# -- 6. help ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], ["usage: meshlayer", "sidecar", "demo"]),
        (["sidecar"], ["usage: meshlayer sidecar", "--service", "--config", "--grace"]),
        (["demo"], ["usage: meshlayer demo", "--duration"]),
    ],
)
def test_help(args: list[str], words: list[str]) -> None:
    res = run_meshlayer([*args, "--help"])
    assert res.returncode == 0, res.stderr
    for word in words:
        assert word in res.stdout


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "meshlayer"
    if not script.exists():
        pytest.skip("meshlayer console script not installed")
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=20)
    assert res.returncode == 0
    assert "usage: meshlayer" in res.stdout


def test_version_and_no_command() -> None:
    res = run_meshlayer(["--version"])
    assert res.returncode == 0
    assert res.stdout.startswith("meshlayer ")
    res = run_meshlayer([])
    assert res.returncode == 2
    assert "usage: meshlayer" in res.stderr


# -- 7. invalid configs and flags: exit 2, nothing started --------------------------


def _sidecar_args(config: str | Path, ports: list[int], *extra: str) -> list[str]:
    out, inb, adm = ports
    return [
        "sidecar",
        "--service",
        "client",
        "--config",
        str(config),
        "--outbound",
        f"127.0.0.1:{out}",
        "--inbound",
        f"127.0.0.1:{inb}",
        "--admin",
        f"127.0.0.1:{adm}",
        *extra,
    ]


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _refused(tmp_path: Path, text: str | None, *extra: str, name: str = "mesh.yaml") -> str:
    """Run a sidecar that must refuse to start; returns its stderr."""
    config = tmp_path / name
    if text is not None:
        config.write_text(text)
    ports = [free_port() for _ in range(3)]
    t0 = time.monotonic()
    res = run_meshlayer(_sidecar_args(config, ports, *extra))
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert time.monotonic() - t0 < 10
    assert all(_free(p) for p in ports)
    assert "ready" not in res.stderr  # the startup line never came
    assert "Traceback" not in res.stderr
    return res.stderr


@pytest.mark.parametrize(
    ("text", "document", "field", "problem"),
    [
        (
            HEAD + "  endpoint:\n    - {address: '127.0.0.1:1'}\n",
            "mesh.yaml#1 (Service/catalog)",
            "spec.endpoint",
            "unknown field",
        ),
        (
            HEAD + "  endpoints:\n    - {address: 'localhost'}\n",
            "mesh.yaml#1 (Service/catalog)",
            "spec.endpoints[0].address",
            "'localhost' is not HOST:PORT",
        ),
        (
            HEAD + "  endpoints:\n    - {address: 'localhost:99999'}\n",
            "mesh.yaml#1 (Service/catalog)",
            "spec.endpoints[0].address",
            "must be 1-65535",
        ),
        (
            HEAD + "  loadBalancer: random\n",
            "mesh.yaml#1 (Service/catalog)",
            "spec.loadBalancer",
            "must be one of round-robin, least-request, p2c-ewma, got 'random'",
        ),
        (
            HEAD.replace("meshlayer/v1", "meshlayer/v2") + "  endpoints: []\n",
            "mesh.yaml#1",
            "apiVersion",
            "must be 'meshlayer/v1', got 'meshlayer/v2'",
        ),
        (
            HEAD.replace("kind: Service", "kind: Deployment") + "  endpoints: []\n",
            "mesh.yaml#1",
            "kind",
            "must be one of Service, HTTPRoute, PriorityClass, AuthorizationPolicy, Mesh, "
            "ClassificationRule, got 'Deployment'",
        ),
        (
            GOOD + "---\n" + GOOD,
            "mesh.yaml#2 (Service/catalog)",
            "metadata.name",
            "duplicate Service 'catalog'",
        ),
        (
            HEAD + "  timeouts: {request: -5}\n",
            "mesh.yaml#1 (Service/catalog)",
            "spec.timeouts.request",
            "must be positive",
        ),
        (
            HEAD + "  timeouts: {connect: -250ms}\n",
            "mesh.yaml#1 (Service/catalog)",
            "spec.timeouts.connect",
            "must be a duration like 250ms",
        ),
        (
            HEAD + "  timeouts: {connect: .nan}\n",
            "mesh.yaml#1 (Service/catalog)",
            "spec.timeouts.connect",
            "must be positive",
        ),
    ],
    ids=[
        "unknown-field",
        "address-without-port",
        "address-port-range",
        "load-balancer",
        "api-version",
        "kind",
        "duplicate-name",
        "negative-timeout",
        "negative-duration",
        "nan-timeout",
    ],
)
def test_invalid_config_exits_2_naming_document_field_and_problem(
    tmp_path: Path, text: str, document: str, field: str, problem: str
) -> None:
    err = _refused(tmp_path, text)
    assert f"{document}: {field}: " in err, err
    assert problem in err, err


def test_bad_yaml(tmp_path: Path) -> None:
    err = _refused(tmp_path, HEAD + "  endpoints: [\n    {address: 'a:1'\n")
    assert "mesh.yaml: not valid YAML at line" in err, err


def test_missing_config_file(tmp_path: Path) -> None:
    err = _refused(tmp_path, None, name="absent.yaml")
    assert str(tmp_path / "absent.yaml") in err, err
    assert "cannot read" in err and "No such file" in err, err


def test_second_document_is_named(tmp_path: Path) -> None:
    other = service_yaml("orders", ["127.0.0.1:1"]).replace("endpoints:", "endpionts:")
    err = _refused(tmp_path, GOOD + "---\n" + other)
    assert "mesh.yaml#2 (Service/orders): spec.endpionts: unknown field" in err, err


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("--inbound", "notaport", "'notaport' is not HOST:PORT"),
        ("--outbound", "127.0.0.1:0", "must be 1-65535"),
        ("--admin", "127.0.0.1:http", "must be 1-65535"),
        ("--app", "[::1]:", "must be 1-65535"),
        ("--grace", "-1", "must be positive"),
        ("--grace", "nan", "must be positive"),
        ("--idle-timeout", "0", "must be positive"),
        ("--header-timeout", "inf", "finite"),
    ],
)
def test_bad_flag_exits_2_naming_the_flag(
    tmp_path: Path, flag: str, value: str, problem: str
) -> None:
    err = _refused(tmp_path, GOOD, f"{flag}={value}")
    assert f"{flag}: " in err, err
    assert problem in err, err


@pytest.mark.parametrize("argv", [["--grace", "soon"], ["--log-level", "loud"], ["--bogus"]])
def test_unparseable_flag_is_a_usage_error(tmp_path: Path, argv: list[str]) -> None:
    err = _refused(tmp_path, GOOD, *argv)
    assert "usage: meshlayer" in err  # argparse reports unknown flags at the top level
    assert argv[0] in err


def test_missing_required_flags() -> None:
    res = run_meshlayer(["sidecar"])
    assert res.returncode == 2
    assert "--service" in res.stderr and "--config" in res.stderr


def test_port_in_use_is_a_runtime_failure_naming_the_listener(cluster: Cluster) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = cluster.write_config(GOOD)
        out, adm = free_port(), free_port()
        res = run_meshlayer(_sidecar_args(config, [out, port, adm]))
        assert res.returncode == 1, res.stderr
        assert f"cannot listen on inbound 127.0.0.1:{port}" in res.stderr
        assert _free(out) and _free(adm)


def test_valid_config_starts(cluster: Cluster) -> None:
    """The counterpart of the refusals: the same command line with a good config runs."""
    sc = cluster.sidecar(GOOD)
    assert sc.admin_get("/ready")[0] == 200
