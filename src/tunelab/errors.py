"""Every error tunelab reports to its user, in one place: each says what is wrong in one line
(or one line per problem) and carries the exit code of a process it stops, so `cli` maps an
exception to its exit by its base class. The ground floor: imports nothing of tunelab."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of what `exc` says (its type's name when it says nothing): libraries'
    messages run to many lines, tunelab's say one."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class TunelabError(Exception):
    """A failure tunelab explains in one line; the process exits with `exit_code`."""

    exit_code = 1

    def lines(self) -> list[str]:
        """What the command prints for it, one line each."""
        return [f"tunelab: {self}"]


class ConfigError(TunelabError, ValueError):
    """The config has problems; `problems` holds one line per problem. Nothing was created."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))

    def lines(self) -> list[str]:
        return [f"tunelab: config error: {p}" for p in self.problems]


class DataError(ConfigError):
    """A data file that cannot be used; the message names the key, the file and the line."""

    def __init__(self, message: str) -> None:
        super().__init__([message])


class ModelError(ConfigError):
    """model.name_or_path cannot be loaded; one line saying why, not transformers' traceback."""

    def __init__(self, source: str, exc: Exception) -> None:
        super().__init__(
            [
                f"model.name_or_path: cannot load {source!r}: {first_line(exc)}. Offline, or a "
                "hub id without the hub? Give a local model directory"
            ]
        )


class TrackingUnavailable(TunelabError, RuntimeError):
    """The tracking store cannot be reached, or refused the run; raised before anything is
    trained."""

    def lines(self) -> list[str]:
        return [
            f"tunelab: {self}. Start it, point tracking.uri elsewhere, or set "
            "tracking.required=false to train now and upload later."
        ]


class ModelNotFound(TunelabError, RuntimeError):
    """A run id, runs:/ or models:/ URI the store does not have (or cannot serve)."""


class Busy(TunelabError, RuntimeError):
    """Another live process holds the lock (of a run directory, a cache entry, a server)."""


class CheckpointWriteFailed(TunelabError, RuntimeError):
    """A checkpoint write failed (disk full, permissions); older checkpoints are intact."""

    def lines(self) -> list[str]:
        return [f"tunelab: {self} Fix that and run the same command again to resume."]


class IncompleteCheckpoint(TunelabError, RuntimeError):
    """A checkpoint directory that lacks files a resume needs: never committed."""


class ServerError(TunelabError, RuntimeError):
    """Why the team server cannot start or stopped: one line, said as it is."""


class ModelRefused(TunelabError):
    """A model directory `generate`/`predict` will not load, or input it cannot take."""


class RankStopped(TunelabError):
    """Under several processes: rank 0 stopped the run before this rank could go on, and said
    why itself; this rank stops with rank 0's exit code, silently."""

    def __init__(self, exit_code: int) -> None:
        self.exit_code = exit_code
        super().__init__(f"rank 0 stopped the run (exit {exit_code})")

    def lines(self) -> list[str]:
        return []


class TrialPruned(Exception):  # noqa: N818 (Optuna's name for the same event)
    """Not a failure: the sweep's pruner stopped this trial's job at `step` (a checkpoint was
    written there), judging `metric`'s `value` hopeless beside the other trials'."""

    def __init__(self, step: int, value: float, metric: str) -> None:
        self.step, self.value, self.metric = step, value, metric
        super().__init__(f"pruned at step {step} ({metric}={value:.4g})")


def exit_code(exc: BaseException) -> int:
    """The exit code a process stopped by `exc` ends with (1 for anything unknown)."""
    return int(exc.exit_code) if isinstance(exc, TunelabError) else 1
