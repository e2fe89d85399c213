"""The machine's metrics during a run (CPU, memory, disk, network, and GPU when pynvml finds
one), sampled by MLflow's monitor in a thread of its own."""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("tunelab")


def start_monitor(run_id: str, uri: str, resume: bool) -> Any:
    """MLflow's monitor for run `run_id`, sampling every 5 s; `resume`: the run's earlier
    process logged samples already (its steps go on from there)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=5, resume_logging=resume, tracking_uri=uri
    )
    sample(monitor)  # the sampler's first tick is after 5 s: a short run needs one now
    monitor.start()
    return monitor


def finish_monitor(monitor: Any) -> None:
    """Stop the sampler, with one last sample however short the run was."""
    monitor.finish()
    sample(monitor)


def abandon_monitor(monitor: Any) -> None:
    """The store is lost: the sampler thread stops at its next tick, logging nothing more."""
    getattr(monitor, "_shutdown_event", threading.Event()).set()


def sample(monitor: Any) -> None:
    """One system-metrics sample, logged at once."""
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as exc:  # a metric source failing must not fail the run
        log.debug("system metrics sample failed: %s", exc)
