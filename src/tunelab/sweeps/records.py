"""The files a sweep keeps on disk: `sweep.json` in its directory (the parent run), and beside
a job that failed, why (counted on the parent even when the job never had an MLflow run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab import files

SWEEP_RECORD = "sweep.json"
FAILURE = "tunelab_failed.json"  # in a job's directory: why the job failed, until it succeeds


def parent_run_id(sweep_dir: str | Path) -> str | None:
    return files.read_json(Path(sweep_dir) / SWEEP_RECORD).get("parent_run_id")


def write_record(sweep_dir: Path, record: dict[str, Any]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(sweep_dir / SWEEP_RECORD, record)


def record_failure(job_dir: Path, name: str, why: str) -> None:
    """Note beside the job why it failed: counted on the parent even when the job failed
    before its own MLflow run existed (bad data, a model that does not load)."""
    files.write_json(Path(job_dir) / FAILURE, {"name": name, "error": why})


def clear_failure(job_dir: Path) -> None:
    (Path(job_dir) / FAILURE).unlink(missing_ok=True)


def failures(sweep_dir: Path) -> list[dict[str, str]]:
    found = [files.read_json(p) for p in sorted(Path(sweep_dir).glob(f"*/{FAILURE}"))]
    return [f for f in found if f]
