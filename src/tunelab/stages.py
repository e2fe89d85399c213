"""The stages of one run, each with explicit inputs and outputs (runner.run calls them in order;
the benchmarks and tests call the same ones instead of wiring a run by hand):

    prepare        data, base model directory, tokenizer, task: before any MLflow run exists
    tracked_run    the MLflow run (rank 0's, new or continued), ended FINISHED/FAILED/KILLED
    build_model    weights from the seed or the base, the adapter for peft=lora
    build_trainer  the checkpointing Trainer with tunelab's callbacks
    train          to max_steps, or to the checkpoint a signal (or a sweep's pruner) asked for
    publish        the artifact on disk, then its outcome and model in MLflow

This module subclasses nothing, but imports the modules that subclass transformers' classes
(the checkpointing Trainer, the signal and tracking callbacks): it is imported when a run
starts, never by the CLI's light paths.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tunelab import (
    adapters,
    artifacts,
    console,
    data,
    distributed,
    reports,
    startpoint,
    sweeps,
    tasks,
    testhooks,
    tracking,
)
from tunelab import model as models
from tunelab.arguments import training_arguments
from tunelab.checkpoints.signals import Interrupted, StopOnSignal
from tunelab.checkpoints.trainer import CheckpointingTrainer
from tunelab.early_stop import EarlyStopping
from tunelab.errors import ConfigError
from tunelab.sweeps.pruning import PruneCallback
from tunelab.sweeps.study import TrialRef
from tunelab.tracking.callback import TrackingCallback

log = logging.getLogger("tunelab")


@dataclass
class Inputs:
    """What a run trains on. `source`: the base model's local directory (None: built from
    config); `digests`: the data's and the base's, kept in the run record."""

    rows: data.Rows
    source: str | None
    tokenizer: Any
    task: ModuleType
    prepared: tasks.Prepared
    digests: dict[str, Any]


def prepare(cfg: DictConfig, start: startpoint.Start) -> Inputs:
    """Rows, base model, tokenizer and the task's tokenized splits, from the caches when they
    were prepared before. Bad data, or a model that cannot be loaded, stop here (a ConfigError),
    before an MLflow run exists; so does a resume whose data or base changed."""
    cache = Path(cfg.output.root) / ".cache" / "datasets"  # shared by resumes and sweep jobs
    rows = data.load(cfg.data, cache, workers=cfg.training.num_workers)
    source = tracking.resolve_model(
        cfg.model.name_or_path, cfg.tracking.uri, Path(cfg.output.root) / ".cache" / "models"
    )
    tokenizer = models.load_tokenizer(cfg.model, rows, source)
    task = tasks.get(cfg.model.task)
    prepared = task.prepare(rows, tokenizer, cfg.data)
    log.info("data: %d train / %d eval rows, %s", len(rows.train), len(rows.eval), rows.source)
    digests = startpoint.same_inputs(start, rows.digest, source)
    return Inputs(rows, source, tokenizer, task, prepared, digests)


@dataclass
class Tracked:
    """The run's tracker (rank 0's MLflow run; a NullTracker elsewhere) and its run id (rank
    0's, on every rank)."""

    tracker: tracking.Tracker
    run_id: str | None


@contextlib.contextmanager
def tracked_run(
    cfg: DictConfig,
    run_dir: Path,
    name: str,
    overrides: list[str],
    resolved: dict[str, Any],
    tags: dict[str, str],
    start: startpoint.Start,
    inputs: Inputs,
    stopper: StopOnSignal,
) -> Iterator[Tracked]:
    """The MLflow run, recorded in the run directory. From its creation the run ends FINISHED,
    FAILED or KILLED, whatever stops it; a signal while it is created takes effect once it is
    recorded (rank 0; the other ranks, waiting for rank 0's run id, stop at once: rank 0 may be
    gone)."""
    tags = tracking.run_tags(run_dir, overrides, start.resume_from, extra=tags)
    tags["tunelab.fingerprint"] = start.record["fingerprint"]  # a kill -9 orphan is found by it
    if inputs.prepared.truncated_rows:
        tags["tunelab.data.truncated_rows"] = str(inputs.prepared.truncated_rows)
    main = distributed.is_main()
    with contextlib.ExitStack() as recorded:
        with stopper.deferred() if main else contextlib.nullcontext():
            tracker: tracking.Tracker = tracking.NullTracker()

            def open_run() -> str:
                nonlocal tracker
                previous = start.record.get("mlflow_run_id")
                tracker = tracking.open_run(cfg, name, tags, resolved, overrides, previous)
                return tracker.run_id or ""

            run_id = distributed.decided_by_rank_zero("run-id", open_run) or None
            recorded.enter_context(tracking.recording(tracker, defer_signals=stopper.deferred))
            testhooks.pause("START")  # a test signals the process right here
            if main:
                record = {**start.record, **inputs.digests, "mlflow_run_id": tracker.run_id}
                artifacts.write_run_record(run_dir, record)
        stopper.raise_pending()
        yield Tracked(tracker, run_id)


@dataclass
class Model:
    """The model to train, and its parameter counts (all, trainable)."""

    module: Any
    parameters: int
    trainable: int
    base: str  # what it started from: the base's name or path, or "<type> from config"


def build_model(cfg: DictConfig, inputs: Inputs, tracker: tracking.Tracker) -> Model:
    """The weights (the seed decides new ones), with a LoRA adapter for peft=lora; their counts
    and the data go to the tracker."""
    from transformers import set_seed

    set_seed(cfg.seed)  # before the weights are initialised, so the seed decides them
    module = models.load_model(cfg.model, inputs.tokenizer, inputs.source, inputs.task, inputs.rows)
    module = adapters.apply_peft(module, cfg.peft, cfg.model.task)
    total, trainable = adapters.parameter_count(module)
    base = cfg.model.name_or_path or f"{cfg.model.arch.model_type} from config"
    tokens = inputs.prepared.train_tokens
    tracking.log_inputs(tracker, inputs.rows, base, total, trainable, tokens)
    return Model(module, total, trainable, base)


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    model: Model,
    inputs: Inputs,
    tracker: tracking.Tracker,
    callbacks: Sequence[Any] = (),
) -> CheckpointingTrainer:
    """The checkpointing Trainer of the run, tracked by `tracker`, with `callbacks` added."""
    task, prepared = inputs.task, inputs.prepared
    args = training_arguments(cfg, run_dir, has_eval=prepared.eval is not None)
    trainer = CheckpointingTrainer(
        model=model.module,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=task.collator(inputs.tokenizer),
        processing_class=inputs.tokenizer,
        compute_metrics=task.compute_metrics(inputs.rows),
        compute_loss_func=task.LOSS,
        preprocess_logits_for_metrics=task.preprocess_logits,
        callbacks=[TrackingCallback(tracker), *callbacks],
        checkpoint=cfg.checkpoint,
        on_commit=tracker.checkpoint_hook(cfg.tracking.log_checkpoints),
        before_commit=tracker.flush_metrics,  # the steps a resume will not log again are stored
    )
    console.replace_trainer_output(trainer, bool(cfg.training.progress_bar))
    tracking.log_processes(tracker, distributed.parameters(trainer.args))
    return trainer


def stop_callbacks(cfg: DictConfig, inputs: Inputs, trial: TrialRef | None) -> list[Any]:
    """The callbacks that may end a run early: an Optuna trial's (it reports to its study and
    is pruned there), and training.early_stopping_patience's."""
    found: list[Any] = []
    if trial is not None:
        found.append(PruneCallback(trial, cfg.training.eval_every, cfg.training.max_steps))
    patience = cfg.training.get("early_stopping_patience")
    if patience:
        if inputs.prepared.eval is None:
            raise ConfigError(["training.early_stopping_patience: needs an eval split"])
        found.append(
            EarlyStopping(
                int(patience),
                lambda m: sweeps.objective_name(cfg, m, inputs.rows.has_completions),
                lambda name: sweeps.direction(cfg, name) == "maximize",
            )
        )
    return found


def _report(trainer: Any, inputs: Inputs, labels: list[str] | None, tracker: Any) -> None:
    """The run's pictures (the loss; a classifier's confusion matrix, per-class scores and
    mistakes) logged under `report/`. Every rank takes part in the eval prediction."""
    with tempfile.TemporaryDirectory(prefix="tunelab-report-") as tmp:
        folder = Path(tmp) if distributed.is_main() else None
        if reports.write(trainer, inputs, labels, folder) and folder is not None:
            tracker.log_artifacts(folder, reports.FOLDER)


def _early_stopping(trainer: CheckpointingTrainer) -> EarlyStopping | None:
    found = [c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStopping)]
    return found[0] if found else None


def train(
    trainer: CheckpointingTrainer, start: startpoint.Start, stopper: StopOnSignal
) -> dict[str, float]:
    """Train from the start's checkpoint (or from scratch) to the end; the final metrics, with
    a last evaluation when there is an eval split. A signal stops it at the next step boundary,
    once its checkpoint is written (Interrupted)."""
    resume = str(start.resume_from) if start.resume_from else None
    early = _early_stopping(trainer)
    if early is not None and start.resume_from:
        early.resume(start.resume_from)
    out = trainer.train(resume_from_checkpoint=resume)
    if stopper.received and trainer.state.global_step < trainer.state.max_steps:
        raise Interrupted(stopper.received)  # checkpointed at the step boundary
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, PruneCallback) and callback.pruned is not None:
            raise callback.pruned  # checkpointed at the evaluation that pruned it
    if early is not None:  # the final evaluation and the artifact: the best evaluation's model
        if (step := early.best_before_resume()) is not None and start.resume_from:
            if not trainer.load_weights_of(start.resume_from.parent / f"checkpoint-{step}"):
                early.weights_step = int(trainer.state.global_step)
        else:
            early.restore_best(trainer.model)
    final = dict(out.metrics)
    if trainer.eval_dataset is not None:
        final.update(trainer.evaluate())
    return final


@dataclass
class Published:
    """The artifact's directory and the run's objective (name, value)."""

    artifact: Path
    objective: str
    value: float | None
    early_stopping: dict[str, Any] | None = None
    model_uri: str | None = None  # the run's Logged Model (models:/m-...), when tracked


def publish(
    cfg: DictConfig,
    run_dir: Path,
    name: str,
    overrides: list[str],
    resolved: dict[str, Any],
    start: startpoint.Start,
    inputs: Inputs,
    model: Model,
    trainer: CheckpointingTrainer,
    final: dict[str, float],
    tracked: Tracked,
) -> Published:
    """The artifact written (rank 0; FSDP's full weights gathered from every rank first), then
    the outcome and the Logged Model tracked: a store lost now loses nothing."""
    objective = sweeps.objective_name(cfg, final, inputs.rows.has_completions)
    info = artifacts.ArtifactInfo(
        run_name=name,
        step=trainer.state.global_step,
        epoch=trainer.state.epoch,
        metrics=final,
        base_model=model.base,
        parameters=model.parameters,
        data_source=inputs.rows.source,
        data_digest=inputs.rows.digest,
        mlflow_run_id=tracked.run_id,
        overrides=list(overrides),
        resumed_from=str(start.resume_from) if start.resume_from else None,
        task=cfg.model.task,
        auto_class=inputs.task.AUTO_CLASS,
        labels=models.label_names(model.module),
        early_stopping=early.summary() if (early := _early_stopping(trainer)) else None,
    )
    artifact = run_dir / "model"
    weights = models.full_state_dict(trainer)  # a collective under FSDP: every rank calls it
    if distributed.is_main():
        yaml = OmegaConf.to_yaml(resolved)
        artifacts.save_final(artifact, model.module, inputs.tokenizer, yaml, info, weights)
    tracker = tracked.tracker
    tracking.log_outcome(tracker, objective, sweeps.direction(cfg, objective))
    model_id = tracker.log_model(artifact, final, trainer.state.global_step)
    model_uri = f"models:/{model_id}" if model_id else None
    if model_uri:  # `tunelab runs` and `tunelab serve` read it back
        tracker.set_tags({tracking.MODEL_URI_TAG: model_uri})
    if (run_dir / ".hydra").is_dir():
        tracker.log_artifacts(run_dir / ".hydra", "config/hydra")
    _report(trainer, inputs, models.label_names(model.module), tracker)
    return Published(artifact, objective, final.get(objective), info.early_stopping, model_uri)
