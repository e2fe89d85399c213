"""Validation of a composed config's values: the schema, then the combinations no single key
shows (a strategy without its metric, a metric the task does not report, a head count that does
not divide the width). Nothing here looks at the disk or the environment: what the config points
at (model and data paths, the output root, the store's file) is tunelab.preflight's to check.
Pure Python: nothing heavy is imported."""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tunelab import metrics
from tunelab.config.schema import check_types
from tunelab.errors import first_line


def problems(cfg: DictConfig | dict[str, Any]) -> list[str]:
    """Every problem with the config's values, one line each (empty when they are valid)."""
    return check_values(cfg)[1]


def check_values(cfg: DictConfig | dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """The config as plain, resolved Python data when it resolves and every key has the type
    the schema gives it (what a check of the paths it names can read), else None; and every
    problem with its values, one line each."""
    try:
        plain = resolved(cfg)
    except Exception as exc:  # an interpolation that does not resolve
        return None, [f"config: cannot resolve: {first_line(exc)}"]
    found = check_types(plain)
    return (None, found) if found else (plain, _combination_problems(plain))


def resolved(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The config as plain, resolved Python data, Hydra's own keys aside."""
    body = {k: v for k, v in cfg.items() if k != "hydra"}
    plain = OmegaConf.to_container(OmegaConf.create(body), resolve=True)
    assert isinstance(plain, dict)  # created from a mapping
    return {str(k): v for k, v in plain.items()}


def _combination_problems(c: dict[str, Any]) -> list[str]:
    found: list[str] = []
    model, data, ck, tr = c["model"], c["data"], c["checkpoint"], c["training"]
    if model["name_or_path"] is None and not model["arch"]:
        found.append("model: set model.name_or_path (a local dir or hub id) or model.arch")
    if tr["max_steps"] == 0:
        found.append("training.max_steps: 0 trains nothing; use a positive count or -1 (epochs)")
    if ck["strategy"] == "steps" and ck["every"] is None:
        found.append("checkpoint.every: required with checkpoint=steps (e.g. 500)")
    has_eval = data.get("eval_size", 0) > 0 or data.get("eval") or data.get("eval_fraction", 0) > 0
    if ck["strategy"] == "best":
        if not ck["metric"]:
            found.append("checkpoint.metric: required with checkpoint=best (e.g. eval_loss)")
        if not has_eval:
            found.append("checkpoint=best: needs an eval set (data.eval or data.eval_size > 0)")
    if tr.get("early_stopping_patience") is not None:
        if not has_eval:
            found.append(
                "training.early_stopping_patience: needs an eval set (data.eval or "
                "data.eval_size > 0)"
            )
        if tr["eval_every"] == 0:
            found.append(
                "training.early_stopping_patience: needs evaluations during training; set "
                "training.eval_every (e.g. 200)"
            )
    uploads = c["tracking"]["log_checkpoints"]
    if uploads != "none" and ck["strategy"] == "none":
        found.append(
            f"tracking.log_checkpoints={uploads}: there are no checkpoints with checkpoint=none; "
            "use checkpoint=steps|epoch|best or tracking.log_checkpoints=none"
        )
    metric = ck["metric"]
    if metric and (ck["strategy"] == "best" or ck["keep_best"] or uploads == "best"):
        reported = metrics.produced(model["task"])
        if metrics.eval_name(metric) not in reported:
            found.append(
                f"checkpoint.metric: {metric!r} is not produced by this task; "
                f"one of {', '.join(reported)}"
            )
    objective = c["sweep"].get("objective")
    if objective and objective not in (*metrics.produced(model["task"]), "train_loss"):
        found.append(
            f"sweep.objective: {objective!r} is not reported by a {model['task']} run; use one "
            f"of {', '.join((*metrics.produced(model['task']), 'train_loss'))}"
        )
    if uploads == "best" and not metric:
        found.append("tracking.log_checkpoints=best: needs checkpoint.metric (e.g. eval_loss)")
    found.extend(_arch_problems(model["arch"] or {}))
    found.extend(_peft_problems(c["peft"]))
    found.extend(_tracking_problems(c["tracking"]))
    positions = (model["arch"] or {}).get("n_positions")
    if positions and not model["name_or_path"] and data["max_length"] > positions:
        found.append(
            f"data.max_length: {data['max_length']} is longer than the model's "
            f"model.arch.n_positions={positions}; lower it or raise n_positions"
        )
    return found


# Pairs of (width, heads) keys that must divide, in the config spellings transformers uses.
_HEADS = (("n_embd", "n_head"), ("hidden_size", "num_attention_heads"), ("d_model", "n_heads"))


def _arch_problems(arch: dict[str, Any]) -> list[str]:
    """Shapes a model built from `model.arch` cannot have."""
    found = []
    for key, value in arch.items():
        count = key.startswith(("n_", "num_")) or key.endswith(("_size", "_dim"))
        if count and isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            found.append(f"model.arch.{key}: {value} must be positive")
    for width, heads in _HEADS:
        w, h = arch.get(width), arch.get(heads)
        if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0 and w % h:
            found.append(
                f"model.arch.{heads}: {h} does not divide model.arch.{width}={w}; "
                f"use a divisor of {w} (e.g. {_divisor_near(w, h)})"
            )
    return found


def _divisor_near(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - near))


def _peft_problems(peft: dict[str, Any]) -> list[str]:
    if peft["method"] == "none":
        return []
    targets = peft["target_modules"]
    names = targets if isinstance(targets, list) else [targets]
    if targets is not None and (not names or not all(isinstance(n, str) and n for n in names)):
        return [
            f"peft.target_modules: {targets!r} is not a list of module names (e.g. "
            "[q_proj,v_proj]), a regex, or null (the model type's default)"
        ]
    return []


# Schemes MLflow can track to; a bare path is a local file store.
_STORE_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
_EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._ @+=-]{0,199}$")


def _tracking_problems(tracking: dict[str, Any]) -> list[str]:
    found = []
    name = tracking["experiment"]
    # The experiment names the run directory's parent: it must stay one safe path component.
    if not _EXPERIMENT_NAME.match(name) or name in (".", ".."):
        found.append(
            f"tracking.experiment: {name!r} is not a usable name; use 1 to 200 letters, digits "
            "and . _ - @ + = or spaces, starting with a letter, digit or _ (no / or ..)"
        )
    uri = tracking["uri"]
    if tracking["backend"] == "none" or not uri:
        return found
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else None
    if scheme is not None and scheme not in _STORE_SCHEMES:
        found.append(
            f"tracking.uri: {uri!r}: unknown scheme {scheme!r}; use one of "
            f"{', '.join(s + '://' for s in _STORE_SCHEMES)}, or a path to a .db file"
        )
    return found
