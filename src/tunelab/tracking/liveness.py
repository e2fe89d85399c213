"""Who runs a run, and repairing the RUNNING runs whose process is gone (kill -9, power cut),
so a run never stays RUNNING in the UI."""

from __future__ import annotations

import socket
from typing import Any


def process_tags() -> dict[str, str]:
    """Who is running this run, so a later start can tell whether it is still alive."""
    import psutil

    me = psutil.Process()
    return {
        "tunelab.host": socket.gethostname(),
        "tunelab.pid": str(me.pid),
        "tunelab.pid_started": f"{me.create_time():.3f}",
    }


def repair_stale(client: Any, experiment_id: str, keep: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment whose process (on this host) is gone.
    Returns their ids."""
    stale = []
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=500
    )
    for run in running:
        if run.info.run_id != keep and process_gone(run.data.tags):
            why = "its process ended without reporting (killed?)"
            client.set_tag(run.info.run_id, "tunelab.error", why)
            client.set_terminated(run.info.run_id, "KILLED")
            stale.append(run.info.run_id)
    return stale


def process_gone(tags: dict[str, str]) -> bool:
    """True only when the run's process is known to be gone: same host, and no process with
    that pid and start time (a reused pid is not mistaken for the run's)."""
    import psutil

    if tags.get("tunelab.host") != socket.gethostname() or "tunelab.pid" not in tags:
        return False
    try:
        started = psutil.Process(int(tags["tunelab.pid"])).create_time()
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, ValueError):
        return False
    return abs(started - float(tags.get("tunelab.pid_started", started))) > 1.0
