"""The sidecar's private key lives in memory only: after it got and renewed its
certificate, no file it (or anything else in the test) wrote holds a private key,
except the control plane's store and the CA key the test handed to it."""

from __future__ import annotations

import time
from pathlib import Path

from tests.integration.security.mesh import sidecar_view, start_mesh, wait_identity
from tests.support.procs import ROOT, Cluster, request

MARKER = b"PRIVATE KEY"


def _files_with_keys(folder: Path, skip: set[Path], since: float = 0.0) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        if path in skip or not path.is_file() or path.is_symlink():
            continue
        try:
            if path.stat().st_mtime < since:
                continue
            if MARKER in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found


def test_the_sidecar_private_key_never_reaches_disk(cluster: Cluster) -> None:
    start = time.time()
    mesh = start_mesh(cluster, cert_ttl="2s")
    up = cluster.upstream("b")
    b = mesh.sidecar("b", up.address)
    a = mesh.sidecar("a", "127.0.0.1:9")
    wait_identity(b)
    wait_identity(a, ("b",))
    deadline = time.monotonic() + 10
    while min(sidecar_view(sc)["control"]["identity"]["renewals"] for sc in (a, b)) < 1:
        assert time.monotonic() < deadline, "no renewal"
        time.sleep(0.1)
    assert request(a.outbound, path="/id", host="b")[0] == 200
    states = [Path(sidecar_view(sc)["control"]["stateFile"]).parent for sc in (a, b)]
    assert all((s / "config.json").is_file() for s in states)  # they did write there
    for sc in (a, b):
        sc.proc.stop()  # everything flushed
    mesh.ctl.stop()

    store = {p for p in cluster.tmp.glob("control.db*")}
    skip = store | {cluster.tmp / "ca-key.pem"}  # the control plane's store and CA input
    assert (cluster.tmp / "ca-key.pem").read_bytes().count(MARKER) == 2  # the scan can see
    assert _files_with_keys(cluster.tmp, skip) == []
    for state in states:  # (under the tmp dir already; said explicitly)
        assert _files_with_keys(state, set()) == []
    # the sidecars ran in the repository: nothing there written since the test began
    default_state = ROOT / ".meshlayer"
    if default_state.is_dir():
        assert _files_with_keys(default_state, set(), since=start) == []
