"""Checkpoints that survive crashes.

Trainer writes `checkpoint-<step>/` in place. tunelab makes a checkpoint *complete* only when its
`manifest.json` (sha256 and size of every file, step, epoch, metrics) has been written last and
fsynced: a directory without a valid manifest is never resumed from, never counted as kept, and is
removed at the next start. Rotation (Trainer's is turned off) runs only after a commit, keeps the
newest `keep` and, with `keep_best`, the best by `checkpoint.metric`. Resume verifies checksums and
falls back to the next older checkpoint when one does not match.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from tunelab import artifacts

log = logging.getLogger("tunelab")

PREFIX = "checkpoint-"
CORRUPT = ".corrupt"  # checkpoints whose files no longer match their manifest are moved here
ARGS_JSON = "training_args.json"
# Testing hook: seconds to wait between Trainer's write and the manifest, so a test can kill the
# process while a checkpoint is half-committed.
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


def commit(ckpt: Path, step: int, epoch: float | None, metrics: dict[str, float]) -> None:
    """Make `ckpt` complete: fsync every file, then write the manifest last (and fsync it)."""
    delay = float(os.environ.get(_COMMIT_DELAY, "0") or 0)
    if delay:
        time.sleep(delay)
    info = {"kind": "checkpoint", "step": step, "epoch": epoch, "metrics": metrics}
    artifacts.write_manifest(ckpt, info)
    artifacts.fsync_dir(ckpt.parent)  # the checkpoint's own entry in checkpoints/


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
    removed, best)` is told of each commit, what rotation removed, and the best checkpoint."""
    from transformers import Trainer

    keep, keep_best = cfg.keep, cfg.get("keep_best", True)
    metric = cfg.metric if keep_best else None

    class CheckpointingTrainer(Trainer):
        # Override: Trainer pickles TrainingArguments into training_args.bin; a checkpoint keeps
        # them as JSON instead, so nothing in it needs a full unpickler.
        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            super()._save(output_dir, state_dict)
            out = Path(output_dir or self.args.output_dir)
            if self.args.should_save:
                (out / "training_args.bin").unlink(missing_ok=True)
                (out / ARGS_JSON).write_text(self.args.to_json_string(), encoding="utf-8")

        # Override: commit (manifest last) and rotate after Trainer's in-place write.
        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            super()._save_checkpoint(model, trial)
            if not self.args.should_save:
                return
            root = Path(self._get_output_dir(trial=trial))
            step = self.state.global_step
            path = root / f"{PREFIX}{step}"
            commit(path, step, self.state.epoch, _metrics_at(self.state, step))
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
