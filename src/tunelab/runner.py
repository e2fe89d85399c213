"""The story of one run: data -> model -> Trainer -> train -> artifact -> tracking."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from tunelab import (
    adapters,
    artifacts,
    checkpoints,
    config,
    data,
    distributed,
    locks,
    manifests,
    metrics,
    provenance,
    sweeps,
    tasks,
    testhooks,
    tracking,
)
from tunelab import model as models

log = logging.getLogger("tunelab")


def run(
    cfg: DictConfig,
    run_dir: str | Path,
    overrides: list[str],
    tags: dict[str, str] | None = None,
    name: str | None = None,
    callbacks: Sequence[Any] = (),
) -> RunResult:
    """Train one model as `cfg` (validated: tunelab.config.validate) says, continuing from the
    run directory's newest valid checkpoint when there is one; write its artifact to
    `run_dir/model`; track it. `callbacks`: extra Trainer callbacks. One process at a time per
    run directory: another is refused at once (locks.Busy)."""
    run_dir = Path(run_dir)
    resolved = config.resolved(cfg)
    # Under torchrun/accelerate every rank runs this: first they agree on what they train.
    distributed.same_config(resolved, run_dir)
    with _held(run_dir):
        return _run(cfg, run_dir, overrides, tags, name, callbacks, resolved)


@contextlib.contextmanager
def _held(run_dir: Path) -> Iterator[None]:
    """Rank 0 holds the run directory's lock for the run's life (another process training
    there is refused: locks.Busy); the other ranks go on only once it holds it, and stop at once
    when it could not take it."""
    lock = locks.run_dir(run_dir)
    distributed.share("lock", lambda: (lock.acquire(), "held")[1])
    try:
        yield
    finally:
        lock.release()  # nothing to release on the ranks that never took it


def _run(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    tags: dict[str, str] | None,
    name: str | None,
    callbacks: Sequence[Any],
    resolved: dict[str, Any],
) -> RunResult:
    from tunelab.checkpoints.signals import Interrupted, StopOnSignal
    from tunelab.tracking.callback import TrackingCallback

    main_process = distributed.is_main()  # rank 0 alone tracks and writes the artifact
    name = name or config.run_name(overrides)
    record, finished, resume_from = _starting_point(cfg, run_dir, resolved)
    if finished:
        tags = tracking.run_tags(run_dir, overrides, extra=tags)
        return _already_finished(cfg, run_dir, name, tags, resolved, overrides)
    distributed.note_resume(resume_from)

    # Bad data or a model that cannot be loaded stops here, before an MLflow run exists.
    cache = Path(cfg.output.root) / ".cache" / "datasets"  # shared by resumes and sweep jobs
    rows = data.load(cfg.data, cache, workers=cfg.training.num_workers)
    source = models.fetch(cfg.model.name_or_path, cfg.tracking.uri, Path(cfg.output.root))
    tokenizer = models.load_tokenizer(cfg.model, rows, source)
    task = tasks.get(cfg.model.task)
    prepared = task.prepare(rows, tokenizer, cfg.data)
    log.info("data: %d train / %d eval rows, %s", len(rows.train), len(rows.eval), rows.source)
    # A resume trains on what the run started from, or not at all.
    inputs = _same_inputs(record, rows.digest, source, resume_from)

    tags = tracking.run_tags(run_dir, overrides, resume_from, extra=tags)
    tags["tunelab.fingerprint"] = record["fingerprint"]  # a kill -9 orphan is found by it
    if prepared.truncated_rows:
        tags = {**tags, "tunelab.data.truncated_rows": str(prepared.truncated_rows)}
    with StopOnSignal() as stopper, contextlib.ExitStack() as recorded:
        # A signal now takes effect once the run is recorded (rank 0; the other ranks, waiting
        # for rank 0's run id, stop at once: rank 0 may be gone).
        with stopper.deferred() if main_process else contextlib.nullcontext():
            tracker: tracking.Tracker = tracking.NullTracker()

            def start_tracking() -> str:
                nonlocal tracker
                previous = record.get("mlflow_run_id")
                tracker = tracking.start(cfg, name, tags, resolved, overrides, previous)
                return tracker.run_id or ""

            run_id = distributed.share("run-id", start_tracking) or None  # rank 0's, everywhere
            # From here the run ends FINISHED, FAILED or KILLED, whatever stops it.
            recorded.enter_context(tracking.recording(tracker, held=stopper.deferred))
            testhooks.hold("START")  # a test signals the process right here
            if main_process:
                record = {**record, **inputs, "mlflow_run_id": tracker.run_id}
                artifacts.write_run_record(run_dir, record)
        stopper.raise_pending()
        _seed(cfg.seed)  # before the weights are initialised, so the seed decides them
        model = models.load_model(cfg.model, tokenizer, source, task, rows)
        model = adapters.apply_peft(model, cfg.peft, cfg.model.task)  # peft=lora: an adapter
        n_params, n_trainable = adapters.parameter_count(model)
        base = cfg.model.name_or_path or f"{cfg.model.arch.model_type} from config"
        tracking.log_inputs(tracker, rows, base, n_params, n_trainable, prepared.train_tokens)

        extra = [TrackingCallback(tracker), stopper, *callbacks]
        args = training_arguments(cfg, run_dir, has_eval=prepared.eval is not None)
        trainer = _trainer(cfg, args, model, tokenizer, task, prepared, rows, tracker, extra)
        tracking.log_processes(tracker, distributed.parameters(trainer.args))
        train_out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if stopper.received and trainer.state.global_step < trainer.state.max_steps:
            raise Interrupted(stopper.received)  # checkpointed at the step boundary
        final = dict(train_out.metrics)
        if prepared.eval is not None:
            final.update(trainer.evaluate())
        objective = sweeps.objective_name(cfg, final, rows.has_completions)

        info = artifacts.ArtifactInfo(
            run_name=name,
            step=trainer.state.global_step,
            epoch=trainer.state.epoch,
            metrics=final,
            base_model=base,
            parameters=n_params,
            data_source=rows.source,
            data_digest=rows.digest,
            mlflow_run_id=run_id,
            overrides=list(overrides),
            resumed_from=str(resume_from) if resume_from else None,
            task=cfg.model.task,
            auto_class=task.AUTO_CLASS,
            labels=models.label_names(model),
        )
        artifact = run_dir / "model"
        weights = models.full_state_dict(trainer)  # FSDP: gathered from every rank
        if main_process:
            yaml = OmegaConf.to_yaml(resolved)
            artifacts.save_final(artifact, model, tokenizer, yaml, info, weights)
        # The artifact is on disk before MLflow hears of it: a store lost now loses nothing.
        tracking.log_outcome(tracker, objective, sweeps.direction(cfg, objective))
        tracker.log_model(artifact, final, trainer.state.global_step)
        if (run_dir / ".hydra").is_dir():
            tracker.log_artifacts(run_dir / ".hydra", "config/hydra")

    return RunResult(
        run_dir=run_dir,
        artifact_dir=artifact,
        metrics=final,
        run_id=run_id,
        ui_hint=tracker.ui_hint or _upload_hint(cfg),
        objective=final.get(objective),
    )


@dataclass
class RunResult:
    run_dir: Path
    artifact_dir: Path
    metrics: dict[str, float]
    run_id: str | None = None
    ui_hint: str | None = None
    objective: float | None = None
    already_finished: bool = False  # nothing was trained: the run directory held the artifact

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
        if self.ui_hint:
            lines.append(f"  MLflow UI: {self.ui_hint}")
        return "\n".join(lines)


def _upload_hint(cfg: DictConfig) -> str | None:
    if cfg.tracking.backend == "none":
        return None
    return "not uploaded (the store was unreachable): run the same command again to upload it"


def _starting_point(
    cfg: DictConfig, run_dir: Path, resolved: dict[str, Any]
) -> tuple[dict[str, Any], bool, Path | None]:
    """(the run record, whether the run already finished, the checkpoint to resume from),
    decided by rank 0 alone and handed to the others: only the holder of the run directory's
    lock reads, cleans up, verifies or sets aside anything in it."""

    def decide() -> str:
        record = _claim(run_dir, resolved)  # before anything else: never mix two configs' runs
        finished = cfg.resume == "auto" and manifests.is_complete(run_dir / "model")
        resume_from = (
            None if finished else checkpoints.resume_point(cfg.resume, run_dir / "checkpoints")
        )
        return json.dumps(
            {
                "record": record,
                "finished": finished,
                "resume_from": resume_from and str(resume_from),
            }
        )

    decided = json.loads(distributed.share("start", decide))
    resume_from = decided["resume_from"]
    return decided["record"], decided["finished"], Path(resume_from) if resume_from else None


def _same_inputs(
    record: dict[str, Any], data_digest: str, source: str | None, resume_from: Path | None
) -> dict[str, Any]:
    """The digests of the run's data and base model, to keep in its record; a resume whose data
    or base changed since the run started is refused (a ConfigError on every rank: rank 0 reads
    the base's weights, once)."""

    def compare() -> str:
        now = {"data_digest": data_digest, "base_digest": provenance.base_digest(source)}
        what = {"data_digest": "the data", "base_digest": "the base model's weights"}
        changed = [k for k in now if resume_from and k in record and record[k] != now[k]]
        if changed:
            k = changed[0]
            raise config.ConfigError(
                [
                    f"resume: {what[k]} changed since this run started (digest "
                    f"{str(record[k])[:16]} then, {str(now[k])[:16]} now): resuming would train "
                    "one model on both; restore them, or rerun with resume=never to start afresh"
                ]
            )
        return json.dumps(now)

    return cast(dict[str, Any], json.loads(distributed.share("inputs", compare)))


def _claim(run_dir: Path, resolved: dict[str, Any]) -> dict[str, Any]:
    """The run record of `run_dir`, refusing a directory that holds a run of another config
    (conf files edited since the same command last ran there)."""
    fingerprint = config.fingerprint(resolved)
    record = artifacts.read_run_record(run_dir)
    if record.get("fingerprint") not in (None, fingerprint) and resolved["resume"] == "auto":
        raise config.ConfigError(
            [
                f"resume: {run_dir} holds a run of a different config (were conf files edited?); "
                "rerun with resume=never to start afresh, or restore the config"
            ]
        )
    return {**record, "fingerprint": fingerprint}


def _already_finished(
    cfg: DictConfig,
    run_dir: Path,
    name: str,
    tags: dict[str, str],
    resolved: dict[str, Any],
    overrides: list[str],
) -> RunResult:
    manifest = manifests.read_manifest(run_dir / "model")
    record = artifacts.read_run_record(run_dir)
    log.info("already finished: %s", run_dir / "model")
    if not distributed.is_main():  # rank 0 uploads and says so
        return RunResult(run_dir, run_dir / "model", {}, already_finished=True)
    # Killed after the artifact was committed but before MLflow heard of it, or trained while
    # the store was down: upload it now.
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
    return RunResult(
        run_dir=run_dir,
        artifact_dir=run_dir / "model",
        metrics=final,
        run_id=run_id,
        objective=final.get(objective),
        already_finished=True,
    )


def _trainer(
    cfg: DictConfig,
    args: Any,
    model: Any,
    tokenizer: Any,
    task: ModuleType,
    prepared: tasks.Prepared,
    rows: data.Rows,
    tracker: tracking.Tracker,
    callbacks: list[Any],
) -> Any:
    from tunelab.checkpoints.trainer import CheckpointingTrainer

    return CheckpointingTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=task.collator(tokenizer),
        processing_class=tokenizer,
        compute_metrics=task.compute_metrics(rows),
        compute_loss_func=task.LOSS,
        preprocess_logits_for_metrics=task.preprocess_logits,
        callbacks=callbacks,
        checkpoint=cfg.checkpoint,
        on_commit=tracker.checkpoint_hook(cfg.tracking.log_checkpoints),
        before_commit=tracker.settle,  # the steps a resume will not log again are stored
    )


def training_arguments(cfg: DictConfig, run_dir: Path, has_eval: bool) -> Any:
    """`training` and `checkpoint` mapped onto transformers.TrainingArguments."""
    import torch
    from transformers import TrainingArguments

    from tunelab.checkpoints.trainer import trainer_arguments

    t = cfg.training
    if t.device == "cuda" and not torch.cuda.is_available():
        raise config.ConfigError(
            ["training.device: cuda, but this machine has no CUDA device; use auto or cpu"]
        )
    cuda = t.device != "cpu" and torch.cuda.is_available()
    if t.fsdp and not cuda:
        raise config.ConfigError(
            [
                "training.fsdp: true needs CUDA GPUs (FSDP does not run on CPU); use DDP there "
                "(training.fsdp=false, the default)"
            ]  # fmt: skip
        )
    bf16 = t.precision == "bf16" or (
        t.precision == "auto" and cuda and torch.cuda.is_bf16_supported()
    )
    evaluate = has_eval and t.eval_every > 0
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        learning_rate=t.lr,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_every if evaluate else None,
        logging_steps=t.log_every,
        bf16=bf16,
        fp16=t.precision == "fp16",
        use_cpu=not cuda,
        dataloader_num_workers=t.num_workers,
        ddp_find_unused_parameters=t.find_unused_parameters,
        fsdp=t.fsdp,
        fsdp_config=cast("dict[str, Any]", OmegaConf.to_container(t.fsdp_config))
        if t.fsdp
        else None,
        log_level_replica="error",  # under torchrun rank 0 alone speaks
        dataloader_pin_memory=cuda,
        disable_tqdm=not t.progress_bar,
        report_to="none",  # tracking is tunelab's own callback
        include_num_input_tokens_seen="non_padding",  # for tokens/s
        seed=cfg.seed,
        data_seed=cfg.seed,
        **trainer_arguments(cfg.checkpoint),
    )


def _seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)
