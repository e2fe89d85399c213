"""The `checkpoint` group's strategy (steps, epoch, best, none) as TrainingArguments' save
settings. Light: the CLI and the run's setup import it without transformers."""

from __future__ import annotations

from typing import Any

from tunelab import metrics


def trainer_arguments(cfg: Any) -> dict[str, Any]:
    """TrainingArguments for the `checkpoint` group. Trainer's own rotation is off
    (save_total_limit=None): `rotate` runs after each commit instead."""
    strategy = cfg.strategy
    if strategy == "none":
        return {"save_strategy": "no"}
    args: dict[str, Any] = {"save_strategy": strategy, "save_total_limit": None}
    if strategy == "steps":
        args["save_steps"] = cfg.every
    if strategy == "best":
        metric = metrics.eval_name(cfg.metric)
        args["metric_for_best_model"] = metric
        args["greater_is_better"] = metrics.mode(metric, cfg.mode) == "max"
    return args
