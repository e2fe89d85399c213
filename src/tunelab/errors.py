"""The errors tunelab reports to its user: each one line per problem, each with its exit code.
The ground floor: imports nothing of tunelab."""

from __future__ import annotations


class TunelabError(Exception):
    """A failure tunelab explains in one line; the process exits with `exit_code`."""

    exit_code = 1


class ConfigError(TunelabError, ValueError):
    """The config has problems; `problems` holds one line per problem."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class RankStopped(TunelabError):
    """Under several processes: rank 0 stopped the run before this rank could go on, and said
    why itself; this rank stops with rank 0's exit code, silently."""

    def __init__(self, exit_code: int) -> None:
        self.exit_code = exit_code
        super().__init__(f"rank 0 stopped the run (exit {exit_code})")


def exit_code(exc: BaseException) -> int:
    """The exit code a process stopped by `exc` ends with (1 for anything unknown)."""
    return int(getattr(exc, "exit_code", 1)) if isinstance(exc, TunelabError) else 1
