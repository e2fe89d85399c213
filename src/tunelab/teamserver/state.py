"""The team server's state directory: held by one server at a time (`server.lock`), and the
ports and processes of its last start (`server.json`), so the port, and the URL the team wrote
down, is kept from one start to the next."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab import files, locks
from tunelab.errors import ServerError
from tunelab.teamserver.processes import free_port, port_is_free

DEFAULT_DIR = ".tunelab-server"


def hold(state: Path) -> locks.Lock:
    """Hold the state directory's lock, or say where the server that holds it serves."""
    try:
        return locks.Lock(state / "server.lock", f"server directory {state}").acquire()
    except locks.Busy:
        holder = (state / "server.lock").read_text().strip() or "?"
        known = read_state(state)
        if str(known.get("pid")) != holder:  # server.json is an earlier start's: still starting
            raise ServerError(
                f"a tunelab server is starting from {state} (pid {holder}); wait for it to say "
                "where it serves, or stop it"
            ) from None
        raise ServerError(
            f"a tunelab server already runs from {state} (pid {holder}): use "
            f"tracking.uri={known['url']}, or stop it (Ctrl-C in its terminal, or kill {holder})"
        ) from None


def release(lock: locks.Lock) -> None:
    """Let go of the state directory's lock, and remove its file while still holding it (safe
    then: locks.Lock), so a stopped or refused server leaves no lock file behind."""
    lock.path.unlink(missing_ok=True)
    lock.release()


def choose_port(asked: int | None, last: int | None) -> int:
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


def read_state(state: Path) -> dict[str, Any]:
    return files.read_json(state / "server.json")


def write_state(state: Path, values: dict[str, Any]) -> None:
    files.write_json(state / "server.json", values)
