"""A team tracking server on this machine: MLflow's runs in a real PostgreSQL, artifacts proxied
by `mlflow server` (clients upload and download through it: `mlflow-artifacts:` URIs), both on
127.0.0.1, everything under one state directory:

    <dir>/pgdata/          the PostgreSQL cluster: created once (initdb), reused on every start
    <dir>/artifacts/       what the server stores for its clients (--artifacts-destination)
    <dir>/postgresql.log   <dir>/mlflow.log
    <dir>/server.json      the ports and processes of the last start (the port is kept)
    <dir>/server.lock      held by the process that runs the server

`tunelab server` (`make server`) runs it in the foreground; Ctrl-C or SIGTERM stops MLflow, then
PostgreSQL (`pg_ctl stop -m fast`). PostgreSQL refuses to run as root: as root its commands run
as the `postgres` user, which then owns `pgdata/`. Only the standard library is imported at the
top; psycopg, psutil and mlflow's server are used inside functions.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab import artifacts, locks

DEFAULT_DIR = ".tunelab-server"
PG_USER = "postgres"  # the cluster's superuser, and the OS user it runs as under root
DATABASE = "mlflow"
INSTALL_HINT = "install them with `apt-get install -y postgresql`"
# Written into a new cluster's postgresql.conf: TCP on loopback only, no unix socket (its path
# would be limited to 107 bytes, and the system's socket directory may not be writable).
PG_CONF = "\n# tunelab server\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"


class ServerError(RuntimeError):
    """Why the server cannot start or stopped: one line, said as it is."""


@dataclass
class Binaries:
    """PostgreSQL's server programs (initdb, pg_ctl, postgres) and their major version."""

    bin_dir: Path
    version: str

    def cmd(self, name: str, *args: str) -> list[str]:
        """The command line running `name`: as the postgres user when we are root."""
        program = [str(self.bin_dir / name), *args]
        return ["runuser", "-u", PG_USER, "--", *program] if os.geteuid() == 0 else program


def find_binaries(bin_dir: str | Path | None = None) -> Binaries:
    """PostgreSQL's binaries from `bin_dir`, else $TUNELAB_PG_BIN, else PATH, else the newest
    /usr/lib/postgresql/<version>/bin (where Debian keeps them, off PATH)."""
    given = bin_dir or os.environ.get("TUNELAB_PG_BIN")
    if given:
        candidates = [Path(given)]
    else:
        on_path = shutil.which("initdb")
        debian = sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0],
            reverse=True,
        )
        candidates = [Path(on_path).resolve().parent] if on_path else []
        candidates += debian
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            out = subprocess.run(
                [str(folder / "pg_ctl"), "--version"], capture_output=True, text=True
            ).stdout
            found = re.search(r"(\d+)(?:\.\d+)?", out)
            return Binaries(folder, found.group(1) if found else "?")
    where = str(given) if given else "PATH and /usr/lib/postgresql/*/bin"
    raise ServerError(
        f"PostgreSQL's initdb, pg_ctl and postgres are not found in {where}: {INSTALL_HINT}, "
        "or set TUNELAB_PG_BIN to the directory that holds them"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:`port` (connections of a server that just
    stopped, in TIME_WAIT, do not count: servers bind with SO_REUSEADDR, as here)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Database:
    """One PostgreSQL cluster in `pgdata`, served on 127.0.0.1:`port`."""

    bins: Binaries
    pgdata: Path
    log: Path
    port: int = 0

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI MLflow's server stores its runs in (psycopg 3 driver)."""
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{DATABASE}"

    def create(self) -> None:
        """initdb, unless `pgdata` already holds a cluster of this major version."""
        version_file = self.pgdata / "PG_VERSION"
        if version_file.is_file():
            made_by = version_file.read_text().strip()
            if made_by != self.bins.version:
                raise ServerError(
                    f"{self.pgdata} holds a PostgreSQL {made_by} cluster but these binaries are "
                    f"version {self.bins.version} ({self.bins.bin_dir}): use a new --dir, or "
                    f"point TUNELAB_PG_BIN at PostgreSQL {made_by}'s binaries"
                )
            return
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)  # initdb insists
        self._own(self.pgdata)
        if os.geteuid() == 0 and _run(
            ["runuser", "-u", PG_USER, "--", "test", "-w", str(self.pgdata)]
        ):
            raise ServerError(
                f"PostgreSQL runs as user {PG_USER!r} (it refuses root), and that user cannot "
                f"reach {self.pgdata}: a directory above it is closed to other users. Choose a "
                "--dir it can reach, e.g. --dir /var/tmp/tunelab-server"
            )
        args = ["-D", str(self.pgdata), "-U", PG_USER, "-A", "trust", "-E", "UTF8", "--locale=C"]
        failed = _run(self.bins.cmd("initdb", *args), cwd=self.pgdata)
        if failed:
            raise ServerError(f"initdb {self.pgdata} failed: {failed}")
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write(PG_CONF)

    def start(self) -> None:
        """Start the cluster on `port` (a free one when 0), after clearing what a killed
        PostgreSQL left behind; returns once it accepts connections."""
        self.clear_leftovers()
        self.port = self.port or free_port()
        if not self.log.exists():
            self.log.touch()
        self._own(self.log)
        start_at = self.log.stat().st_size
        args = ["-D", str(self.pgdata), "-l", str(self.log), "-o", f"-p {self.port}"]
        failed = _run(self.bins.cmd("pg_ctl", *args, "-w", "-t", "60", "start"), cwd=self.pgdata)
        if failed:
            raise ServerError(
                f"PostgreSQL did not start: {_last_error(self.log, start_at) or failed}"
            )

    def ensure_database(self) -> None:
        """Create the `mlflow` database once (MLflow's server creates its tables in it)."""
        import psycopg

        try:
            with psycopg.connect(
                host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres",
                autocommit=True, connect_timeout=10,
            ) as conn:  # fmt: skip
                found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if found.fetchone() is None:
                    conn.execute(f'CREATE DATABASE "{DATABASE}"')
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ServerError(f"cannot create the {DATABASE!r} database: {first}") from None

    def pid(self) -> int | None:
        """The pid of this cluster's running postmaster, or None when it is not running: the
        pid in postmaster.pid counts only if that process is a postgres working in `pgdata`
        (a pid reused by another process after a crash is not taken for it)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if pid in self._processes() else None

    def stop(self, mode: str = "fast") -> None:
        if self.pid() is not None:
            _run(self.bins.cmd("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop"))

    def clear_leftovers(self) -> None:
        """A postmaster still running from an earlier start (its supervisor was killed) is
        stopped; a postmaster.pid whose process is gone (kill -9, power cut) is removed, once
        no process of the old cluster is left."""
        if self.pid() is not None:
            self.stop()
        deadline = time.monotonic() + 15
        while self._processes() and time.monotonic() < deadline:
            time.sleep(0.2)  # a killed postmaster's backends notice and exit
        left = self._processes()
        if left:
            raise ServerError(
                f"processes of the old PostgreSQL in {self.pgdata} are still running "
                f"(pids {', '.join(map(str, sorted(left)))}); stop them and start again"
            )
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)

    def _processes(self) -> set[int]:
        """Pids of the processes working in `pgdata` (postgres changes into its data dir)."""
        import psutil

        found = set()
        for proc in psutil.process_iter(["name"]):
            try:
                if proc.info["name"] == "postgres" and Path(proc.cwd()) == self.pgdata:
                    found.add(proc.pid)
            except (psutil.Error, OSError):
                continue
        return found

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, PG_USER, PG_USER)


@dataclass
class Server:
    """A started team server: PostgreSQL, and `mlflow server` in a process group of its own."""

    state_dir: Path
    database: Database
    port: int
    proc: subprocess.Popen[bytes]
    lock: locks.Lock
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
            _stop_group(self.proc.pid)
            self.proc.wait()
            self.database.stop("fast")
            _write_state(self.state_dir, {"port": self.port})
        finally:
            self.lock.release()


def start(
    state_dir: str | Path = DEFAULT_DIR,
    port: int | None = None,
    workers: int = 2,
    bin_dir: str | Path | None = None,
    timeout: float = 180,
) -> Server:
    """Start PostgreSQL and `mlflow server` on it, both on 127.0.0.1, state in `state_dir`;
    return once the server answers /health. `port`: the server's port (default: the one this
    directory used last, when free, else a free one)."""
    bins = find_binaries(bin_dir)
    _require_driver()
    _require_pg_user()
    state = Path(state_dir).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    lock = _lock(state)
    database = Database(bins, state / "pgdata", state / "postgresql.log")
    proc = None
    try:
        _stop_leftover_mlflow(state)
        port = _choose_port(port, _read_state(state).get("port"))
        database.create()
        database.start()
        database.ensure_database()
        (state / "artifacts").mkdir(exist_ok=True)
        proc = _start_mlflow(state, database.uri, port, workers)
        server = Server(state, database, port, proc, lock)
        _write_state(state, {"port": port, "pid": os.getpid(), "mlflow_pid": proc.pid,
                             "postgres_port": database.port, "url": server.url})  # fmt: skip
        _wait_healthy(server, timeout)
        return server
    except BaseException:
        if proc is not None:
            _stop_group(proc.pid)
            proc.wait()
        database.stop("fast")
        lock.release()
        raise


def serve(state_dir: str | Path = DEFAULT_DIR, port: int | None = None, workers: int = 2) -> int:
    """Run the server in the foreground until Ctrl-C or SIGTERM (exit status 0), or until
    MLflow or PostgreSQL stops by itself (1)."""

    def stop_on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        server = start(state_dir, port, workers)
    except KeyboardInterrupt:  # start() stopped what it had started
        signal.signal(signal.SIGTERM, previous)
        print("tunelab server: interrupted while starting; stopped", file=sys.stderr)
        return 130
    state = server.state_dir
    print(
        f"tunelab server: MLflow at {server.url} on PostgreSQL {server.database.bins.version} "
        f"(127.0.0.1:{server.database.port}), artifacts proxied into {state / 'artifacts'}\n"
        f"  tunelab train tracking.uri={server.url}      "
        f"(or export MLFLOW_TRACKING_URI={server.url})\n"
        f"  logs: {state / 'mlflow.log'}, {state / 'postgresql.log'}; Ctrl-C stops both",
        flush=True,
    )
    why = None
    try:
        while why is None:
            time.sleep(1)
            if server.proc.poll() is not None:
                last = _last_error(state / "mlflow.log")
                why = (
                    f"the MLflow server exited ({server.proc.returncode}): {last or 'see the log'}"
                )
            elif server.database.pid() is None:
                last = _last_error(server.database.log)
                why = f"PostgreSQL stopped: {last or 'see the log'}; stopping MLflow too"
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C or SIGTERM must not cut the stop short (PostgreSQL left running).
        before_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            server.stop()
        finally:
            signal.signal(signal.SIGINT, before_int)
            signal.signal(signal.SIGTERM, previous)
    if why:
        print(f"tunelab server: {why}. `make server` starts both again.", file=sys.stderr)
        return 1
    print("tunelab server: stopped", flush=True)
    return 0


def main(args: list[str]) -> None:
    """`tunelab server [--dir DIR] [--port N] [--workers N]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="tunelab server",
        description="An MLflow tracking server on PostgreSQL, with proxied artifacts, on "
        "127.0.0.1, in the foreground (Ctrl-C stops it). Point runs at it with "
        "tracking.uri=http://127.0.0.1:PORT.",
    )
    parser.add_argument(
        "--dir", default=DEFAULT_DIR, help=f"state directory (default: ./{DEFAULT_DIR})"
    )
    port_help = "the server's port (default: the one DIR used last, else a free one)"
    parser.add_argument("--port", type=int, default=None, help=port_help)
    parser.add_argument("--workers", type=int, default=2, help="MLflow server workers (default 2)")
    opts = parser.parse_args(args)
    if opts.port is not None and not 1 <= opts.port <= 65535:
        parser.error(f"argument --port: {opts.port} is not a port (1 to 65535)")
    if opts.workers < 1:
        parser.error(f"argument --workers: {opts.workers} must be at least 1")
    raise SystemExit(serve(opts.dir, opts.port, opts.workers))


# ---------------------------------------------------------------------------------------------


def _require_driver() -> None:
    import importlib.util

    if importlib.util.find_spec("psycopg") is None:
        raise ServerError(
            "the PostgreSQL driver psycopg is not installed: pip install 'tunelab[server]' "
            "(make install includes it)"
        )


def _require_pg_user() -> None:
    import pwd

    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        raise ServerError(
            f"PostgreSQL refuses to run as root, and there is no {PG_USER!r} user to run it as: "
            f"{INSTALL_HINT} (it creates one), or run as a normal user"
        ) from None


def _lock(state: Path) -> locks.Lock:
    """Hold the state directory's lock, or say where the server that holds it serves."""
    try:
        return locks.Lock(state / "server.lock", f"server directory {state}").acquire()
    except locks.Busy:
        holder = (state / "server.lock").read_text().strip() or "?"
        known = _read_state(state)
        if str(known.get("pid")) != holder:  # server.json is an earlier start's: still starting
            raise ServerError(
                f"a tunelab server is starting from {state} (pid {holder}); wait for it to say "
                "where it serves, or stop it"
            ) from None
        raise ServerError(
            f"a tunelab server already runs from {state} (pid {holder}): use "
            f"tracking.uri={known['url']}, or stop it (Ctrl-C in its terminal, or kill {holder})"
        ) from None


def _choose_port(asked: int | None, last: int | None) -> int:
    """The port asked for (checked free before anything was created), else the one this
    directory used last when it is free (the URL the team wrote down keeps working). Checked
    after the server a killed supervisor left behind is stopped: it may hold that port."""
    if asked:
        if not port_is_free(asked):
            raise ServerError(
                f"port {asked} on 127.0.0.1 is taken; choose another --port, or leave it out "
                "to take a free one"
            )
        return asked
    return last if last and port_is_free(last) else free_port()


def _start_mlflow(state: Path, db_uri: str, port: int, workers: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db_uri,
           "--artifacts-destination", str(state / "artifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]  # fmt: skip
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(state / "mlflow.log", "ab") as log:
        # A session of its own: stopping it stops uvicorn and its workers too.
        return subprocess.Popen(
            cmd, cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_healthy(server: Server, timeout: float) -> None:
    log = server.state_dir / "mlflow.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerError(
                f"the MLflow server exited ({server.proc.returncode}) while starting: "
                f"{_last_error(log) or f'see {log}'}"
            )
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise ServerError(
        f"the MLflow server did not answer on {server.url} in {timeout:.0f} s: see {log}"
    )


def _stop_leftover_mlflow(state: Path) -> None:
    """The MLflow server of an earlier start whose supervisor was killed (kill -9) still holds
    the port: stop it, so this start can serve on the same port."""
    import psutil

    pid = _read_state(state).get("mlflow_pid")
    if not pid:
        return
    try:
        proc = psutil.Process(pid)
        ours = "mlflow" in " ".join(proc.cmdline()) and os.getpgid(pid) == pid
    except (psutil.Error, OSError):
        return
    if ours:
        _stop_group(pid)


def _stop_group(pgid: int, grace: float = 20) -> None:
    """SIGTERM to a process group, then SIGKILL to what is left after `grace` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, ended but not yet reaped by their
    parent, do not count: kill(-pgid, 0) would)."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, OSError):
            continue
    return False


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    """Run `cmd`; None when it succeeds, else its last line of output (or why it could not
    start)."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr + proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _last_error(log: Path, offset: int = 0) -> str | None:
    """The last line of `log` (from `offset`) that reports an error, if any."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    marks = ("FATAL", "ERROR", "Error", "error:", "PANIC")
    found = [ln.strip() for ln in lines if any(m in ln for m in marks)]
    return found[-1] if found else None


def _read_state(state: Path) -> dict[str, Any]:
    return artifacts.read_json(state / "server.json")


def _write_state(state: Path, values: dict[str, Any]) -> None:
    artifacts.write_json(state / "server.json", values)
