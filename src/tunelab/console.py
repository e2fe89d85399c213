"""What a run prints: tunelab's own lines and one progress bar, the libraries' chatter kept to
`train.log`.

By default the console shows tunelab's log lines (INFO and up) and the warnings and errors of
every library; the libraries' INFO lines (MLflow's system-metrics monitor, its migrations, ...)
and Trainer's raw metric dicts go to `train.log` only, and the libraries' own progress bars
(`Map`, `Loading weights`, `Downloading artifacts`) are off. One bar counts the run's steps with
the latest loss and eval metrics in its postfix; log lines print above it. `hydra.verbose=true`
(or `tunelab train -v`) shows everything, as the libraries print it.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

log = logging.getLogger("tunelab")
# Trainer's metric dicts, as Trainer would print them: for train.log.
trainer_log = logging.getLogger("tunelab.trainer_logs")

# What the postfix leaves out: Trainer's bookkeeping.
_NOT_SHOWN = ("_runtime", "_per_second", "_preparation_time")


class _OwnLinesAndWarnings(logging.Filter):
    """The console's filter: tunelab's lines, and any logger's warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == "tunelab" or record.name.startswith("tunelab.")
        return record.levelno >= logging.WARNING or (own and record.name != trainer_log.name)


_FILTER = _OwnLinesAndWarnings()


VERBOSE = "TUNELAB_VERBOSE"  # set by `tunelab train -v`


def verbose() -> bool:
    """`tunelab train -v`, or Hydra's `hydra.verbose`: the libraries print as they would."""
    if os.environ.get(VERBOSE):
        return True
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and bool(HydraConfig.get().verbose)


def quiet_libraries() -> None:
    """Set the console as the module says, unless `verbose()` (every job of a sweep calls it:
    it is idempotent)."""
    if verbose():
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow guesses a dataset's source type and warns that a local file could be several.
    warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
    import datasets
    import mlflow  # noqa: F401 (its import sets up its loggers' handlers, quieted below)
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    _filter_console()
    # MLflow's loggers print through their own handler (not the root's): WARNING and up on the
    # console, everything in the run's log file.
    mlflow_log = logging.getLogger("mlflow")
    for handler in mlflow_log.handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    job_ended()  # an earlier job's log file, if it was not taken back
    _lent[:] = files
    for handler in files:
        mlflow_log.addHandler(handler)


def _filter_console() -> None:
    """The root logger's console handlers pass only tunelab's lines and warnings."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler) and _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


_lent: list[logging.Handler] = []  # the run's log file handlers lent to MLflow's logger


def job_ended() -> None:
    """Take back the job's log file from MLflow's logger: the next job logs elsewhere, and this
    one's directory may be removed (a run refused before it started)."""
    mlflow_log = logging.getLogger("mlflow")
    for handler in _lent:
        mlflow_log.removeHandler(handler)
    _lent.clear()


def progress_callback(enabled: bool) -> Any:
    """The callback that replaces Trainer's console output (its ProgressCallback or
    PrinterCallback): the bar when `enabled`, else only Trainer's dicts in train.log."""
    from transformers import TrainerCallback

    class ProgressBar(TrainerCallback):
        """One bar over the run's steps (rank 0); the latest loss and eval metrics in its
        postfix; log lines printed above it while it runs."""

        def __init__(self) -> None:
            self.bar: Any = None
            self.shown: dict[str, str] = {}
            self.redirect: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not (enabled and state.is_world_process_zero):
                return
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.redirect = logging_redirect_tqdm()
            self.redirect.__enter__()
            _filter_console()  # the redirect's handler too
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train",
                            dynamic_ncols=True, leave=True)  # fmt: skip

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            trainer_log.info("step %d: %s", state.global_step, logs)
            if self.bar is None:
                return
            for key, value in logs.items():
                wanted = key == "loss" or (key.startswith("eval_") and not key.endswith(_NOT_SHOWN))
                if wanted and isinstance(value, (int, float)):
                    name = key if key in ("loss", "eval_loss") else key.removeprefix("eval_")
                    self.shown[name] = f"{value:.3g}"
            self.bar.set_postfix(self.shown, refresh=False)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if self.redirect is not None:
                self.redirect.__exit__(None, None, None)
                self.redirect = None

    return ProgressBar()


def replace_trainer_output(trainer: Any, progress_bar: bool) -> None:
    """Trainer's own console output (its bar, its eval bar, its printed dicts) replaced, unless
    `verbose()`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if verbose():
        return
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress_callback(progress_bar))
