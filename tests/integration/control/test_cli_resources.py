"""`meshlayer apply | get | delete | describe | check` against a real control plane:
output, error messages and exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.support.control import ADMIN_TOKEN, Control, start_control
from tests.support.procs import Cluster, free_port, run_meshlayer

SERVICE = """\
apiVersion: meshlayer/v1
kind: Service
metadata: {name: catalog}
spec:
  loadBalancer: round-robin
  endpoints:
    - {address: "127.0.0.1:8081", meshed: false}
"""
ROUTE = """\
apiVersion: meshlayer/v1
kind: HTTPRoute
metadata: {name: catalog-canary}
spec:
  parentRefs: [{name: catalog}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /v2}}]
      backendRefs: [{name: catalog-v2}]
    - backendRefs: [{name: catalog}]
"""
SERVICE_V2 = SERVICE.replace("catalog}", "catalog-v2}").replace("8081", "8082")


@pytest.fixture
def ctl(cluster: Cluster) -> Control:
    return start_control(cluster.tmp, f"sqlite:{cluster.tmp / 'control.db'}", procs=cluster.procs)


def ml(
    args: list[str], stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m meshlayer ARGS`` with optional stdin and extra environment."""
    full = {"MESHLAYER_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})}
    return run_meshlayer(args, 30, stdin=stdin, env=full, unset=["MESHLAYER_CONTROL"])


def write(dirpath: Path, name: str, text: str) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    p = dirpath / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("command", ["apply", "get", "delete", "describe", "check"])
def test_help(command: str) -> None:
    res = ml([command, "--help"])
    assert res.returncode == 0, res.stderr
    assert f"usage: meshlayer {command}" in res.stdout and "--control" in res.stdout


def test_apply_get_delete_round_trip(ctl: Control, tmp_path: Path) -> None:
    d = tmp_path / "mesh"
    write(d, "10-services.yaml", SERVICE + "---\n" + SERVICE_V2)
    write(d, "20-routes.yml", ROUTE)
    write(d, "README.txt", "not config")  # ignored: not *.yaml|*.yml|*.json
    c = ["--control", ctl.url]

    res = ml(["apply", "-f", str(d), *c])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "service/catalog created (resourceVersion 1)",
        "service/catalog-v2 created (resourceVersion 1)",
        "httproute/catalog-canary created (resourceVersion 1)",
        "mesh version 1",
    ]
    res = ml(["apply", "-f", str(d / "10-services.yaml"), *c])
    assert "service/catalog unchanged" in res.stdout and res.returncode == 0

    res = ml(["get", "services", *c])
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "RESOURCE", "VERSION", "SUMMARY"]
    assert [ln.split()[0] for ln in lines[1:]] == ["catalog", "catalog-v2"]
    assert "round-robin" in lines[1]
    res = ml(["get", "all", *c])
    assert {ln.split()[0] for ln in res.stdout.splitlines()[1:]} == {
        "catalog",
        "catalog-v2",
        "catalog-canary",
    }
    res = ml(["get", "HTTPRoute", "catalog-canary", "-o", "json", *c])
    doc = json.loads(res.stdout)
    assert doc["kind"] == "HTTPRoute" and doc["metadata"]["resourceVersion"] == 1
    assert doc["spec"]["rules"][0]["backendRefs"][0]["name"] == "catalog-v2"
    res = ml(["get", "service", "-o", "yaml", *c])
    docs = list(yaml.safe_load_all(res.stdout))
    assert [x["metadata"]["name"] for x in docs] == ["catalog", "catalog-v2"]

    # what `get -o json` prints can be applied again (from stdin)
    listing = ml(["get", "services", "-o", "json", *c]).stdout
    res = ml(["apply", "-f", "-", *c], stdin=listing)
    assert res.returncode == 0, res.stderr
    assert "service/catalog unchanged" in res.stdout

    res = ml(["delete", "httproute", "catalog-canary", *c])
    assert res.returncode == 0 and "httproute/catalog-canary deleted" in res.stdout
    res = ml(["delete", "httproute", "catalog-canary", *c])
    assert res.returncode == 1 and "not found" in res.stderr
    res = ml(["get", "httproute", "catalog-canary", *c])
    assert res.returncode == 1 and "not found" in res.stderr


def test_invalid_document_applies_nothing_and_names_file_doc_and_field(
    ctl: Control, tmp_path: Path
) -> None:
    d = tmp_path / "mesh"
    write(d, "a.yaml", SERVICE)
    bad_route = ROUTE.replace("value: /v2", "value: v2")  # paths start with /
    write(d, "b.yaml", SERVICE_V2 + "---\n" + bad_route)
    res = ml(["apply", "-f", str(d), "--control", ctl.url])
    assert res.returncode == 2, res.stdout + res.stderr
    msg = res.stderr
    assert f"{d / 'b.yaml'}#2 (HTTPRoute/catalog-canary)" in msg, msg
    assert "spec.rules[0].matches[0].path.value" in msg
    status, body = ctl.api("GET", "/v1/resources")
    assert status == 200 and body["items"] == []  # all or nothing


def test_yaml_syntax_error_names_file_and_line(ctl: Control, tmp_path: Path) -> None:
    p = write(tmp_path, "broken.yaml", SERVICE + "---\nkind: [unclosed\n")
    res = ml(["apply", "-f", str(p), "--control", ctl.url])
    assert res.returncode == 2
    assert str(p) in res.stderr and "line 10" in res.stderr, res.stderr
    res = ml(["apply", "-f", str(tmp_path / "missing.yaml"), "--control", ctl.url])
    assert res.returncode == 2 and "no such file" in res.stderr


def test_stale_resource_version_is_a_conflict(ctl: Control) -> None:
    c = ["--control", ctl.url]
    assert ml(["apply", "-f", "-", *c], stdin=SERVICE).returncode == 0
    assert ml(["apply", "-f", "-", *c], stdin=SERVICE.replace("8081", "8083")).returncode == 0
    stale = SERVICE.replace("{name: catalog}", "{name: catalog, resourceVersion: 1}")
    res = ml(["apply", "-f", "-", *c], stdin=stale)
    assert res.returncode == 1
    assert "conflict" in res.stderr and "resourceVersion 1" in res.stderr, res.stderr
    res = ml(["delete", "service", "catalog", "--resource-version", "1", *c])
    assert res.returncode == 1 and "conflict" in res.stderr


def test_unreachable_control_plane(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["get", "services"], ["check"], ["apply", "-f", "-"]):
        res = ml([*args, "--control", url], stdin=SERVICE)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        out = res.stdout + res.stderr
        assert f"cannot reach the control plane at {url}: connection refused" in out
    # the environment variable names the control plane when --control is not given
    res = ml(["get", "services"], env={"MESHLAYER_CONTROL": url})
    assert f"cannot reach the control plane at {url}" in res.stderr


def test_describe_and_check_with_sidecars(cluster: Cluster, ctl: Control) -> None:
    c = ["--control", ctl.url]
    assert ml(["apply", "-f", "-", *c], stdin=SERVICE + "---\n" + SERVICE_V2).returncode == 0
    up = cluster.upstream("catalog")
    catalog = cluster.sidecar(None, service="catalog", app=up.address, control=ctl.url)
    client = cluster.sidecar(None, control=ctl.url)
    assert ml(["apply", "-f", "-", *c], stdin=ROUTE).returncode == 0

    res = ml(["describe", "service", "catalog", *c])
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "Load balancer:     round-robin" in out
    assert "127.0.0.1:8081  (not meshed)" in out
    assert f"127.0.0.1:{catalog.inbound}" in out and "yes" in out
    assert "catalog-canary (routes its traffic)" in out
    res = ml(["describe", "service", "catalog-v2", *c])
    assert "catalog-canary (sends traffic to it)" in res.stdout
    res = ml(["describe", "service", "client", *c])  # registered only: no Service resource
    assert res.returncode == 0 and "registered endpoints only" in res.stdout
    res = ml(["describe", "service", "nope", *c])
    assert res.returncode == 1 and "nope" in res.stderr

    res = ml(["check", *c])
    assert res.returncode == 0, res.stdout
    lines = res.stdout.splitlines()
    assert lines[0] == f"\N{SQUARE ROOT} control plane reachable at {ctl.url}"
    assert lines[1].startswith("\N{SQUARE ROOT} store healthy")
    assert sum(1 for ln in lines if ln.startswith("\N{SQUARE ROOT} sidecar ")) == 2
    assert lines[-1] == "all checks passed"

    # a sidecar that stops following the control plane shows up as behind
    client.proc.signal(signal.SIGSTOP)
    try:
        ml(["delete", "httproute", "catalog-canary", *c])
        res = ml(["check", "--wait", "1", *c])
    finally:
        client.proc.signal(signal.SIGCONT)
    assert res.returncode == 1, res.stdout
    behind = [ln for ln in res.stdout.splitlines() if ln.startswith("\N{MULTIPLICATION SIGN}")]
    assert len(behind) == 1 and "sidecar client-" in behind[0] and "mesh is at" in behind[0]
    deadline = time.monotonic() + 10
    while ml(["check", "--wait", "2", *c]).returncode != 0:
        assert time.monotonic() < deadline, "the resumed sidecar never caught up"


def test_short_kind_names_work_for_get_describe_and_delete(ctl: Control, tmp_path: Path) -> None:
    """The names `describe` takes (svc) work for get and delete too, and every kind has
    its singular, plural and short forms."""
    c = ["--control", ctl.url]
    p = write(tmp_path, "mesh.yaml", SERVICE + "---\n" + SERVICE_V2 + "---\n" + ROUTE)
    assert ml(["apply", "-f", str(p), *c]).returncode == 0
    for kind, names in {
        "Service": ["svc", "service", "services", "Service"],
        "HTTPRoute": ["route", "routes", "httproute", "httproutes", "HTTPRoute"],
        "PriorityClass": ["pc", "priorityclass", "priorityclasses"],
        "AuthorizationPolicy": ["authorizationpolicy", "authorizationpolicies"],
        "Mesh": ["mesh", "meshes", "Mesh"],
    }.items():
        for name in names:
            res = ml(["get", name, "-o", "json", *c])
            assert res.returncode == 0, (name, res.stderr)
            items = json.loads(res.stdout)["items"]
            assert all(d["kind"] == kind for d in items), (name, items)
    assert ml(["get", "svc", "catalog", "-o", "json", *c]).returncode == 0
    res = ml(["get", "svc", *c])
    assert [ln.split()[0] for ln in res.stdout.splitlines()[1:]] == ["catalog", "catalog-v2"]
    assert ml(["describe", "svc", "catalog", *c]).returncode == 0
    res = ml(["delete", "route", "catalog-canary", *c])
    assert res.returncode == 0, res.stderr
    res = ml(["get", "nosuchkind", *c])
    assert res.returncode == 1 and "unknown kind" in res.stderr
