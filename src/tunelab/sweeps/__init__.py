"""Sweeps: one MLflow parent run per multirun, one child run per job, the best job on the parent.

records   the sweep's files on disk (its parent run, the failed jobs' notes)
jobs      the job running now: its objective, its tags under the parent, its failure
parent    the parent run around a multirun (Hydra's callback), the summary, `runs --sweep`
study     the Optuna study that the workers of one search share (claims, heartbeats)
pruning   a trial's job reporting to its study and stopping when pruned (loads transformers)
"""

from tunelab.sweeps.jobs import (
    Job,
    current_job,
    direction,
    job_failed,
    job_released,
    objective_name,
)
from tunelab.sweeps.parent import (
    REGISTERED,
    SweepCallback,
    failed_jobs,
    find_parent,
    forget_failures,
    summary,
    unranked_objective,
    unrecorded_end,
)
from tunelab.sweeps.records import parent_run_id

__all__ = [
    "REGISTERED",
    "Job",
    "SweepCallback",
    "current_job",
    "direction",
    "failed_jobs",
    "find_parent",
    "forget_failures",
    "job_failed",
    "job_released",
    "objective_name",
    "parent_run_id",
    "summary",
    "unranked_objective",
    "unrecorded_end",
]
