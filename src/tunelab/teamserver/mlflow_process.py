"""The team server's `mlflow server` process: started on the cluster in a process group of its
own (the store's URI and password never on its command line), waited for until it answers, and
the one a killed supervisor left behind stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tunelab.errors import ServerError
from tunelab.teamserver.postgres import Database
from tunelab.teamserver.processes import last_error, stop_group
from tunelab.teamserver.state import read_state


def start_mlflow(
    state: Path, database: Database, port: int, workers: int, login_env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """`mlflow server` on `database`: the store's URI in its environment and the role's
    password in the pgpass file libpq reads (PGPASSFILE), so neither is on a command line that
    `ps` shows; with `login_env`, MLflow's basic-auth app."""
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--artifacts-destination", str(state / "artifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]  # fmt: skip
    if login_env:
        cmd += ["--app-name", "basic-auth"]
    env = {**os.environ, **login_env}
    env["MLFLOW_BACKEND_STORE_URI"] = database.uri
    env["PGPASSFILE"] = str(database.passfile)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME"):
        env.pop(name, None)
    with open(state / "mlflow.log", "ab") as log:
        # A session of its own: stopping it stops uvicorn and its workers too.
        return subprocess.Popen(
            cmd, cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    """Return once the server at `url` answers /health; a ServerError when its process `proc`
    exits first, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"the MLflow server exited ({proc.returncode}) while starting: "
                f"{last_error(log) or f'see {log}'}"
            )
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise ServerError(f"the MLflow server did not answer on {url} in {timeout:.0f} s: see {log}")


def stop_leftover_mlflow(state: Path) -> None:
    """The MLflow server of an earlier start whose supervisor was killed (kill -9) still holds
    the port: stop it, so this start can serve on the same port."""
    import psutil

    pid = read_state(state).get("mlflow_pid")
    if not pid:
        return
    try:
        proc = psutil.Process(pid)
        ours = "mlflow" in " ".join(proc.cmdline()) and os.getpgid(pid) == pid
    except (psutil.Error, OSError):
        return
    if ours:
        stop_group(pid)
