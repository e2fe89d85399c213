"""The story of one run: agree, hold the run directory, see where it starts, prepare the data,
open the MLflow run, build the model and the Trainer, train, publish. Each step is a stage of
`tunelab.stages` (or `startpoint`) with explicit inputs and outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tunelab import config, distributed, locks, startpoint, tracking
from tunelab.sweeps.study import TrialRef


def run(
    cfg: DictConfig,
    run_dir: str | Path,
    overrides: list[str],
    tags: dict[str, str] | None = None,
    name: str | None = None,
    callbacks: Sequence[Any] = (),
    trial: TrialRef | None = None,
) -> RunResult:
    """Train one model as the validated `cfg` says, continuing from the run directory's newest
    valid checkpoint when there is one; write its artifact to `run_dir/model`; track it.
    `callbacks`: extra Trainer callbacks; `trial`: the Optuna trial this run is (it reports to
    it, and raises errors.TrialPruned when pruned, its checkpoint written). One process at a
    time per run directory: another is refused at once (errors.Busy). Under torchrun every
    rank runs this."""
    # The one import of tunelab's own inside a function here: the stages import the Trainer and
    # its callbacks (transformers), so they load when a run starts, never for the CLI's answers.
    from tunelab import stages

    run_dir, tags = Path(run_dir), tags or {}
    name = name or config.display_name(overrides, cfg.get("name"))
    resolved = config.resolved(cfg)
    distributed.same_config(resolved, run_dir)  # every rank trains the same thing, or none does
    with _held(run_dir):
        start = startpoint.decide(cfg, run_dir, resolved)
        if start.finished:
            tags = tracking.run_tags(run_dir, overrides, extra=tags)
            done = startpoint.finish_upload(cfg, run_dir, name, tags, resolved, overrides)
            return RunResult(run_dir, run_dir / "model", done.metrics, done.run_id,
                             objective=done.objective, already_finished=True)  # fmt: skip
        inputs = stages.prepare(cfg, start)
        with (
            stages.StopOnSignal() as stopper,
            stages.tracked_run(
                cfg, run_dir, name, overrides, resolved, tags, start, inputs, stopper
            ) as tracked,
        ):
            model = stages.build_model(cfg, inputs, tracked.tracker)
            trainer = stages.build_trainer(
                cfg, run_dir, model, inputs, tracked.tracker,
                [stopper, *stages.stop_callbacks(cfg, inputs, trial), *callbacks],
            )  # fmt: skip
            final = stages.train(trainer, start, stopper)
            published = stages.publish(cfg, run_dir, name, overrides, resolved, start, inputs,
                                       model, trainer, final, tracked)  # fmt: skip
    return RunResult(
        run_dir=run_dir,
        artifact_dir=published.artifact,
        metrics=final,
        run_id=tracked.run_id,
        ui_hint=tracked.tracker.ui_hint or _upload_hint(cfg),
        objective=published.value,
        early_stopping=published.early_stopping,
        model_uri=published.model_uri,
    )


@contextlib.contextmanager
def _held(run_dir: Path) -> Iterator[None]:
    """Rank 0 holds the run directory's lock for the run's life (another process training
    there is refused: errors.Busy); the other ranks go on only once it holds it, and stop at
    once when it could not take it."""
    lock = locks.run_dir(run_dir)
    distributed.decided_by_rank_zero("lock", lambda: (lock.acquire(), "held")[1])
    try:
        yield
    finally:
        lock.release()  # nothing to release on the ranks that never took it


@dataclass
class RunResult:
    run_dir: Path
    artifact_dir: Path
    metrics: dict[str, float]
    run_id: str | None = None
    ui_hint: str | None = None
    objective: float | None = None
    already_finished: bool = False  # nothing was trained: the run directory held the artifact
    early_stopping: dict[str, Any] | None = None  # what the manifest says of it
    model_uri: str | None = None  # the Logged Model: what `tunelab serve` and mlflow serve take

    def summary(self) -> str:
        shown = {
            k: v
            for k, v in self.metrics.items()
            if k.startswith(("eval_", "train_loss"))
            and not k.endswith(("_runtime", "_second", "_preparation_time"))
        }
        lines = [
            "tunelab: run finished",
            f"  run id   : {self.run_id or '(not tracked)'}",
            f"  artifact : {self.artifact_dir}",
            "  metrics  : " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())),
        ]
        early = self.early_stopping
        if early:
            stopped = early["stopped_at_step"]
            how = f"stopped at step {stopped}" if stopped is not None else "ran to its end"
            lines.append(
                f"  early stop: {how}; the artifact is step "
                f"{early.get('weights_step', early['best_step'])}'s model (best "
                f"{early['metric']}={early['best_value']:.4g} at step {early['best_step']})"
            )
        if self.model_uri:
            lines.append(f"  model    : {self.model_uri}  (serve it: tunelab serve {self.run_id})")
        if self.ui_hint:
            lines.append(f"  MLflow UI: {self.ui_hint}")
        return "\n".join(lines)


def _upload_hint(cfg: DictConfig) -> str | None:
    if cfg.tracking.backend == "none":
        return None
    return "not uploaded (the store was unreachable): run the same command again to upload it"
