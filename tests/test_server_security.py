"""No open door (issue 18, section 6): the team server's MLflow login (`tunelab server --auth`),
a PostgreSQL cluster of an earlier tunelab (trust authentication) migrated to passwords, and an
export that shares no file with the run it came from. Real PostgreSQL, real `mlflow server`
processes on 127.0.0.1; the connection tests against the module's server are in test_server.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import env, run_cli, runs_of, tiny
from tests.test_server import _state_dir
from tunelab import manifests
from tunelab import teamserver as team_server
from tunelab.teamserver.postgres import PG_CONF


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _anonymous(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of a plain request to MLflow's REST API (no MLflow client)."""
    request = urllib.request.Request(
        url + "/api/2.0/mlflow/experiments/search", data=b'{"max_results": 1}',
        headers={"Content-Type": "application/json", **(headers or {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _login(file: Path) -> dict[str, str]:
    pairs = (ln.removeprefix("export ").split("=", 1) for ln in file.read_text().splitlines())
    return {k: v for k, v in (p for p in pairs if len(p) == 2) if k.startswith("MLFLOW_")}


@pytest.mark.slow
def test_with_auth_an_anonymous_client_is_refused_and_the_generated_login_works(tmp_path):
    state = _state_dir("tunelab-auth-") / "state"
    server = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "server", "--dir", str(state), "--auth", "--workers",
         "1"], cwd=state.parent, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        said = [server.stdout.readline()]
        assert "MLflow at http://127.0.0.1:" in said[0], (said, server.stderr.read())  # type: ignore[union-attr]
        while "MLflow login" not in said[-1] and len(said) < 8:  # one print: no wait
            said.append(server.stdout.readline())
        login_file = state / "secrets" / "mlflow-login.env"
        assert f"MLflow login on: {login_file} (0600)" in "".join(said), said
        url = json.loads((state / "server.json").read_text())["url"]
        # The secrets: a directory closed to others, each file 0600.
        secrets = state / "secrets"
        assert secrets.stat().st_mode & 0o777 == 0o700
        names = sorted(p.name for p in secrets.iterdir())
        assert names == ["basic_auth.db", "basic_auth.ini", "flask.key", "mlflow-login.env",
                         "pgpass"], names  # fmt: skip
        for file in secrets.iterdir():
            assert file.stat().st_mode & 0o777 == 0o600, file
        login = _login(login_file)
        assert login["MLFLOW_TRACKING_USERNAME"] == "admin"
        password = login["MLFLOW_TRACKING_PASSWORD"]
        # Anonymous, or with a wrong password: refused. With the login: served.
        assert _anonymous(url) == 401
        import base64

        wrong = base64.b64encode(b"admin:not-the-password").decode()
        assert _anonymous(url, {"Authorization": f"Basic {wrong}"}) == 401
        right = base64.b64encode(f"admin:{password}".encode()).decode()
        assert _anonymous(url, {"Authorization": f"Basic {right}"}) == 200
        # tunelab without the login: one line, before anything is trained.
        args = ["train", f"output.root={tmp_path / 'outputs'}", f"tracking.uri={url}",
                "tracking.experiment=behind-login", *tiny("checkpoint=none")]  # fmt: skip
        refused = run_cli(*args, cwd=tmp_path, check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert f"tracking server {url} refused the login (HTTP 401; none were given)" in (
            refused.stderr
        )
        assert not list((tmp_path / "outputs").rglob("model.safetensors"))
        # With MLFLOW_TRACKING_USERNAME/PASSWORD from the file: a run logged, its model too.
        run_cli(*args, cwd=tmp_path, environ=login)
        listed = run_cli("runs", "--uri", url, "--experiment", "behind-login", cwd=tmp_path,
                         environ=login)  # fmt: skip
        assert listed.stdout.count("FINISHED") == 1, listed.stdout
        os.environ.update(login)
        try:
            client, (run,) = runs_of(url, "behind-login")
            assert run.info.status == "FINISHED" and "eval_loss" in run.data.metrics
            assert {e.name for e in client.search_experiments()} >= {"behind-login"}
        finally:
            for name in login:
                os.environ.pop(name, None)
        # The password is on no command line and in no environment of the server's processes.
        pids = _processes_of(state)
        assert len(pids) >= 4, pids
        for pid in pids:
            assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
            assert password.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(timeout=120) == 0
        finally:
            subprocess.run(["rm", "-rf", str(state.parent)], check=False)


def _processes_of(state: Path) -> list[int]:
    """PostgreSQL's processes in `state`, and the MLflow server's process group."""
    import psutil

    known = json.loads((state / "server.json").read_text())
    pids = set(team_server.Database(team_server.find_binaries(), state / "pgdata",
                                    state / "postgresql.log")._processes())  # fmt: skip
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == known["mlflow_pid"]:
                pids.add(proc.pid)
        except (psutil.Error, OSError):
            continue
    return sorted(pids)


@pytest.mark.slow
def test_a_trust_cluster_of_an_earlier_tunelab_is_migrated_to_passwords():
    import psycopg
    from mlflow import MlflowClient

    root = _state_dir("tunelab-legacy-")
    state = root / "state"
    bins = team_server.find_binaries()
    # A cluster as tunelab made them before: trust authentication, MLflow's tables (and its
    # runs) owned by the superuser it connected as.
    old = team_server.Database(bins, state / "pgdata", state / "postgresql.log")
    old.pgdata.mkdir(parents=True, mode=0o700)
    old._own(old.pgdata)
    subprocess.run(bins.cmd("initdb", "-D", str(old.pgdata), "-U", "postgres", "-A", "trust",
                            "-E", "UTF8", "--locale=C"),
                   cwd=old.pgdata, check=True, capture_output=True)  # fmt: skip
    with open(old.pgdata / "postgresql.conf", "a") as conf:
        conf.write(PG_CONF)
    old.start()
    try:
        with _without_password(old.port) as conn:
            conn.execute('CREATE DATABASE "mlflow"')
        legacy = MlflowClient(f"postgresql+psycopg://postgres@127.0.0.1:{old.port}/mlflow")
        kept = legacy.create_experiment("kept")
        legacy.set_terminated(legacy.create_run(kept).info.run_id)
    finally:
        old.stop()
    server = team_server.start_server(state, workers=1)
    try:
        with pytest.raises(psycopg.OperationalError, match="no password supplied"):
            _without_password(server.database.port)
        assert server.database.migrated and not server.database.trusts()
        assert (state / "secrets" / "pgpass").stat().st_mode & 0o777 == 0o600
        # The runs of before are there, and MLflow (now the role `mlflow`) writes new ones.
        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name("kept")
        assert exp is not None and len(client.search_runs([exp.experiment_id])) == 1
        new = client.create_run(exp.experiment_id).info.run_id
        client.log_metric(new, "loss", 1.0)
        client.set_terminated(new)
        assert len(client.search_runs([exp.experiment_id])) == 2
        with server.database.connect("mlflow") as conn:
            owners = conn.execute(
                "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n"
                " ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
            ).fetchall()
            (database_owner,) = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mlflow'"
            ).fetchone()
        assert owners == [("mlflow",)] and database_owner == "mlflow"
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _without_password(port: int):
    import psycopg

    return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                           passfile="/nonexistent", autocommit=True)  # fmt: skip


def test_an_export_shares_no_file_with_the_run_or_the_store(workspace, tmp_path):
    workspace.train("checkpoint=none")
    (run_dir,) = workspace.run_dirs()
    model = run_dir / "model"
    run_id = manifests.read_manifest(model)["mlflow_run_id"]
    weights = model / "model.safetensors"
    # The store's copy of a local run is the run's own files, hard-linked (one copy on disk).
    (stored,) = [p for p in (workspace.root / "mlartifacts").rglob("model.safetensors")
                 if p.stat().st_ino == weights.stat().st_ino]  # fmt: skip
    before = _sha256(weights)
    dst = tmp_path / "exported"
    run_cli("export", run_id, str(dst), "--uri", workspace.uri, cwd=workspace.root)
    for file in (p for p in dst.rglob("*") if p.is_file()):
        assert file.stat().st_nlink == 1, file
    exported = dst / "model.safetensors"
    assert exported.stat().st_ino not in {weights.stat().st_ino, stored.stat().st_ino}
    # Editing the export, in place, leaves the run's model and the store's copy as they were.
    exported.chmod(0o644)
    with open(exported, "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 64)
    assert _sha256(exported) != before
    assert _sha256(weights) == before and _sha256(stored) == before
    assert manifests.verify_manifest(model) == []
