"""What a run records beside Trainer's logs, through any `Tracker`: its tags (overrides, git
commit, versions, who runs it), what went in (data, model size), how many processes trained,
and its objective."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab import provenance
from tunelab.tracking.liveness import process_tags
from tunelab.tracking.tracker import Tracker


def run_tags(
    run_dir: Path,
    overrides: list[str],
    resumed_from: Path | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    git = provenance.git_state()
    tags = {
        "mlflow.source.name": "tunelab train",
        "mlflow.source.type": "LOCAL",
        "tunelab.overrides": " ".join(overrides) if overrides else "(none)",
        "tunelab.run_dir": str(Path(run_dir).resolve()),
        "tunelab.version": provenance.versions().get("tunelab", "unknown"),
        "tunelab.versions": ", ".join(f"{k} {v}" for k, v in provenance.versions().items()),
        **process_tags(),
        **(extra or {}),
    }
    if resumed_from:
        tags["tunelab.resumed_from"] = str(resumed_from)
    if git["commit"]:
        tags["mlflow.source.git.commit"] = git["commit"]
        tags["tunelab.git_dirty"] = str(git["dirty"]).lower()
    return tags


def log_inputs(
    tracker: Tracker, rows: Any, base: str, params: int, trainable: int, train_tokens: int
) -> None:
    """What went in: a one-line description, the datasets, and model and data sizes as params
    (not again for a resumed run, whose params are already there)."""
    tracker.describe(
        f"{base} ({params / 1e6:.2f}M params) on {rows.source}: "
        f"{len(rows.train)} train / {len(rows.eval)} eval rows"
    )
    if tracker.continued:
        return
    for split in ("train", "eval"):
        if getattr(rows, split):
            source = rows.split_sources.get(split, rows.source)
            n_rows = len(getattr(rows, split))
            tracker.log_dataset(
                f"{rows.name}-{split}", rows.split_digest(split), source, split, n_rows
            )
    tracker.log_params(
        {
            "model.parameters": str(params),
            "model.trainable_parameters": str(trainable),
            "data.train_examples": str(len(rows.train)),
            "data.eval_examples": str(len(rows.eval)),
            "data.train_tokens": str(train_tokens),
        }
    )


def log_processes(tracker: Tracker, params: dict[str, Any]) -> None:
    """How many processes trained, the global batch size and the backend, as params; a resume
    (its params are set) notes the processes it ran with as a tag, as a resume may change them."""
    if tracker.continued:
        tracker.set_tags({"tunelab.resumed_with." + k: str(v) for k, v in params.items()})
    else:
        tracker.log_params({k: str(v) for k, v in params.items()})


def log_outcome(tracker: Tracker, objective: str, direction: str) -> None:
    tracker.set_tags({"tunelab.objective": objective, "tunelab.objective_direction": direction})
