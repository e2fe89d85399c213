"""Metric names, directions and default objectives for every task, and their computation.

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
}
TASKS = tuple(TASK_METRICS)

# Metrics where larger is better; anything else (losses, perplexity) is minimised.
_MAXIMISED = ("accuracy", "exact_match", "f1", "precision", "recall", "bleu", "rouge")

# The columns `tunelab runs` shows.
SUMMARY = ("eval_exact_match", "eval_loss")


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
    prompt/completion data, else the eval loss (else the train loss, for a run without an eval
    set, once its metrics are known)."""
    preferred = ["eval_exact_match"] if has_completions else []
    preferred += ["eval_loss"]
    if metrics is None:
        return preferred[0]
    for name in [*preferred, "train_loss"]:
        if name in metrics:
            return name
    return "eval_loss"


def final(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The evaluation metrics of a finished run (linked to its Logged Model)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith("eval_") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# ---------------------------------------------------------------------------------------------
# Computation (causal LM): Trainer's compute_metrics and preprocess_logits_for_metrics.

IGNORE = -100  # label of a token that carries no loss


def argmax_logits(logits: Any, labels: Any) -> Any:
    """Keep only the predicted token ids, so evaluation does not hold every logit in memory."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def causal_lm(has_completions: bool) -> Any:
    """compute_metrics for Trainer: token accuracy, plus exact match for prompt/completion rows.

    Under teacher forcing a row whose every answer token is the argmax is exactly the row that
    greedy decoding would reproduce, so this exact match equals greedy generation's, without
    generating.
    """
    import numpy as np

    def compute(eval_pred: Any) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        preds, labels = preds[:, :-1], labels[:, 1:]
        mask = labels != IGNORE
        hit = (preds == labels) & mask
        out = {"token_accuracy": float(hit.sum() / max(mask.sum(), 1))}
        if has_completions:
            rows = mask.any(axis=1)
            exact = np.all(hit | ~mask, axis=1) & rows
            out["exact_match"] = float(exact.sum() / max(rows.sum(), 1))
        return out

    return compute
