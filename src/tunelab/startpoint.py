"""Where a run starts: fresh, from a checkpoint of its run directory, or already finished.

Decided by rank 0 alone and handed to the other ranks: only the holder of the run directory's
lock reads, cleans up, verifies or sets aside anything in it. A resume must train on what the
run started from: a run directory of another config, or data or a base model replaced since the
run started, is refused in one line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tunelab import (
    artifacts,
    checkpoints,
    config,
    distributed,
    manifests,
    metrics,
    provenance,
    tracking,
)
from tunelab.errors import ConfigError

log = logging.getLogger("tunelab")


@dataclass(frozen=True)
class Start:
    """The run record as found (with this config's digest), whether the run directory already
    holds the finished artifact, and the checkpoint to resume from (None: from scratch)."""

    record: dict[str, Any]
    finished: bool
    resume_from: Path | None


def decide(cfg: DictConfig, run_dir: Path, resolved: dict[str, Any]) -> Start:
    """Rank 0 looks at the run directory; every rank gets its verdict (or stops with it)."""

    def look() -> str:
        record = _claim(run_dir, resolved)  # before anything else: never mix two configs' runs
        finished = cfg.resume == "auto" and manifests.is_complete(run_dir / "model")
        resume_from = (
            None if finished else checkpoints.resume_point(cfg.resume, run_dir / "checkpoints")
        )
        found = {"record": record, "finished": finished, "resume": resume_from}
        return json.dumps(found, default=str)

    found = json.loads(distributed.decided_by_rank_zero("start", look))
    resume = found["resume"]
    start = Start(found["record"], found["finished"], Path(resume) if resume else None)
    if not start.finished:
        distributed.note_resume(start.resume_from)
    return start


def _claim(run_dir: Path, resolved: dict[str, Any]) -> dict[str, Any]:
    """The run record of `run_dir`, refusing a directory that holds a run of another config
    (conf files edited since the same command last ran there)."""
    digest = config.digest(resolved)
    record = artifacts.read_run_record(run_dir)
    if record.get("fingerprint") not in (None, digest) and resolved["resume"] == "auto":
        raise ConfigError(
            [
                f"resume: {run_dir} holds a run of a different config (were conf files edited?); "
                "rerun with resume=never to start afresh, or restore the config"
            ]
        )
    return {**record, "fingerprint": digest}


def same_inputs(start: Start, data_digest: str, source: str | None) -> dict[str, Any]:
    """The digests of the run's data and base model, to keep in its record; a resume whose data
    or base changed since the run started is refused (a ConfigError on every rank: rank 0 reads
    the base's weights, once)."""

    def compare() -> str:
        now = {"data_digest": data_digest, "base_digest": provenance.base_digest(source)}
        what = {"data_digest": "the data", "base_digest": "the base model's weights"}
        record = start.record
        changed = [k for k in now if start.resume_from and k in record and record[k] != now[k]]
        if changed:
            k = changed[0]
            raise ConfigError(
                [
                    f"resume: {what[k]} changed since this run started (digest "
                    f"{str(record[k])[:16]} then, {str(now[k])[:16]} now): resuming would train "
                    "one model on both; restore them, or rerun with resume=never to start afresh"
                ]
            )
        return json.dumps(now)

    found = json.loads(distributed.decided_by_rank_zero("inputs", compare))
    assert isinstance(found, dict)
    return found


@dataclass(frozen=True)
class Finished:
    """A run directory that already held its artifact: what it says of the run."""

    run_id: str | None
    metrics: dict[str, float]
    objective: float | None


def finish_upload(
    cfg: DictConfig,
    run_dir: Path,
    name: str,
    tags: dict[str, str],
    resolved: dict[str, Any],
    overrides: list[str],
) -> Finished:
    """A finished run directory: uploaded now if it was killed after its artifact was committed
    but before MLflow heard of it, or trained while the store was down (rank 0 alone)."""
    manifest = manifests.read_manifest(run_dir / "model")
    record = artifacts.read_run_record(run_dir)
    log.info("already finished: %s", run_dir / "model")
    if not distributed.is_main():  # rank 0 uploads and says so
        return Finished(None, {}, None)
    run_id = record.get("mlflow_run_id") or manifest.get("mlflow_run_id")
    run_id = tracking.complete_upload(cfg, run_dir, run_id, name, tags, resolved, overrides)
    if run_id and run_id != record.get("mlflow_run_id"):
        artifacts.write_run_record(run_dir, {**record, "mlflow_run_id": run_id})
    print(
        f"tunelab: this run already finished (run id {run_id}, artifact "
        f"{run_dir / 'model'}); nothing to do. Use resume=never to train it again."
    )
    final = manifest.get("metrics", {})
    # The manifest does not say whether the rows had completions: the objective it recorded.
    objective = cfg.sweep.objective or metrics.default_objective(cfg.model.task, True, final)
    return Finished(run_id, final, final.get(objective))
