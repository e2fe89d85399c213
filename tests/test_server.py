"""The team tracking server (`tunelab server`, `make server`): a real PostgreSQL and a real
`mlflow server` with proxied artifacts on 127.0.0.1, started through tunelab's own module, a
parallel sweep logged there, models read back through it, and the faults of running one.

PostgreSQL's binaries must be on this machine (`.ci/run` installs Debian's): without them these
tests fail, saying so, rather than skip.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import committed_steps, env, run_cli, runs_of, tiny, tunelab, wait_for
from tunelab import manifests
from tunelab import teamserver as team_server
from tunelab.errors import ServerError
from tunelab.teamserver.processes import group_alive
from tunelab.tracking import store


def _state_dir(prefix: str) -> Path:
    """A fresh state directory PostgreSQL's user can reach (pytest's own temporary directories
    are closed to other users, and under root PostgreSQL runs as `postgres`)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def team():
    """A team server for this module, started and stopped by tunelab's module."""
    try:
        team_server.find_binaries()
    except ServerError as exc:
        pytest.fail(f"these tests need PostgreSQL's server binaries (.ci/run installs them): {exc}")
    root = _state_dir("tunelab-team-")
    server = team_server.start_server(root / "state", workers=2)
    yield server
    server.stop()
    assert server.database.pid() is None and server.proc.poll() is not None
    subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture(scope="module")
def team_sweep(team, tmp_path_factory):
    """4 jobs in 2 parallel joblib workers, logged to the team server: (workspace, stdout)."""
    ws = tmp_path_factory.mktemp("team-sweep")
    proc = tunelab(
        "train", "-m", f"output.root={ws / 'outputs'}", f"tracking.uri={team.url}",
        "tracking.experiment=team", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        *tiny("checkpoint=none", "training.lr=1e-3,3e-3", "seed=1,2"), cwd=ws,
    )  # fmt: skip
    return ws, proc.stdout


@pytest.mark.slow
def test_a_parallel_sweep_is_logged_to_postgresql_through_the_server(team, team_sweep):
    client, runs = runs_of(team.url, "team")
    experiment_id = runs[0].info.experiment_id
    (parent,) = [r for r in runs if r.data.tags.get("tunelab.sweep") == "parent"]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 5 and len(kids) == 4
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {(k.data.params["training.lr"], k.data.params["seed"]) for k in kids} == {
        ("0.001", "1"), ("0.001", "2"), ("0.003", "1"), ("0.003", "2"),
    }  # fmt: skip
    for kid in kids:
        assert [m.step for m in client.get_metric_history(kid.info.run_id, "loss")] == [2, 4, 6, 8]
        assert "eval_exact_match" in kid.data.metrics
        # Proxied artifacts: the client only ever sees the server's own scheme.
        assert kid.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert parent.data.tags["tunelab.best_run_id"] in {k.info.run_id for k in kids}
    # The runs are rows in PostgreSQL, and the weights are files the server wrote.

    with team.database.connect("mlflow") as conn:  # as the superuser, with its password
        (count,) = conn.execute(
            "SELECT count(*) FROM runs WHERE experiment_id = %s", (int(experiment_id),)
        ).fetchone()
    assert count == 5
    assert len(list((team.state_dir / "artifacts").rglob("model.safetensors"))) == 4
    ws, _ = team_sweep
    assert not (ws / "mlartifacts").exists() and not (ws / "mlflow.db").exists()


@pytest.mark.slow
def test_every_printed_link_points_at_the_server_used(team, team_sweep):
    _, stdout = team_sweep
    client, runs = runs_of(team.url, "team")
    experiment_id = runs[0].info.experiment_id
    links = re.findall(r"MLflow UI: (\S+)", stdout)
    expected = {
        f"{team.url}/#/experiments/{experiment_id}/runs/{r.info.run_id}{store.MODEL_TRAINING}"
        for r in runs
    }
    assert len(links) == 4 and set(links) <= expected, stdout[-3000:]
    assert "tunelab ui" not in stdout and ":5000" not in stdout
    # `tunelab runs`, given the server by --uri or by MLFLOW_TRACKING_URI, links to it too.
    page = f"MLflow UI: {team.url}/#/experiments/{experiment_id}{store.MODEL_TRAINING}"
    ws, _ = team_sweep
    by_flag = run_cli("runs", "--uri", team.url, "--experiment", "team", cwd=ws).stdout
    by_env = run_cli("runs", "--experiment", "team", cwd=ws,
                     environ={"MLFLOW_TRACKING_URI": team.url}).stdout  # fmt: skip
    for out in (by_flag, by_env):
        assert out.rstrip().endswith(page) and "5000" not in out, out
        assert out.count("FINISHED") == 5


@pytest.mark.slow
def test_the_logged_model_downloads_through_the_server_and_loads_with_transformers(
    team, team_sweep, tmp_path
):
    import torch
    from transformers import AutoModelForCausalLM

    _, runs = runs_of(team.url, "team")
    kid = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    local = Path(kid.data.tags["tunelab.run_dir"]) / "model"
    dst = tmp_path / "exported"
    run_cli("export", kid.info.run_id, str(dst), "--uri", team.url, cwd=tmp_path)
    assert manifests.verify_manifest(dst) == []
    assert (dst / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    # Plain transformers, no tunelab: the downloaded weights are the run's weights.
    got = AutoModelForCausalLM.from_pretrained(dst).state_dict()
    want = AutoModelForCausalLM.from_pretrained(local).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # MLflow's own download of the Logged Model, by its models:/ URI, goes through the server.
    import mlflow

    (model,) = mlflow.MlflowClient(team.url).search_logged_models(
        experiment_ids=[kid.info.experiment_id],
        filter_string=f"source_run_id = '{kid.info.run_id}'",
    )
    os.environ["MLFLOW_TRACKING_URI"] = team.url  # models:/ resolves against the default store
    try:
        by_mlflow = mlflow.artifacts.download_artifacts(
            f"models:/{model.model_id}", dst_path=str(tmp_path / "by-mlflow"),
            tracking_uri=team.url,
        )  # fmt: skip
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    reloaded = AutoModelForCausalLM.from_pretrained(by_mlflow).state_dict()
    assert all(torch.equal(reloaded[k], want[k]) for k in want)


@pytest.mark.slow
def test_a_ddp_run_is_one_run_on_the_server_and_its_model_downloads(team, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tunelab", "train", f"output.root={tmp_path / 'outputs'}",
         f"tracking.uri={team.url}", "tracking.experiment=team-ddp",
         *tiny("checkpoint=steps", "checkpoint.every=4")],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("tunelab: run finished") == 1, proc.stdout
    assert f"MLflow UI: {team.url}/#/experiments/" in proc.stdout
    _, (run,) = runs_of(team.url, "team-ddp")
    assert run.info.status == "FINISHED" and run.data.params["parallel.world_size"] == "2"
    (local,) = (tmp_path / "outputs" / "team-ddp").glob("*/model")
    dst = tmp_path / "exported"
    run_cli("export", run.info.run_id, str(dst), "--uri", team.url, cwd=tmp_path)
    assert (dst / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_database_down_under_the_server_fails_fast_then_uploads_later(team, tmp_path):
    args = ["train", f"output.root={tmp_path / 'outputs'}", f"tracking.uri={team.url}",
            "tracking.experiment=db-down", *tiny("checkpoint=none")]  # fmt: skip
    team.database.stop("immediate")
    try:
        began = time.monotonic()
        down = run_cli(*args, cwd=tmp_path, check=False)
        elapsed = time.monotonic() - began
        # /health still answers; the store behind it does not: seconds, not minutes of retries.
        assert down.returncode == 1 and elapsed < 60, (elapsed, down.stderr[-2000:])
        assert f"tracking server {team.url} answers, but its backend store does not" in down.stderr
        assert "tracking.required=false" in down.stderr and "Traceback" not in down.stderr
        assert not list(tmp_path.rglob("model.safetensors"))
        # tracking.required=false: it trains now, and the same command uploads once it is back.
        offline = run_cli(*args, "tracking.required=false", cwd=tmp_path)
        assert "not uploaded" in offline.stdout
    finally:
        team.database.start()
    again = run_cli(*args, "tracking.required=false", cwd=tmp_path)
    assert "already finished" in again.stdout
    _, (run,) = runs_of(team.url, "db-down")
    assert run.info.status == "FINISHED" and run.data.params["training.max_steps"] == "8"


@pytest.mark.slow  # a real PostgreSQL and mlflow server, a run cut off from them
def test_a_store_lost_mid_run_keeps_the_model_and_the_same_command_uploads_it(team, tmp_path):
    args = ["train", f"output.root={tmp_path / 'outputs'}", f"tracking.uri={team.url}",
            "tracking.experiment=lost-mid-run",
            *tiny("training.max_steps=40", "checkpoint=steps", "checkpoint.every=4")]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", *args], cwd=tmp_path,
        env=env(TUNELAB_TEST_COMMIT_DELAY="0.8"),  # 7 s from the first commit to the end
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    checkpoints = tmp_path / "outputs" / "lost-mid-run"
    wait_for(lambda: any(committed_steps(d) for d in checkpoints.glob("*/checkpoints")), proc)
    team.database.stop("immediate")
    try:
        began = time.monotonic()
        out = proc.communicate(timeout=300)[0]
        elapsed = time.monotonic() - began
        # It trains on, writes its artifact and says how to upload it: no minutes of retries.
        assert proc.returncode == 0, out[-3000:]
        assert "stopped answering during the run" in out and "not uploaded" in out, out[-3000:]
        assert "Traceback" not in out and elapsed < 120, elapsed
        (model,) = checkpoints.glob("*/model")
        assert manifests.verify_manifest(model) == []
    finally:
        team.database.start()
    again = run_cli(*args, cwd=tmp_path)
    assert "already finished" in again.stdout
    _, (run,) = runs_of(team.url, "lost-mid-run")
    assert run.info.status == "FINISHED"
    assert manifests.read_manifest(model)["mlflow_run_id"] == run.info.run_id


# ---------------------------------------------------------------------------------------------
# `tunelab server` as a process: its one-line errors, and what killing things leaves.


def _server(*args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunelab", "server", *args],
        cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _one_line(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr


def test_missing_postgresql_binaries_are_one_line_saying_how_to_install(tmp_path):
    (tmp_path / "empty-bin").mkdir()
    proc = _server("--dir", "state", cwd=tmp_path, TUNELAB_PG_BIN=str(tmp_path / "empty-bin"))
    _one_line(proc, "initdb", "not found", "apt-get install -y postgresql")
    assert not (tmp_path / "state").exists()


@pytest.mark.slow  # needs the real server
def test_a_second_start_of_the_same_directory_names_the_running_server(team, tmp_path):
    proc = _server("--dir", str(team.state_dir), cwd=tmp_path)
    _one_line(proc, "already runs", f"tracking.uri={team.url}")


@pytest.mark.slow  # needs the real server
def test_a_taken_port_is_one_line_and_leaves_no_lock_file(team, tmp_path):
    proc = _server("--dir", "state", "--port", str(team.port), cwd=tmp_path)
    _one_line(proc, f"port {team.port} on 127.0.0.1 is taken")
    assert not (tmp_path / "state").exists()  # refused before anything was made: not a lock
    # A directory that held a server before keeps what it holds, less the lock file.
    kept = team.state_dir.parent / "taken-port"
    (kept / "artifacts").mkdir(parents=True)
    proc = _server("--dir", str(kept), "--port", str(team.port), cwd=tmp_path)
    _one_line(proc, f"port {team.port} on 127.0.0.1 is taken")
    assert sorted(p.name for p in kept.iterdir()) == ["artifacts"]


# ---------------------------------------------------------------------------------------------
# No open door: PostgreSQL wants a password from everyone, and MLflow's role is no superuser.


def _psql(port: int, user: str, *, as_user: str | None = None, passfile: Path | None = None,
          sql: str = "SELECT 1") -> subprocess.CompletedProcess:  # fmt: skip
    """psql against the team's cluster, never prompting (-w); as another OS user via runuser."""
    cmd = ["psql", "-w", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "mlflow",
           "-v", "ON_ERROR_STOP=1", "-c", sql]  # fmt: skip
    if as_user:
        cmd = ["runuser", "-u", as_user, "--", *cmd]
    extra = {"PGPASSFILE": str(passfile)} if passfile else {"PGPASSFILE": "/nonexistent"}
    environ = {k: v for k, v in env(**extra).items() if not k.startswith("PGPASSWORD")}
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=60)


def _server_processes(team) -> list[int]:
    """The pids of the team server's processes: PostgreSQL's, and MLflow's process group."""
    import psutil

    pids = set(_cluster_processes(team.state_dir))
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == team.proc.pid:
                pids.add(proc.pid)
        except (psutil.Error, OSError):
            continue
    return sorted(pids)


@pytest.mark.slow  # needs the real server
def test_postgresql_refuses_every_connection_without_the_password(team):
    import psycopg

    port = team.database.port
    users = ["root", "nobody"] if os.geteuid() == 0 else [None]
    for as_user in users:
        for role in ("postgres", "mlflow"):
            proc = _psql(port, role, as_user=None if as_user == "root" else as_user)
            assert proc.returncode != 0, (as_user, role, proc.stdout)
            assert "no password supplied" in proc.stderr, proc.stderr
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                        passfile="/nonexistent", connect_timeout=10)  # fmt: skip
    # With the password: MLflow's role is no superuser, so its SQL cannot run programs.
    passfile = team.database.passfile
    assert _psql(port, "mlflow", passfile=passfile, sql="SELECT 1").returncode == 0
    who = _psql(port, "mlflow", passfile=passfile, sql="SELECT rolsuper FROM pg_roles "
                "WHERE rolname = current_user")  # fmt: skip
    assert who.stdout.split()[2] == "f", who.stdout
    copy = _psql(port, "mlflow", passfile=passfile, sql="COPY (SELECT 1) TO PROGRAM 'id'")
    assert copy.returncode != 0 and "must be superuser" in copy.stderr, copy.stderr
    hba = (team.database.pgdata / "pg_hba.conf").read_text()
    assert not [ln for ln in hba.splitlines() if "trust" in ln.split("#")[0].split()]


@pytest.mark.slow  # needs the real server
def test_the_secrets_are_0600_files_and_on_no_command_line(team):
    secrets = team.state_dir / "secrets"
    assert secrets.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in secrets.iterdir()] == ["pgpass"]
    assert (secrets / "pgpass").stat().st_mode & 0o777 == 0o600
    passwords = team_server.Passwords.read(secrets / "pgpass")
    assert passwords is not None and len({passwords.superuser, passwords.mlflow}) == 2
    pids = _server_processes(team)
    assert len(pids) >= 4, pids  # postmaster and its workers, mlflow server and uvicorn
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        for secret in (passwords.superuser, passwords.mlflow):
            assert secret.encode() not in cmdline, cmdline
            assert secret.encode() not in environ, pid
    mlflow_cmdline = Path(f"/proc/{team.proc.pid}/cmdline").read_bytes()
    assert b"postgresql" not in mlflow_cmdline  # the store's URI is in its environment


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands PostgreSQL to another user")
def test_a_directory_the_postgres_user_cannot_reach_is_one_line(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    proc = _server("--dir", str(closed / "state"), cwd=tmp_path)
    _one_line(proc, "user 'postgres'", "cannot reach", "--dir")


def _serve(state: Path) -> subprocess.Popen:
    """`tunelab server --dir STATE` in a real process, once it has said where it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "server", "--dir", str(state)], cwd=state.parent,
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert "MLflow at http://127.0.0.1:" in first, (first, proc.stderr and proc.stderr.read())
    return proc


def _cluster_processes(state: Path) -> list[int]:
    return sorted(team_server.Database(team_server.find_binaries(), state / "pgdata",
                                       state / "postgresql.log")._processes())  # fmt: skip


@pytest.mark.slow
def test_the_server_survives_kill_9_a_dead_database_and_a_stale_pid_file(tmp_path):
    from mlflow import MlflowClient

    state = _state_dir("tunelab-faults-") / "state"
    first = _serve(state)
    known = json.loads((state / "server.json").read_text())
    url = known["url"]
    MlflowClient(url).create_experiment("kept")
    # 1. PostgreSQL dies under the server: it says so and stops MLflow too (exit 1).
    postmaster = int((state / "pgdata" / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGKILL)
    assert first.wait(timeout=120) == 1
    assert "PostgreSQL stopped" in first.stderr.read()  # type: ignore[union-attr]
    assert not group_alive(known["mlflow_pid"])
    # 2. Its postmaster.pid is stale, and names a live process that is not PostgreSQL.
    pid_file = state / "pgdata" / "postmaster.pid"
    lines = pid_file.read_text().split("\n")
    pid_file.write_text("\n".join([str(os.getpid()), *lines[1:]]))
    second = _serve(state)
    assert json.loads((state / "server.json").read_text())["url"] == url  # the same port
    assert MlflowClient(url).get_experiment_by_name("kept") is not None  # the same database
    # 3. kill -9 of `tunelab server`: MLflow and PostgreSQL live on, orphaned; the next start
    # stops them and serves on the same port.
    second.kill()
    second.wait()
    assert _cluster_processes(state)
    third = _serve(state)
    again = json.loads((state / "server.json").read_text())
    assert again["url"] == url and again["mlflow_pid"] != known["mlflow_pid"]
    assert MlflowClient(url).get_experiment_by_name("kept") is not None
    # 4. SIGTERM: MLflow, then PostgreSQL, stopped; nothing of either left.
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=120) == 0
    assert "stopped" in third.stdout.read()  # type: ignore[union-attr]
    assert not group_alive(again["mlflow_pid"]) and not _cluster_processes(state)
    assert team_server.port_is_free(int(url.rsplit(":", 1)[1]))
    subprocess.run(["rm", "-rf", str(state.parent)], check=False)


# ---------------------------------------------------------------------------------------------
# The server's disk fills.


@pytest.fixture
def full_disk_server():
    """A team server whose directory is a 128 MiB tmpfs, then filled to the last byte. Needs
    mount rights (root with CAP_SYS_ADMIN, as on the project's machines); skipped otherwise."""
    mountpoint = _state_dir("tunelab-full-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m,mode=755", "tmpfs",
                              str(mountpoint)], capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()})")
    server = None
    try:
        server = team_server.start_server(mountpoint / "state", workers=1)
        filler = mountpoint / "filler"
        with open(filler, "wb") as f:
            free = os.statvfs(mountpoint).f_bavail * os.statvfs(mountpoint).f_frsize
            os.posix_fallocate(f.fileno(), 0, free)
        assert os.statvfs(mountpoint).f_bavail == 0
        yield server
    finally:
        (mountpoint / "filler").unlink(missing_ok=True)
        if server is not None:
            server.stop()
        subprocess.run(["umount", str(mountpoint)], check=True)
        mountpoint.rmdir()


@pytest.mark.slow
def test_a_full_disk_under_the_server_is_one_line_before_anything_is_trained(
    full_disk_server, tmp_path
):
    url = full_disk_server.url
    out = tmp_path / "outputs"
    began = time.monotonic()
    proc = tunelab("train", f"output.root={out}", f"tracking.uri={url}",
                   "tracking.experiment=full-disk", *tiny("checkpoint=none"), cwd=tmp_path,
                   check=False)  # fmt: skip
    elapsed = time.monotonic() - began
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"tunelab: tracking server {url} answers, but could not create the "
                           "experiment 'full-disk'"), line  # fmt: skip
    assert "a full disk?" in line and "mlflow.log" in line, line
    assert elapsed < 120, elapsed
    # Nothing was trained, and the run that never started left no directory.
    assert not list(out.rglob("model.safetensors")) and not list(out.rglob("checkpoints"))
    assert not list((out / "full-disk").glob("*")), "the run that never started left a directory"
    from mlflow import MlflowClient

    assert MlflowClient(url).get_experiment_by_name("full-disk") is None
