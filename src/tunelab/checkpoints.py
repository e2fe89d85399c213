"""Checkpoints that survive crashes, written in the background.

A checkpoint is *complete* only when its `manifest.json` (xxh3-128 checksum and size of every
file, step, epoch, metrics) has been written last and fsynced: a directory without a valid
manifest is never resumed from, never counted as kept, and is removed at the next start. By
default (`checkpoint.async_write`) the training loop only copies the state into reused CPU
buffers at the step boundary; a background thread writes `.checkpoint-<step>.partial/`, fsyncs
it, writes the manifest and renames it to `checkpoint-<step>/`. One write is in flight at a
time: the next checkpoint, the end of training and a stop on SIGTERM wait for it. Rotation
(Trainer's is turned off) runs only after a commit, keeps the newest `keep` and, with
`keep_best`, the best by `checkpoint.metric`. Resume verifies checksums and falls back to the
next older checkpoint when one does not match.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from tunelab import artifacts, snapshots

log = logging.getLogger("tunelab")

PREFIX = "checkpoint-"
PARTIAL = ".partial"  # `.checkpoint-<step>.partial/`: being written in the background
CORRUPT = ".corrupt"  # checkpoints whose files no longer match their manifest are moved here
ARGS_JSON = "training_args.json"
CHECKSUM = "xxh3_128"
# Testing hook: seconds a checkpoint stays uncommitted (before the background write, or between
# Trainer's synchronous write and the manifest), so a test can kill the process mid-commit.
_COMMIT_DELAY = "TUNELAB_TEST_COMMIT_DELAY"

# Metrics where larger is better; anything else (losses, perplexity) is minimised.
_MAXIMISED = ("accuracy", "exact_match", "f1", "bleu", "rouge")


def mode_for(metric: str, mode: str | None) -> str:
    """`mode` if set, else inferred from the metric's name (min for losses, max for accuracies)."""
    if mode:
        return mode
    return "max" if any(word in metric for word in _MAXIMISED) else "min"


def metric_name(metric: str) -> str:
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def trainer_arguments(cfg: Any) -> dict[str, Any]:
    """TrainingArguments for the `checkpoint` group. Trainer's own rotation is off
    (save_total_limit=None): `rotate` runs after each commit instead."""
    strategy = cfg.strategy
    if strategy == "none":
        return {"save_strategy": "no"}
    args: dict[str, Any] = {"save_strategy": strategy, "save_total_limit": None}
    if strategy == "steps":
        args["save_steps"] = cfg.every
    if strategy == "best":
        metric = metric_name(cfg.metric)
        args["metric_for_best_model"] = metric
        args["greater_is_better"] = mode_for(metric, cfg.mode) == "max"
    return args


# ---------------------------------------------------------------------------------------------
# Commit, scan, rotate.


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def commit(
    ckpt: Path,
    step: int,
    epoch: float | None,
    metrics: dict[str, float],
    written: Path | None = None,
    known: dict[str, str] | None = None,
) -> None:
    """Make `ckpt` complete: fsync every file, then write the manifest last (and fsync it). With
    `written` (a `.partial` directory), the files are there and are renamed to `ckpt` after.
    `known`: checksums already taken from memory, by file name."""
    if written is None:
        _test_delay()
    info = {"kind": "checkpoint", "step": step, "epoch": epoch, "metrics": metrics}
    artifacts.write_manifest(written or ckpt, info, checksum=CHECKSUM, known=known)
    if written is not None:
        artifacts.replace_dir(written, ckpt)  # fsyncs checkpoints/
    else:
        artifacts.fsync_dir(ckpt.parent)  # the checkpoint's own entry in checkpoints/


def _test_delay() -> None:
    delay = float(os.environ.get(_COMMIT_DELAY, "0") or 0)
    if delay:
        time.sleep(delay)


def partial_dir(root: Path, step: int) -> Path:
    return root / f".{PREFIX}{step}{PARTIAL}"


def _manifest(ckpt: Path) -> dict[str, Any] | None:
    return artifacts.read_manifest(ckpt) or None


def _candidates(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    found = [p for p in found if p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=step_of, reverse=True)


def committed(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, newest first (manifest present; files not re-hashed)."""
    return [p for p in _candidates(root) if _manifest(p) is not None]


def clean_incomplete(root: Path) -> list[Path]:
    """Remove checkpoint directories that have no valid manifest (a write that never finished)."""
    removed = []
    for path in _candidates(root):
        if _manifest(path) is None:
            log.warning("removing incomplete checkpoint %s (no manifest: never committed)", path)
            _remove(path)
            removed.append(path)
    for leftover in root.glob(f".{PREFIX}*{PARTIAL}") if root.is_dir() else []:
        log.warning("removing incomplete checkpoint %s (its write never finished)", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    for leftover in root.glob(".deleting-*") if root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
    return removed


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest. Incomplete ones are removed; ones
    that fail verification are moved to `.corrupt/` with a warning, and an older one is tried."""
    clean_incomplete(root)
    for path in committed(root):
        problems = artifacts.verify_manifest(path)
        if not problems:
            return path
        target = root / CORRUPT / f"{path.name}-{int(time.time())}"
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        log.warning(
            "checkpoint %s does not match its manifest (%s); moved to %s, trying an older one",
            path,
            "; ".join(problems[:3]),
            target,
        )
    return None


def resume_point(resume: str, root: Path) -> Path | None:
    """The checkpoint to resume from: the newest valid one under `root` for `auto`, none for
    `never`, or the verified checkpoint at `resume`. Incomplete checkpoints are removed first."""
    clean_incomplete(root)
    if resume == "never":
        return None
    if resume == "auto":
        found = latest_valid(root)
        if found:
            log.info("resuming from %s", found)
        return found
    path = Path(resume).expanduser().resolve()
    problems = artifacts.verify_manifest(path)
    if problems:
        raise RuntimeError(f"resume={resume}: not a complete tunelab checkpoint: {problems[0]}")
    return path


def rotate(root: Path, keep: int | None, metric: str | None, mode: str | None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep`, sparing the best by `metric` (when
    given). Only directories named checkpoint-<step> under `root` are ever touched."""
    done = committed(root)
    if not keep or len(done) <= keep:
        return []
    spared = set(done[:keep])
    best = best_checkpoint(done, metric, mode) if metric else None
    if best is not None:
        spared.add(best)
    removed = [p for p in done if p not in spared]
    for path in removed:
        _remove(path)
    return removed


def best_checkpoint(done: list[Path], metric: str, mode: str | None) -> Path | None:
    """The checkpoint whose manifest holds the best value of `metric` measured at its own step."""
    name = metric_name(metric)
    sign = 1 if mode_for(name, mode) == "max" else -1
    scored = []
    for path in done:
        value = ((_manifest(path) or {}).get("metrics") or {}).get(name)
        if isinstance(value, (int, float)):
            scored.append((sign * value, step_of(path), path))
    return max(scored)[2] if scored else None


def _remove(path: Path) -> None:
    # Rename first: a crash mid-delete leaves `.deleting-*`, never a checkpoint-N missing files.
    doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Trainer integration.


def trainer_class(cfg: Any, on_commit: Any = None) -> type:
    """Trainer with crash-safe checkpoint commits and tunelab's rotation. `on_commit(path,
    removed, best)` is told of each commit, what rotation removed, and the best checkpoint (from
    the writer thread when checkpoints are written in the background)."""
    from transformers import Trainer

    keep, keep_best = cfg.keep, cfg.get("keep_best", True)
    metric = cfg.metric if keep_best else None
    background = cfg.get("async_write", True)

    class CheckpointingTrainer(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.writer = snapshots.BackgroundWriter()
            self.snapshot = snapshots.Snapshot()
            self.add_callback(self.writer.callback())

        # Override: training ends only when the last checkpoint is committed, whatever ended it.
        def train(self, *args: Any, **kwargs: Any) -> Any:
            try:
                out = super().train(*args, **kwargs)
            except BaseException:
                self.writer.wait(raise_error=False)
                raise
            self.writer.wait()
            return out

        # Override: Trainer pickles TrainingArguments into training_args.bin; a checkpoint keeps
        # them as JSON instead, so nothing in it needs a full unpickler.
        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            super()._save(output_dir, state_dict)
            out = Path(output_dir or self.args.output_dir)
            if self.args.should_save:
                (out / "training_args.bin").unlink(missing_ok=True)
                (out / ARGS_JSON).write_text(self.args.to_json_string(), encoding="utf-8")

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            if background and self._can_write_in_background():
                self._save_in_background(trial)
                return
            # Trainer's synchronous in-place write, then commit (manifest last) and rotate.
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                root = Path(self._get_output_dir(trial=trial))
                step = self.state.global_step
                path = root / f"{PREFIX}{step}"
                commit(path, step, self.state.epoch, _metrics_at(self.state, step))
                self._rotated(root, path)

        # Override: read tunelab's safetensors/JSON optimizer and scheduler state when present
        # (Trainer's own .pt files otherwise: checkpoints of plain Trainer still resume).
        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            if checkpoint is None or not (Path(checkpoint) / snapshots.OPTIMIZER).is_file():
                super()._load_optimizer_and_scheduler(checkpoint)
                return
            self.optimizer.load_state_dict(snapshots.load_optimizer(Path(checkpoint)))
            self.lr_scheduler.load_state_dict(snapshots.load_scheduler(Path(checkpoint)))

        def _can_write_in_background(self) -> bool:
            # Sharded states (DeepSpeed, FSDP) are gathered with collectives: Trainer's own path.
            return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

        def _save_in_background(self, trial: Any) -> None:
            """At the step boundary: wait for the previous commit, copy the state into CPU
            buffers, write the small files; the big ones and the commit go to the writer."""
            self.writer.wait()  # one checkpoint in flight; raises if the previous one failed
            if not self.args.should_save:
                return  # DDP: every rank holds the same state, rank 0 writes it
            if self.hp_search_backend is None and trial is None:
                self.store_flos()
            root = Path(self._get_output_dir(trial=trial))
            step = self.state.global_step
            final, partial = root / f"{PREFIX}{step}", partial_dir(root, step)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)

            unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            tensors = snapshots.weights_to_save(unwrapped)
            if tensors is not None:
                # As save_pretrained does, and here where nothing else touches the config.
                unwrapped.config.dtype = str(unwrapped.dtype).split(".")[1]
                unwrapped.config.architectures = [unwrapped.__class__.__name__]
                weights = self.snapshot.stage("model", tensors, {"format": "pt"})
            else:
                weights = self.snapshot.take("model", unwrapped.state_dict())
            optimizer = self.snapshot.stage_optimizer(self.optimizer.state_dict())
            scheduler = copy.deepcopy(self.lr_scheduler.state_dict())
            self.snapshot.ready()
            # Small and tied to this moment: written now (milliseconds).
            self._save_rng_state(str(partial))
            self._save_scaler(str(partial))
            if self.state.best_global_step:
                best = root / f"{PREFIX}{self.state.best_global_step}"
                if best.exists() or self.state.best_global_step == step:
                    self.state.best_model_checkpoint = str(best)
            self._export_callback_state()
            self.state.save_to_json(str(partial / "trainer_state.json"))
            (partial / ARGS_JSON).write_text(self.args.to_json_string(), encoding="utf-8")
            epoch, metrics = self.state.epoch, _metrics_at(self.state, step)

            def write() -> None:
                _test_delay()  # training goes on meanwhile: the snapshot must not change
                try:
                    known = snapshots.save_weights(unwrapped, weights, partial)
                    if self.processing_class is not None:
                        self.processing_class.save_pretrained(partial)
                    known |= snapshots.save_optimizer(optimizer, partial)
                    snapshots.save_scheduler(scheduler, partial)
                    commit(final, step, epoch, metrics, written=partial, known=known)
                except BaseException:
                    shutil.rmtree(partial, ignore_errors=True)  # frees the space it took
                    raise
                self._rotated(root, final)

            self.writer.start(write, f"checkpoint-{step}")

        def _export_callback_state(self) -> None:
            from transformers.trainer_callback import ExportableState

            handlers = [*self.callback_handler.callbacks, self.control]
            for cb in [cb for cb in handlers if isinstance(cb, ExportableState)]:
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()

        def _rotated(self, root: Path, path: Path) -> None:
            removed = rotate(root, keep, metric, cfg.mode)
            for old in removed:
                log.info("rotated away %s", old.name)
            if on_commit is not None:
                best = (
                    best_checkpoint(committed(root), cfg.metric, cfg.mode) if cfg.metric else None
                )
                on_commit(path, removed, best)

    return CheckpointingTrainer


def _metrics_at(state: Any, step: int) -> dict[str, float]:
    """Eval metrics logged at exactly `step` (empty when no evaluation ran there)."""
    out: dict[str, float] = {}
    for entry in state.log_history:
        if entry.get("step") == step:
            out.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    return out


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the run after a checkpoint was written."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def stop_on_signal() -> Any:
    """A TrainerCallback that turns SIGTERM/SIGINT into "checkpoint at the next step boundary,
    then stop". Before training starts, a signal interrupts at once. `received` holds the signal."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def __init__(self) -> None:
            self.received: int | None = None
            self.training = False
            self._previous: dict[int, Any] = {}

        def install(self) -> None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

        def uninstall(self) -> None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()

        def _handle(self, signum: int, frame: Any) -> None:
            if not self.training or self.received is not None:
                raise Interrupted(signum)  # not in the loop yet, or a second signal: stop now
            self.received = signum
            name = signal.Signals(signum).name
            log.warning("%s received: checkpointing at the next step, then stopping", name)

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.training = True

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if self.received is not None:
                control.should_save = True  # even with checkpoint=none: preemption resumes
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.training = False

    return StopOnSignal()
