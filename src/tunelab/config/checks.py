"""Validation of a composed config: the schema, then the combinations no single key shows
(a strategy without its metric, a metric the task does not report), then what the config points
at on disk (model and data paths, the output root). Pure Python: nothing heavy is imported."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tunelab import metrics
from tunelab.config.schema import check_types


class ConfigError(ValueError):
    """The config has problems; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def validate(cfg: DictConfig | dict[str, Any]) -> list[str]:
    """Every problem in the config, one line each (empty when the config is valid)."""
    try:
        plain = resolved(cfg)
    except Exception as exc:  # an interpolation that does not resolve
        return [f"config: cannot resolve: {exc}".splitlines()[0]]
    problems = check_types(plain)
    if not problems:
        _check_combinations(plain, problems)
    return problems


def resolved(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The config as plain, resolved Python data, Hydra's own keys aside."""
    body = {k: v for k, v in cfg.items() if k != "hydra"}
    plain = OmegaConf.to_container(OmegaConf.create(body), resolve=True)
    assert isinstance(plain, dict)  # created from a mapping
    return {str(k): v for k, v in plain.items()}


def check(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem in `cfg`."""
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)


def _check_combinations(c: dict[str, Any], problems: list[str]) -> None:
    model, data, ck, tr = c["model"], c["data"], c["checkpoint"], c["training"]
    if model["name_or_path"] is None and not model["arch"]:
        problems.append("model: set model.name_or_path (a local dir or hub id) or model.arch")
    if tr["max_steps"] == 0:
        problems.append("training.max_steps: 0 trains nothing; use a positive count or -1 (epochs)")
    if ck["strategy"] == "steps" and ck["every"] is None:
        problems.append("checkpoint.every: required with checkpoint=steps (e.g. 500)")
    has_eval = data.get("eval_size", 0) > 0 or data.get("eval") or data.get("eval_fraction", 0) > 0
    if ck["strategy"] == "best":
        if not ck["metric"]:
            problems.append("checkpoint.metric: required with checkpoint=best (e.g. eval_loss)")
        if not has_eval:
            problems.append("checkpoint=best: needs an eval set (data.eval or data.eval_size > 0)")
    uploads = c["tracking"]["log_checkpoints"]
    if uploads != "none" and ck["strategy"] == "none":
        problems.append(
            f"tracking.log_checkpoints={uploads}: there are no checkpoints with checkpoint=none; "
            "use checkpoint=steps|epoch|best or tracking.log_checkpoints=none"
        )
    metric = ck["metric"]
    if metric and (ck["strategy"] == "best" or ck["keep_best"] or uploads == "best"):
        reported = metrics.produced(model["task"])
        if metrics.eval_name(metric) not in reported:
            problems.append(
                f"checkpoint.metric: {metric!r} is not produced by this task; "
                f"one of {', '.join(reported)}"
            )
    if uploads == "best" and not metric:
        problems.append("tracking.log_checkpoints=best: needs checkpoint.metric (e.g. eval_loss)")
    resume = c["resume"]
    if resume not in ("auto", "never") and not Path(resume).exists():
        problems.append(f"resume: {resume!r} is not auto, never or an existing checkpoint path")
    positions = (model["arch"] or {}).get("n_positions")
    if positions and not model["name_or_path"] and data["max_length"] > positions:
        problems.append(
            f"data.max_length: {data['max_length']} is longer than the model's "
            f"model.arch.n_positions={positions}; lower it or raise n_positions"
        )
    if model["name_or_path"]:
        problems.extend(_model_source_problems(model))
    if data["type"] == "files":
        for key in ("train", "eval"):
            path = data[key]
            if path and path != "???" and not Path(path).expanduser().is_file():
                problems.append(f"data.{key}: {path} does not exist (a .jsonl, .json or .txt file)")
    problems.extend(_output_problems(c["output"]["root"]))


def _model_source_problems(model: dict[str, Any]) -> list[str]:
    """A local model directory must hold safetensors weights (pickle only with allow_pickle);
    a hub id needs the hub, which is named plainly when offline."""
    from tunelab.artifacts import PICKLE_SUFFIXES
    from tunelab.tracking.store import MODEL_URI_SCHEMES

    source = str(model["name_or_path"])
    if source.startswith(MODEL_URI_SCHEMES):
        return []
    path = Path(source).expanduser()
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if not any(
            n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names
        ):
            pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
            if not pickles:
                return [f"model.name_or_path: {path} holds no weights (model.safetensors)"]
            if not model["allow_pickle"]:
                return [
                    f"model.name_or_path: {path} holds only pickle weights "
                    f"({', '.join(pickles)}); unpickling can run arbitrary code. Convert them to "
                    "safetensors, or set model.allow_pickle=true if you trust where they came from"
                ]
        if "config.json" not in names:
            return [f"model.name_or_path: {path} has no config.json (not a saved model directory)"]
        return []
    looks_like_path = source.startswith(("/", ".", "~")) or source.count("/") > 1
    if looks_like_path:
        return [f"model.name_or_path: {source} does not exist (a local model directory)"]
    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    if offline and not _in_hub_cache(source):
        return [
            f"model.name_or_path: {source!r} looks like a Hugging Face hub id, but the hub is "
            "offline (HF_HUB_OFFLINE) and it is not in the local cache; give a local directory "
            "(one saved with save_pretrained, or a run's outputs/.../model), or an MLflow "
            "runs:/ or models:/ URI"
        ]
    return []


def _in_hub_cache(repo_id: str) -> bool:
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    return (cache / f"models--{repo_id.replace('/', '--')}").is_dir()


def _output_problems(root: str) -> list[str]:
    """The output root must be creatable and writable; checked on its nearest existing
    ancestor, without creating anything."""
    path = Path(root).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"output.root: {path}: {existing} is a file, not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"output.root: {path} is not writable ({existing} does not allow writing)"]
    try:
        probe = os.statvfs(existing)
    except OSError:
        return []
    if probe.f_flag & os.ST_RDONLY:
        return [f"output.root: {path} is on a read-only filesystem"]
    free = probe.f_bavail * probe.f_frsize
    if free < _MIN_FREE:
        return [f"output.root: {path} is full ({free // 1024} KiB free); free space or move it"]
    return []


_MIN_FREE = 256 * 1024  # not even the run's config files would fit
