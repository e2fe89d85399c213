"""The operating system's side of the team server: free ports on 127.0.0.1, a command's last
line of output, the last error in a log, and stopping a process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


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


def run_command(cmd: list[str], cwd: Path | None = None) -> str | None:
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


def last_error(log: Path, offset: int = 0) -> str | None:
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


def stop_group(pgid: int, grace: float = 20) -> None:
    """SIGTERM to a process group, then SIGKILL to what is left after `grace` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
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
