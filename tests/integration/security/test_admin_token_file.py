"""Where the CLI finds the generated admin token: ``--admin-token-file`` /
``MESHLAYER_ADMIN_TOKEN_FILE`` (the control plane logs the file's path at start,
never the token), else ``./.meshlayer/admin-token``; a 401 says where it looked."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.control import start_control
from tests.support.procs import Cluster, run_meshlayer

SERVICE = "apiVersion: meshlayer/v1\nkind: Service\nmetadata: {name: web}\nspec: {}\n"


def _ml(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_meshlayer(args, 30, cwd, env=env, unset=["MESHLAYER_"])


def test_the_cli_takes_the_admin_token_file_the_control_plane_logged(cluster: Cluster) -> None:
    state = cluster.tmp / "control-state"
    state.mkdir()
    ctl = start_control(
        cluster.tmp,
        f"sqlite:{state / 'control.db'}",
        procs=cluster.procs,
        env={"MESHLAYER_ADMIN_TOKEN": ""},
    )
    path = state / "admin-token"
    token = path.read_text().strip()
    log = ctl.log()
    assert f"admin token file: {path}" in log, log
    assert token not in log
    elsewhere = cluster.tmp / "elsewhere"  # no .meshlayer/admin-token here
    elsewhere.mkdir()
    doc = elsewhere / "svc.yaml"
    doc.write_text(SERVICE)
    apply = ["apply", "-f", str(doc), "--control", ctl.url]

    res = _ml(apply, cwd=elsewhere)
    assert res.returncode == 1 and "unauthorized" in res.stderr, res.stderr
    default = elsewhere / ".meshlayer" / "admin-token"
    assert f"{default} (no such file)" in res.stderr, res.stderr
    assert "--admin-token-file" in res.stderr and "MESHLAYER_ADMIN_TOKEN_FILE" in res.stderr
    assert "logs that path at start" in res.stderr

    res = _ml([*apply, "--admin-token-file", str(path)], cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert "service/web created" in res.stdout
    env = {"MESHLAYER_ADMIN_TOKEN_FILE": str(path)}
    res = _ml(["delete", "service", "web", "--control", ctl.url], cwd=elsewhere, env=env)
    assert res.returncode == 0, res.stderr
    create = ["token", "create", "--service", "web", "--control", ctl.url]
    res = _ml([*create, "--admin-token-file", str(path)], cwd=elsewhere)
    assert res.returncode == 0 and len(res.stdout.strip()) >= 40, res.stderr
    res = _ml(["ca", "rotate", "--phase", "add", "--control", ctl.url], cwd=elsewhere, env=env)
    assert res.returncode == 0, res.stderr

    # a file that is not there: said so, by its path; the flag wins over the variable
    missing = cluster.tmp / "nope" / "admin-token"
    res = _ml([*create, "--admin-token-file", str(missing)], cwd=elsewhere, env=env)
    assert res.returncode == 1 and f"--admin-token-file {missing} (no such file)" in res.stderr
    # the default file still works where it is (the control plane's own folder)
    res = _ml(create, cwd=state.parent, env={})
    assert res.returncode == 1  # ./.meshlayer/admin-token is not there either
    (cluster.tmp / ".meshlayer").mkdir()
    (cluster.tmp / ".meshlayer" / "admin-token").write_text(token + "\n")
    res = _ml(create, cwd=cluster.tmp)
    assert res.returncode == 0, res.stderr
