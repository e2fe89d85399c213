"""The Trainer callback that sends Trainer's logs to the run's tracker. It replaces
report_to="mlflow", which drops long params and uploads every checkpoint in the foreground."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

from tunelab import metrics
from tunelab.tracking.tracker import Tracker


class TrackingCallback(TrainerCallback):
    """Loss, learning rate, grad norm, eval metrics at the global step, plus throughput over
    each logging interval: samples/s and tokens/s."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.last: tuple[float, int, int] | None = None
        self.kept: dict[str, Any] = {}  # the latest bookkeeping values, tagged at the end

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last = (time.perf_counter(), state.global_step, state.num_input_tokens_seen)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.kept and state.is_world_process_zero:  # one write, not one per logging step
            self.tracker.set_tags({f"trainer.{k}": v for k, v in self.kept.items()})

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if not logs or not state.is_world_process_zero:
            return
        logs = dict(logs)
        # Trainer's bookkeeping: tagged at the end, not charted.
        self.kept.update({k: logs.pop(k) for k in metrics.BOOKKEEPING if k in logs})
        if "loss" in logs and self.last is not None:
            now, step, tokens = time.perf_counter(), state.global_step, state.num_input_tokens_seen
            elapsed = max(now - self.last[0], 1e-9)
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
            samples = (step - self.last[1]) * per_step * args.world_size
            logs["throughput/samples_per_second"] = samples / elapsed
            if tokens:
                logs["throughput/tokens_per_second"] = (tokens - self.last[2]) / elapsed
            self.last = (now, step, tokens)
        self.tracker.log_metrics(logs, step=state.global_step)
