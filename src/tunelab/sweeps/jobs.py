"""The Hydra job running now, as tunelab runs it: its objective, its place in the sweep, and
what happens when it fails or ends."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab import config
from tunelab import metrics as tunelab_metrics
from tunelab.constants import OPTUNA_SWEEPER
from tunelab.sweeps.records import clear_failure, parent_run_id, record_failure
from tunelab.sweeps.study import TrialRef, storage_url

log = logging.getLogger("tunelab")


def objective_name(cfg: Any, metrics: dict[str, float], has_completions: bool) -> str:
    """`sweep.objective`, else the task's default objective among the run's `metrics`."""
    if cfg.sweep.objective:
        return str(cfg.sweep.objective)
    return tunelab_metrics.default_objective(cfg.model.task, has_completions, metrics)


def direction(cfg: Any, objective: str) -> str:
    """minimize or maximize: `sweep.direction`, else what the objective's name says."""
    return tunelab_metrics.optuna_direction(objective, cfg.sweep.direction)


@dataclass
class Job:
    """The Hydra job running now, as tunelab runs it: its directory and overrides; in a
    multirun its number, its name (what sets it apart from its siblings) and the tags that hang
    its MLflow run under the sweep's parent; under tunelab's Optuna sweeper, its trial (whose
    number is the job's)."""

    run_dir: Path
    overrides: list[str]
    in_sweep: bool = False
    num: int = 0
    name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    trial: TrialRef | None = None


def current_job(given_name: str | None = None) -> Job:
    """The job Hydra is running (a single run, or a sweep's job, whose earlier failure note is
    cleared: it is tried again); `given_name`: the config's `name`, if set."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    job = Job(Path(hc.runtime.output_dir), list(hc.overrides.task))
    if hc.mode != RunMode.MULTIRUN:
        job.name = config.display_name(job.overrides, given_name)
        return job
    job.in_sweep, job.num = True, int(hc.job.num)
    job.name = config.job_display_name(hc.overrides.task, given_name)
    job.tags = {"tunelab.sweep_id": Path(hc.sweep.dir).name, "tunelab.job_num": str(hc.job.num)}
    parent = parent_run_id(hc.sweep.dir)
    if parent:
        job.tags["mlflow.parentRunId"] = parent
    sweeper = hc.sweeper
    if str(sweeper.get("_target_", "")) == OPTUNA_SWEEPER:
        pruning = dict(sweeper.get("pruning") or {})
        job.trial = TrialRef(
            url=storage_url(sweeper.storage, Path(hc.sweep.dir)),
            study_name=str(sweeper.study_name),
            number=job.num,
            pruner=str(sweeper.get("pruner", "none")),
            settings=pruning,
            metric=str(pruning.get("metric") or "eval_loss"),
        )
        job.tags["tunelab.trial_number"] = str(job.num)
    clear_failure(job.run_dir)
    return job


def job_failed(job: Job, why: str) -> None:
    """A sweep's job failed: said in one line, noted beside it and counted on the parent; the
    other jobs go on."""
    print(f"tunelab: job {job.num} ({job.name}) failed: {why}", file=sys.stderr)
    record_failure(job.run_dir, job.name or job.run_dir.name, why)


def job_released(job: Job) -> None:
    """After a job: its model and data released before the next job of a sequential sweep."""
    import gc

    gc.collect()
    if job.in_sweep:
        import psutil

        rss = psutil.Process().memory_info().rss / 2**20
        log.info("job %d released: process RSS %.1f MiB", job.num, rss)
