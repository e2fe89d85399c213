"""`tunelab server` (`make server`): the team server in the foreground until Ctrl-C or SIGTERM
(MLflow stopped, then PostgreSQL), or until either stops by itself."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

from tunelab.teamserver.credentials import LOGIN_FILE, SECRETS
from tunelab.teamserver.processes import last_error
from tunelab.teamserver.roles import MLFLOW_ROLE
from tunelab.teamserver.server import Server, start_server
from tunelab.teamserver.state import DEFAULT_DIR


def serve(
    state_dir: str | Path = DEFAULT_DIR,
    port: int | None = None,
    workers: int = 2,
    auth: bool | None = None,
) -> int:
    """Run the server in the foreground until Ctrl-C or SIGTERM (exit status 0), or until
    MLflow or PostgreSQL stops by itself (1)."""

    def stop_on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        server = start_server(state_dir, port, workers, auth=auth)
    except KeyboardInterrupt:  # start_server() stopped what it had started
        signal.signal(signal.SIGTERM, previous)
        print("tunelab server: interrupted while starting; stopped", file=sys.stderr)
        return 130
    _announce(server)
    why = None
    try:
        while why is None:
            time.sleep(1)
            why = _stopped_by_itself(server)
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


def _announce(server: Server) -> None:
    """Where it serves, how runs reach it, where its logs and passwords are."""
    state = server.state_dir
    print(
        f"tunelab server: MLflow at {server.url} on PostgreSQL {server.database.bins.version} "
        f"(127.0.0.1:{server.database.port}), artifacts proxied into {state / 'artifacts'}\n"
        f"  tunelab train tracking.uri={server.url}      "
        f"(or export MLFLOW_TRACKING_URI={server.url})\n"
        f"  logs: {state / 'mlflow.log'}, {state / 'postgresql.log'}; Ctrl-C stops both\n"
        f"  PostgreSQL's passwords: {server.database.passfile} (0600; MLflow connects as "
        f"{MLFLOW_ROLE!r}, not as a superuser)\n"
        + (
            f"  MLflow login on: {server.login} (0600) holds the admin's "
            f"MLFLOW_TRACKING_USERNAME/PASSWORD; `. {server.login}` before tunelab train/runs"
            if server.login
            else "  MLflow login off: any local user can read and write runs through the port "
            "(--auth turns MLflow's login on)"
        ),
        flush=True,
    )
    if server.database.migrated:
        print(
            f"tunelab server: {server.database.pgdata} trusted every local connection; it now "
            f"needs a password (in {server.database.passfile}), and MLflow's database belongs "
            f"to the role {MLFLOW_ROLE!r}",
            flush=True,
        )


def _stopped_by_itself(server: Server) -> str | None:
    """Why MLflow or PostgreSQL is no longer running, or None while both are."""
    if server.proc.poll() is not None:
        last = last_error(server.state_dir / "mlflow.log")
        return f"the MLflow server exited ({server.proc.returncode}): {last or 'see the log'}"
    if server.database.pid() is None:
        last = last_error(server.database.log)
        return f"PostgreSQL stopped: {last or 'see the log'}; stopping MLflow too"
    return None


def main(args: list[str]) -> None:
    """`tunelab server [--dir DIR] [--port N] [--workers N] [--auth | --no-auth]`."""
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
    parser.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"MLflow's login (basic-auth app): credentials generated into "
        f"DIR/{SECRETS}/{LOGIN_FILE}; clients set MLFLOW_TRACKING_USERNAME/PASSWORD from it. "
        "A DIR started with --auth keeps it on later starts; --no-auth: this start without",
    )
    opts = parser.parse_args(args)
    if opts.port is not None and not 1 <= opts.port <= 65535:
        parser.error(f"argument --port: {opts.port} is not a port (1 to 65535)")
    if opts.workers < 1:
        parser.error(f"argument --workers: {opts.workers} must be at least 1")
    raise SystemExit(serve(opts.dir, opts.port, opts.workers, opts.auth))
