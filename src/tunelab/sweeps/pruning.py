"""A trial's job under tunelab's Optuna sweeper: it reports its metric to the study at every
evaluation (the curves of the search's picture) and stops when the study's pruner says so."""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback

from tunelab import distributed
from tunelab.errors import TrialPruned
from tunelab.sweeps.study import TrialRef

log = logging.getLogger("tunelab")


class PruneCallback(TrainerCallback):
    """Reports the trial's metric (oriented to the study's direction) at each evaluation; when
    the pruner prunes, a checkpoint is written at that step and training stops, and `pruned`
    says where (the runner then ends the run as pruned). Rank 0 talks to the study; every rank
    stops at the same step. A metric that is NaN or infinite prunes at once."""

    def __init__(self, ref: TrialRef, eval_every: int, max_steps: int) -> None:
        self.ref = ref
        self.trial: Any
        self.sign: float
        self.trial, self.sign = (
            ref.open(eval_every, max_steps) if distributed.is_main() else (None, 1.0)
        )
        self.pruned: TrialPruned | None = None
        self.reported: set[int] = set()  # the last evaluation may repeat the last periodic one

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
    ) -> Any:
        value = (metrics or {}).get(self.ref.metric)
        step = int(state.global_step)
        if value is None or self.pruned is not None or step in self.reported:
            return control
        self.reported.add(step)
        last = step >= state.max_steps  # the run's end: nothing left to save by stopping

        def decide() -> str:
            assert self.trial is not None
            if not math.isfinite(value):
                return "prune"
            self.trial.report(self.sign * float(value), step)
            return "prune" if not last and self.trial.should_prune() else "go on"

        if distributed.decided_by_rank_zero("prune", decide) == "prune" and not last:
            log.info("trial %d: pruned at step %d (%s=%.4g)", self.ref.number, step,
                     self.ref.metric, value)  # fmt: skip
            self.pruned = TrialPruned(step, float(value), self.ref.metric)
            control.should_save = True
            control.should_training_stop = True
        return control
