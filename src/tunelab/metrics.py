"""Metric names, directions and default objectives for every task (each task's module in
tunelab.tasks computes them).

Everything that needs to know which metrics a task reports, which way is better, or what a sweep
optimises by default asks here: the config checks, checkpoint rotation, sweeps, the Optuna
sweeper, `tunelab runs` and tracking.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Mode = Literal["min", "max"]

# What evaluation reports per task (Trainer prefixes every eval metric with `eval_`).
# Exact match needs prompt/completion rows.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("eval_loss", "eval_token_accuracy", "eval_exact_match"),
    # eval_rmse instead of accuracy and F1 for a regression (number labels).
    "sequence_classification": ("eval_loss", "eval_accuracy", "eval_f1", "eval_rmse"),
    # Entity-level precision/recall/F1 (seqeval) and tag accuracy.
    "token_classification": (
        "eval_loss",
        "eval_accuracy",
        "eval_precision",
        "eval_recall",
        "eval_f1",
    ),
}
TASKS = tuple(TASK_METRICS)

# Metrics where larger is better; anything else (losses, perplexity) is minimised.
_MAXIMISED = ("accuracy", "exact_match", "f1", "precision", "recall", "bleu", "rouge")

# The columns `tunelab runs` shows for each task's runs (the listed runs' tasks together, and
# each run's objective when it is another metric).
SHOWN: dict[str, tuple[str, ...]] = {
    "causal_lm": ("eval_exact_match", "eval_loss"),
    "sequence_classification": ("eval_accuracy", "eval_f1", "eval_loss"),
    "token_classification": ("eval_f1", "eval_accuracy", "eval_loss"),
}


def columns(tasks: list[str | None], objectives: list[str | None]) -> list[str]:
    """The metric columns for runs of `tasks` (in order of first appearance) that optimise
    `objectives`: each task's own, then any objective not among them; eval_loss last."""
    found: list[str] = []
    for name in [m for task in tasks for m in SHOWN.get(task or "", ())] + list(objectives):
        if name and name not in found:
            found.append(name)
    return [m for m in found if m != "eval_loss"] + (["eval_loss"] if found else [])


def eval_name(metric: str) -> str:
    """`loss` and `eval_loss` both name the evaluation metric `eval_loss`."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def mode(metric: str, explicit: str | None = None) -> Mode:
    """`explicit` if set, else inferred from the name: max for accuracies, min for losses."""
    if explicit == "min":
        return "min"
    if explicit == "max":
        return "max"
    return "max" if any(word in metric for word in _MAXIMISED) else "min"


def optuna_direction(metric: str, explicit: str | None = None) -> str:
    """The same direction in Optuna's (and tunelab's tags') words."""
    return {"min": "minimize", "max": "maximize"}[mode(metric, explicit)]


def produced(task: str) -> tuple[str, ...]:
    return TASK_METRICS.get(task, ())


def default_objective(
    task: str, has_completions: bool, metrics: Mapping[str, Any] | None = None
) -> str:
    """What a sweep ranks jobs by when `sweep.objective` is unset: exact match for
    prompt/completion data, F1 for classification and tagging, else the eval loss (else the
    train loss, for a run without an eval set, once its metrics are known)."""
    if task == "causal_lm":
        preferred = ["eval_exact_match"] if has_completions else []
    else:
        preferred = ["eval_f1"]
    preferred += ["eval_loss"]
    if metrics is None:
        return preferred[0]
    for name in [*preferred, "train_loss"]:
        if name in metrics:
            return name
    return "eval_loss"


# What Trainer logs about its own bookkeeping (running time, rates, FLOPs, epochs, tokens): kept
# as run tags (`trainer.<name>`, the latest value), out of the metric charts, which lead with
# the loss and the task's metrics.
BOOKKEEPING = (
    "epoch", "total_flos", "num_input_tokens_seen", "train_runtime", "train_samples_per_second",
    "train_steps_per_second", "train_tokens_per_second", "eval_runtime",
    "eval_samples_per_second", "eval_steps_per_second",
)  # fmt: skip


def final(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The evaluation metrics of a finished run (linked to its Logged Model), its bookkeeping
    left out."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith("eval_")
        and k not in BOOKKEEPING
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    }


IGNORE = -100  # label of a token (or a word piece) that carries no loss
