"""Checkpoint strategy: how `checkpoint.*` maps onto Trainer's save arguments."""

from __future__ import annotations

from typing import Any

# Metrics where larger is better; anything else (losses, perplexity) is minimised.
_MAXIMISED = ("accuracy", "exact_match", "f1", "bleu", "rouge")


def mode_for(metric: str, mode: str | None) -> str:
    """`mode` if set, else inferred from the metric's name (min for losses, max for accuracies)."""
    if mode:
        return mode
    return "max" if any(word in metric for word in _MAXIMISED) else "min"


def trainer_arguments(cfg: Any) -> dict[str, Any]:
    """TrainingArguments for `cfg` (the `checkpoint` group): save_strategy, save_steps,
    save_total_limit and, for `best`, the metric that decides."""
    strategy = cfg.strategy
    if strategy == "none":
        return {"save_strategy": "no"}
    args: dict[str, Any] = {"save_strategy": strategy, "save_total_limit": cfg.keep}
    if strategy == "steps":
        args["save_steps"] = cfg.every
    if strategy == "best":
        metric = cfg.metric if cfg.metric.startswith("eval_") else f"eval_{cfg.metric}"
        args["metric_for_best_model"] = metric
        args["greater_is_better"] = mode_for(metric, cfg.mode) == "max"
    return args
