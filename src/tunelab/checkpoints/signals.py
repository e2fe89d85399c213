"""SIGTERM/SIGINT: checkpoint at the next step boundary, then stop (KILLED in MLflow, and the
same command resumes). Before training starts, a signal interrupts at once."""

from __future__ import annotations

import logging
import signal
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("tunelab")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the run after a checkpoint was written."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class StopOnSignal(TrainerCallback):
    """Installed for the whole run; `received` holds the signal once one came."""

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

    def __enter__(self) -> StopOnSignal:
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.training or self.received is not None:
            raise Interrupted(signum)  # not in the loop yet, or a second signal: stop now
        self.received = signum
        name = signal.Signals(signum).name
        log.warning("%s received: checkpointing at the next step, then stopping", name)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.received is not None:
            control.should_save = True  # even with checkpoint=none: preemption resumes
            control.should_training_stop = True
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = False
