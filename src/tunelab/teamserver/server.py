"""A team server started: PostgreSQL, then `mlflow server` on it, both on 127.0.0.1, under one
state directory; stopped in the reverse order."""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tunelab import locks
from tunelab.teamserver import credentials, mlflow_process, state
from tunelab.teamserver.postgres import Database, find_binaries, require_driver, require_pg_user
from tunelab.teamserver.processes import stop_group


@dataclass
class Server:
    """A started team server: PostgreSQL, and `mlflow server` in a process group of its own."""

    state_dir: Path
    database: Database
    port: int
    proc: subprocess.Popen[bytes]
    lock: locks.Lock
    login: Path | None = None  # with --auth: the file holding MLflow's admin login
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """MLflow first (no request half-done against a stopping database), then PostgreSQL."""
        if self._stopped:
            return
        self._stopped = True
        try:
            stop_group(self.proc.pid)
            self.proc.wait()
            self.database.stop("fast")
            with contextlib.suppress(OSError):  # a full disk: server.json keeps the same port
                state.write_state(self.state_dir, {"port": self.port})
        finally:
            state.release(self.lock)


def start_server(
    state_dir: str | Path = state.DEFAULT_DIR,
    port: int | None = None,
    workers: int = 2,
    bin_dir: str | Path | None = None,
    timeout: float = 180,
    auth: bool | None = None,
) -> Server:
    """Start PostgreSQL and `mlflow server` on it, both on 127.0.0.1, state in `state_dir`;
    return once the server answers /health. `port`: the server's port (default: the one this
    directory used last, when free, else a free one). `auth`: MLflow's login on (True) or off
    (False); None: on when this directory was started with it before."""
    bins = find_binaries(bin_dir)
    require_driver()
    require_pg_user()
    folder = Path(state_dir).expanduser().resolve()
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = state.hold(folder)
    database = Database(bins, folder / "pgdata", folder / "postgresql.log")
    proc = None
    try:
        mlflow_process.stop_leftover_mlflow(folder)
        port = state.choose_port(port, state.read_state(folder).get("port"))
        if auth is None:
            auth = credentials.auth_was_on(folder)
        login_env = credentials.prepare_login(folder) if auth else {}
        database.create()
        database.start()
        database.ensure_database()
        (folder / "artifacts").mkdir(exist_ok=True)
        assert database.passfile is not None
        proc = mlflow_process.start_mlflow(folder, database, port, workers, login_env)
        login = credentials.login_file(folder) if auth else None
        server = Server(folder, database, port, proc, lock, login)
        state.write_state(folder, {"port": port, "pid": os.getpid(), "mlflow_pid": proc.pid,
                                   "postgres_port": database.port, "url": server.url,
                                   "auth": bool(auth)})  # fmt: skip
        mlflow_process.wait_healthy(proc, server.url, folder / "mlflow.log", timeout)
        return server
    except BaseException:
        if proc is not None:
            stop_group(proc.pid)
            proc.wait()
        database.stop("fast")
        state.release(lock)
        if made and not any(folder.iterdir()):  # refused before anything was made in it
            folder.rmdir()
        raise
