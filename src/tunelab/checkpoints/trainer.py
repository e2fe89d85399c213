"""Trainer with crash-safe checkpoint commits, background writes and tunelab's rotation.

By default (`checkpoint.async_write`) the training loop only copies the state into reused CPU
buffers at the step boundary (checkpoints.snapshots); a background thread writes the `.partial`
directory, commits it (manifest last, tunelab.checkpoints.protocol) and rotates. One write is in
flight at a time: the next checkpoint, the end of training and a stop on SIGTERM wait for it.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from safetensors import SafetensorError
from transformers import Trainer

from tunelab import distributed, testhooks
from tunelab.checkpoints import snapshots
from tunelab.checkpoints.protocol import (
    ARGS_JSON,
    PREFIX,
    IncompleteCheckpoint,
    OnCommit,
    commit,
    committed,
    partial_dir,
)
from tunelab.checkpoints.rotation import best_checkpoint, rotate
from tunelab.checkpoints.signals import AbandonWrite, StopOnSignal
from tunelab.errors import CheckpointWriteFailed

log = logging.getLogger("tunelab")


class CheckpointingTrainer(Trainer):
    """`checkpoint`: the run's checkpoint config; `on_commit`: see OnCommit (called from the
    writer thread when checkpoints are written in the background); `before_commit`: called
    before each commit (the tracker's `flush_metrics`)."""

    def __init__(
        self,
        *args: Any,
        checkpoint: Any,
        on_commit: OnCommit | None = None,
        before_commit: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.before_commit = before_commit or (lambda: None)
        self.keep: int | None = checkpoint.keep
        self.best_metric: str | None = checkpoint.metric
        self.best_mode: str | None = checkpoint.mode
        self.rotation_metric = checkpoint.metric if checkpoint.keep_best else None
        self.background: bool = checkpoint.async_write
        self.on_commit = on_commit
        self.writer = snapshots.BackgroundWriter()
        self.snapshot = snapshots.Snapshot()
        # First, so every other callback's on_train_end comes after the last commit.
        self.callback_handler.callbacks.insert(0, self.writer.callback())

    # Override: training ends only when the last checkpoint is committed, whatever ended it
    # (an exception skips on_train_end); a checkpoint at max_steps is not trained further.
    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        if isinstance(resume_from_checkpoint, str):
            done = self._already_at_the_end(resume_from_checkpoint)
            if done is not None:
                return done
        try:
            out = super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            self._finish_write_after_error()
            raise
        self.writer.wait()
        return out

    def _already_at_the_end(self, checkpoint: str) -> Any:
        """A checkpoint at `max_steps` (killed after its last commit, before the artifact):
        its weights and state, untrained further. Trainer would take one more step from it
        whenever `max_steps` is not a whole number of epochs, so the resumed run would end a
        step past an uninterrupted one. None for any other checkpoint."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        if not 0 < self.args.max_steps <= state.global_step:
            return None
        self._load_from_checkpoint(checkpoint)
        # The file is rank 0's: under DDP each rank is itself again (who prints, who logs).
        state.is_local_process_zero = self.is_local_process_zero()
        state.is_world_process_zero = self.is_world_process_zero()
        self.state = state
        return TrainOutput(state.global_step, 0.0, {"train_runtime": 0.0, "epoch": state.epoch})

    def load_weights_of(self, checkpoint: Path) -> bool:
        """The model's weights as a committed checkpoint of this run holds them (early
        stopping's best evaluation from before a resume). A checkpoint rotated away is a
        warning: the model keeps its last weights."""
        if checkpoint not in committed(checkpoint.parent):
            log.warning(
                "%s was rotated away (checkpoint.keep): the artifact is the last model, not the "
                "best evaluation's; keep more checkpoints (or checkpoint=best) with early "
                "stopping to resume to the best",
                checkpoint.name,
            )
            return False
        self._load_from_checkpoint(str(checkpoint))
        return True

    def _finish_write_after_error(self) -> None:
        """The checkpoint in flight completes even when training stopped on an error or a
        second signal; only a third signal (AbandonWrite) gives up on it."""
        while True:
            try:
                self.writer.wait(raise_error=False)
                return
            except AbandonWrite:
                return
            except KeyboardInterrupt:
                log.warning("still writing %s; a third signal stops without it", self.writer)

    # Override: Trainer pickles TrainingArguments into training_args.bin; a checkpoint keeps
    # them as JSON instead, so nothing in it needs a full unpickler.
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        out = Path(output_dir or str(self.args.output_dir))
        if self.args.should_save:
            (out / "training_args.bin").unlink(missing_ok=True)
            (out / ARGS_JSON).write_text(self.args.to_json_string(), encoding="utf-8")

    # Override: the one place Trainer writes a checkpoint; ours commits and rotates after it.
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.background and self._can_write_in_background():
            self._save_in_background(trial)
            return
        # Trainer's synchronous in-place write, then commit (manifest last) and rotate.
        root = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        path = root / f"{PREFIX}{step}"
        try:
            with self._signals_held():
                super()._save_checkpoint(model, trial)
                if self.args.should_save:
                    self.before_commit()
                    commit(path, step, self.state.epoch, _metrics_at(self.state, step))
        # A full disk, permissions; torch.save reports a failed write as a RuntimeError.
        except (OSError, RuntimeError, SafetensorError, IncompleteCheckpoint) as exc:
            if self.args.should_save and not (path / "manifest.json").exists():
                shutil.rmtree(path, ignore_errors=True)  # frees the space it took
            raise CheckpointWriteFailed(
                f"writing {path.name} failed: {exc}. Older checkpoints are intact."
            ) from exc
        if self.args.should_save:
            self._rotated(root, path)

    # Override: read tunelab's safetensors/JSON optimizer and scheduler state when present
    # (Trainer's own .pt files otherwise: checkpoints of plain Trainer still resume).
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not (Path(checkpoint) / snapshots.OPTIMIZER).is_file():
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        assert self.optimizer is not None and self.lr_scheduler is not None  # created by now
        self.optimizer.load_state_dict(snapshots.load_optimizer(Path(checkpoint)))
        self.lr_scheduler.load_state_dict(snapshots.load_scheduler(Path(checkpoint)))

    # Override: Trainer takes a tied head (saved once, as its source: GPT-2's lm_head) for a
    # missing key unless the model lists it in `_keys_to_ignore_on_save`, which transformers 5
    # models no longer do; every resume then warned of a "missing" lm_head.weight.
    def _issue_warnings_after_load(self, load_result: Any) -> None:
        model = self.accelerator.unwrap_model(self.model)
        tied = tuple(getattr(model, "all_tied_weights_keys", None) or ())
        missing = [k for k in load_result.missing_keys if not k.endswith(tied)]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    # Override: under DDP each rank's RNG state goes to rank 0, which writes them all into the
    # checkpoint it commits; each rank writing its own file would race rank 0's commit.
    def _save_rng_state(self, output_dir: str) -> None:
        self._write_rng_states(Path(output_dir), self._gathered_rng_states())

    def _gathered_rng_states(self) -> list[bytes] | None:
        """Every rank's `rng_state_<rank>.pth`, as Trainer writes it, on rank 0 (a collective);
        None in a single process (Trainer's own `rng_state.pth` is written then)."""
        if self.args.world_size <= 1:
            return None
        import tempfile

        with tempfile.TemporaryDirectory(prefix="tunelab-rng-") as tmp:
            super()._save_rng_state(tmp)
            data = (Path(tmp) / f"rng_state_{self.args.process_index}.pth").read_bytes()
        return distributed.gather_bytes(data)

    def _write_rng_states(self, directory: Path, gathered: list[bytes] | None) -> None:
        if self.args.world_size <= 1:
            super()._save_rng_state(str(directory))
            return
        for index, data in enumerate(gathered or []):  # rank 0 holds them all
            (directory / f"rng_state_{index}.pth").write_bytes(data)

    def _can_write_in_background(self) -> bool:
        # Sharded states (DeepSpeed, FSDP) are gathered with collectives: Trainer's own path.
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save_in_background(self, trial: Any) -> None:
        """At the step boundary: wait for the previous commit, copy the state into CPU
        buffers, write the small files; the big ones and the commit go to the writer."""
        self.writer.wait()  # one checkpoint in flight; raises if the previous one failed
        # Collectives under DDP, in the order every rank makes them.
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        rng_states = self._gathered_rng_states()
        if not self.args.should_save:
            return  # DDP: every rank holds the same state, rank 0 writes it
        with self._signals_held():  # from the `.partial` directory to the writer's start
            self._stage_and_write(trial, rng_states)

    def _stage_and_write(self, trial: Any, rng_states: list[bytes] | None) -> None:
        root = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        final, partial = root / f"{PREFIX}{step}", partial_dir(root, step)
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
        except OSError as exc:
            raise CheckpointWriteFailed(
                f"writing {final.name} failed: {exc}. Older checkpoints are intact."
            ) from exc

        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        adapter = self.snapshot.stage_adapter(unwrapped)  # peft=lora: the adapter alone
        tensors = snapshots.weights_to_save(unwrapped) if adapter is None else None
        weights: snapshots.StagedFile | snapshots.StagedAdapter | dict[str, Any]
        if adapter is not None:
            weights = adapter
        elif tensors is not None:
            # As save_pretrained does, and here where nothing else touches the config.
            unwrapped.config.dtype = str(unwrapped.dtype).split(".")[1]
            unwrapped.config.architectures = [unwrapped.__class__.__name__]
            weights = self.snapshot.stage("model", tensors, {"format": "pt"})
        else:
            weights = self.snapshot.take("model", unwrapped.state_dict())
        assert self.optimizer is not None and self.lr_scheduler is not None  # training
        optimizer = self.snapshot.stage_optimizer(self.optimizer.state_dict())
        scheduler = copy.deepcopy(self.lr_scheduler.state_dict())
        self.snapshot.ready()
        # Small and tied to this moment: written now (milliseconds).
        if self.state.best_global_step:
            best = root / f"{PREFIX}{self.state.best_global_step}"
            if best.exists() or self.state.best_global_step == step:
                self.state.best_model_checkpoint = str(best)
        self._export_callback_state()
        try:
            self._write_rng_states(partial, rng_states)
            self._save_scaler(str(partial))
            self.state.save_to_json(str(partial / "trainer_state.json"))
            (partial / ARGS_JSON).write_text(self.args.to_json_string(), encoding="utf-8")
            testhooks.pause("STAGE")  # a test signals the process right here
        except OSError as exc:  # a full disk, before the background part even starts
            shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointWriteFailed(
                f"writing {final.name} failed: {exc}. Older checkpoints are intact."
            ) from exc
        epoch, at_step = self.state.epoch, _metrics_at(self.state, step)

        def write() -> None:
            testhooks.pause("COMMIT")  # training goes on meanwhile: the snapshot must not change
            try:
                known = snapshots.save_weights(unwrapped, weights, partial)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(partial)
                known |= snapshots.save_optimizer(optimizer, partial)
                snapshots.save_scheduler(scheduler, partial)
                self.before_commit()
                commit(final, step, epoch, at_step, written=partial, known=known)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)  # frees the space it took
                raise
            self._rotated(root, final)

        self.writer.start(write, f"checkpoint-{step}")

    @contextmanager
    def _signals_held(self) -> Iterator[None]:
        """A second SIGTERM/SIGINT inside the block takes effect at its end, so a checkpoint
        is never left half-staged where nothing would commit it (see checkpoints.signals)."""
        stopper = next(
            (cb for cb in self.callback_handler.callbacks if isinstance(cb, StopOnSignal)), None
        )
        if stopper is None:
            yield
            return
        with stopper.deferred():
            yield
        stopper.raise_pending()

    def _export_callback_state(self) -> None:
        from transformers.trainer_callback import ExportableState

        handlers = [*self.callback_handler.callbacks, self.control]
        stateful = cast(dict[str, Any], self.state.stateful_callbacks)  # a dict by now
        for cb in [cb for cb in handlers if isinstance(cb, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(stateful.get(name), list):
                stateful[name].append(cb.state())
            else:
                stateful[name] = cb.state()

    def _rotated(self, root: Path, path: Path) -> None:
        removed = rotate(root, self.keep, self.rotation_metric, self.best_mode)
        for old in removed:
            log.info("rotated away %s", old.name)
        if self.on_commit is not None:
            best = (
                best_checkpoint(committed(root), self.best_metric, self.best_mode)
                if self.best_metric
                else None
            )
            self.on_commit(path, removed, best)


def _metrics_at(state: Any, step: int) -> dict[str, float]:
    """Eval metrics logged at exactly `step` (empty when no evaluation ran there)."""
    out: dict[str, float] = {}
    for entry in state.log_history:
        if entry.get("step") == step:
            out.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    return out
