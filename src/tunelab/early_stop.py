"""`training.early_stopping_patience`: stop a run when its objective has not improved for N
evaluations, and publish the model of its best evaluation, not its last. Imports transformers:
loaded by the stages when a run starts."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

log = logging.getLogger("tunelab")


class EarlyStopping(TrainerCallback, ExportableState):
    """Watches the objective at every evaluation (its name from `objective_of(metrics)`,
    `maximize` its direction). Keeps a CPU copy of the weights at the best evaluation (the
    model's size in memory); stops training after `patience` evaluations without improvement.
    Every rank sees the same metrics, so every rank stops at the same step. Its counters are
    saved in each checkpoint's trainer_state.json (`state`), so a resumed run stops where an
    uninterrupted one would (`resume`)."""

    _COUNTERS = ("metric", "best", "best_step", "since_best", "stopped_at")

    def __init__(
        self,
        patience: int,
        objective_of: Callable[[dict[str, float]], str],
        maximize_of: Callable[[str], bool],
    ) -> None:
        self.patience = patience
        self.objective_of, self.maximize_of = objective_of, maximize_of
        self.metric: str | None = None
        self.best: float | None = None
        self.best_step: int | None = None
        self.stopped_at: int | None = None
        self.since_best = 0
        self.weights: dict[str, Any] | None = None
        self.weights_step: int | None = None  # the artifact's step when not the best's

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, model: Any = None, **kw: Any
    ) -> Any:
        metrics = metrics or {}
        self.metric = self.metric or self.objective_of(metrics)
        value = metrics.get(self.metric)
        step = int(state.global_step)
        if value is None or self.stopped_at is not None or step == self.best_step:
            return control
        maximize = self.maximize_of(self.metric)
        better = math.isfinite(value) and (
            self.best is None or (value > self.best if maximize else value < self.best)
        )
        if better:
            self.best, self.best_step, self.since_best = float(value), step, 0
            self.weights = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            }
            return control
        self.since_best += 1
        if self.since_best >= self.patience and step < state.max_steps:
            log.info(
                "early stopping at step %d: %s has not improved on %.4g (step %d) for %d "
                "evaluations", step, self.metric, self.best or float("nan"), self.best_step or 0,
                self.since_best,
            )  # fmt: skip
            self.stopped_at = step
            control.should_training_stop = True
        return control

    def state(self) -> dict[str, Any]:
        return {
            "args": {"patience": self.patience},
            "attributes": {k: getattr(self, k) for k in self._COUNTERS},
        }

    def resume(self, checkpoint: Path) -> None:
        """The counters as they were when `checkpoint` was saved. The best evaluation's weights
        are not among them: when no later evaluation beats it, `best_before_resume` names the
        step whose checkpoint holds them."""
        file = checkpoint / "trainer_state.json"
        saved = json.loads(file.read_text()).get("stateful_callbacks", {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        if not isinstance(saved, dict):
            return  # a checkpoint of a run without early stopping
        for key, value in (saved.get("attributes") or {}).items():
            if key in self._COUNTERS:
                setattr(self, key, value)
        self.since_best = int(self.since_best or 0)

    def best_before_resume(self) -> int | None:
        """The best evaluation's step when its weights were seen before a resume, not by this
        process (None: they are here, or there was no evaluation)."""
        return self.best_step if self.weights is None else None

    def restore_best(self, model: Any) -> None:
        """Put the best evaluation's weights back into `model` (nothing when none was seen)."""
        if self.weights is not None:
            model.load_state_dict(self.weights)

    def summary(self) -> dict[str, Any] | None:
        """What the manifest records (None when nothing was evaluated)."""
        if self.best_step is None:
            return None
        return {
            "patience": self.patience,
            "metric": self.metric,
            "best_step": self.best_step,
            "best_value": self.best,
            "stopped_at_step": self.stopped_at,
            "weights_step": self.best_step if self.weights_step is None else self.weights_step,
        }
