"""SIGTERM/SIGINT: checkpoint at the next step boundary, then stop (KILLED in MLflow, and the
same command resumes).

- The first signal asks for a checkpoint at the next step boundary, then a stop.
- A second one stops at once; a checkpoint being written still completes first, including one
  whose state is still being copied at the step boundary (`deferred` around that copy: stopping
  in the middle of it left a `.partial` directory that nothing would ever commit).
- A third one stops without waiting for that write (its `.partial` directory is removed at the
  next start; older checkpoints are intact).

Before training starts a signal interrupts at once, except while the run is being recorded in
MLflow (`deferred`): then it takes effect as soon as the run exists and is recorded, so the run
ends KILLED rather than RUNNING or orphaned.

Under torchrun every rank gets the signal (from torchrun, and from the terminal or the scheduler
too): signals within `COALESCE_S` of each other count as one there, and the ranks agree at each
step boundary whether any of them was asked to stop, so all stop at the same step."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transformers import TrainerCallback

from tunelab import distributed

log = logging.getLogger("tunelab")

COALESCE_S = 2.0


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the run."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class AbandonWrite(Interrupted):
    """A third signal: stop without waiting for the checkpoint being written."""


class StopOnSignal(TrainerCallback):
    """Installed for the whole run; `received` holds the signal once one came."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.training = False
        self.count = 0
        self._pending: int | None = None
        self._deferring = False
        self._previous: dict[int, Any] = {}
        self._coalesce = distributed.world_size() > 1
        self._last = -COALESCE_S

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopOnSignal:
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal that would stop the run inside the block is held until `raise_pending`
        (a third one during training is not: it abandons the checkpoint in flight)."""
        outer, self._deferring = self._deferring, True
        try:
            yield
        finally:
            self._deferring = outer

    def raise_pending(self) -> None:
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise Interrupted(signum)

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self._coalesce and now - self._last < COALESCE_S:
            return  # the same stop, relayed by torchrun or sent to the whole group
        self._last = now
        self.count += 1
        name = signal.Signals(signum).name
        if self.count >= 3 and self.received is not None:
            log.warning("%s again: stopping without waiting for the checkpoint in flight", name)
            raise AbandonWrite(signum)  # even inside `deferred`: the user insists
        if self.training and self.received is None:
            self.received = signum
            log.warning("%s received: checkpointing at the next step, then stopping", name)
            return
        # Not in the loop yet, or a second signal: stop now, or once the deferred block ends.
        if self._deferring:
            self._pending = signum
            return
        raise Interrupted(signum)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if args.world_size > 1 and distributed.any_rank(self.received is not None):
            self.received = self.received or signal.SIGTERM  # another rank's signal
        if self.received is not None:
            control.should_save = True  # even with checkpoint=none: preemption resumes
            control.should_training_stop = True
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = False
