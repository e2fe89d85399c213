"""Validation of a composed config: the schema, then the combinations no single key shows
(a strategy without its metric, a metric the task does not report), then what the config points
at on disk (model and data paths, the output root). Pure Python: nothing heavy is imported."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tunelab import metrics
from tunelab.config.schema import check_types
from tunelab.constants import PICKLE_SUFFIXES
from tunelab.errors import ConfigError


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
    if resume not in ("auto", "never"):
        problems.extend(_resume_problems(resume))
    problems.extend(_arch_problems(model["arch"] or {}))
    problems.extend(_peft_problems(c["peft"], c["resume"]))
    problems.extend(_tracking_problems(c["tracking"]))
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
            spec = data[key]
            if spec and spec != "???":
                problems.extend(_data_file_problems(f"data.{key}", spec))
    problems.extend(_writable_problems("output.root", c["output"]["root"]))


def _resume_problems(resume: str) -> list[str]:
    path = Path(resume).expanduser()
    if not path.exists():
        return [f"resume: {resume!r} is not auto, never or an existing checkpoint path"]
    if not (path / "manifest.json").is_file():
        return [
            f"resume: {resume} is not a tunelab checkpoint (no manifest.json); give a "
            "checkpoints/checkpoint-<step> directory, or auto or never"
        ]
    return []


def _data_file_problems(key: str, spec: str | list[str]) -> list[str]:
    """Files that do not exist, a glob matching nothing, an unknown format, a directory not
    written by save_to_disk, a hub id while offline (tunelab.data.resolve, nothing read)."""
    from tunelab import data  # light at import; here to keep config free of a cycle

    return data.spec_problems(key, spec)


# Pairs of (width, heads) keys that must divide, in the config spellings transformers uses.
_HEADS = (("n_embd", "n_head"), ("hidden_size", "num_attention_heads"), ("d_model", "n_heads"))


def _arch_problems(arch: dict[str, Any]) -> list[str]:
    """Shapes a model built from `model.arch` cannot have."""
    problems = []
    for key, value in arch.items():
        count = key.startswith(("n_", "num_")) or key.endswith(("_size", "_dim"))
        if count and isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            problems.append(f"model.arch.{key}: {value} must be positive")
    for width, heads in _HEADS:
        w, h = arch.get(width), arch.get(heads)
        if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0 and w % h:
            problems.append(
                f"model.arch.{heads}: {h} does not divide model.arch.{width}={w}; "
                f"use a divisor of {w} (e.g. {_divisor_near(w, h)})"
            )
    return problems


def _divisor_near(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - near))


def _peft_problems(peft: dict[str, Any], resume: str) -> list[str]:
    problems = []
    lora = peft["method"] != "none"
    ckpt = Path(resume).expanduser()
    if resume not in ("auto", "never") and (ckpt / "manifest.json").is_file():
        adapter = (ckpt / "adapter_config.json").is_file()
        if adapter != lora:  # Trainer would load nothing of it, silently
            held = "a LoRA adapter (peft=lora)" if adapter else "a full model (peft=none)"
            problems.append(
                f"resume: {resume} holds {held}; resume it with the peft it was trained with"
            )
    if not lora:
        return problems
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        problems.append(f"peft={peft['method']}: needs the peft package (pip install 'peft>=0.17')")
    targets = peft["target_modules"]
    names = targets if isinstance(targets, list) else [targets]
    if targets is not None and (not names or not all(isinstance(n, str) and n for n in names)):
        problems.append(
            f"peft.target_modules: {targets!r} is not a list of module names (e.g. "
            "[q_proj,v_proj]), a regex, or null (the model type's default)"
        )
    return problems


# Schemes MLflow can track to; a bare path is a local file store.
_STORE_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
_EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._ @+=-]{0,199}$")


def _tracking_problems(tracking: dict[str, Any]) -> list[str]:
    problems = []
    name = tracking["experiment"]
    # The experiment names the run directory's parent: it must stay one safe path component.
    if not _EXPERIMENT_NAME.match(name) or name in (".", ".."):
        problems.append(
            f"tracking.experiment: {name!r} is not a usable name; use 1 to 200 letters, digits "
            "and . _ - @ + = or spaces, starting with a letter, digit or _ (no / or ..)"
        )
    uri = tracking["uri"]
    if tracking["backend"] == "none" or not uri:
        return problems
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else None
    if scheme is not None and scheme not in _STORE_SCHEMES:
        problems.append(
            f"tracking.uri: {uri!r}: unknown scheme {scheme!r}; use one of "
            f"{', '.join(s + '://' for s in _STORE_SCHEMES)}, or a path to a .db file"
        )
    elif uri.startswith("sqlite:///") or (scheme is None and uri.endswith(".db")):
        db = Path(uri.removeprefix("sqlite:///")).expanduser()
        # sqlite writes its journal beside the database: the directory must be writable too.
        found = _writable_problems("tracking.uri", str(db.parent))
        if not found and db.is_dir():
            found = [f"tracking.uri: {db} is a directory, not a sqlite database file"]
        elif not found and db.exists() and not os.access(db, os.W_OK):
            found = [f"tracking.uri: {db} is not writable"]
        problems.extend(found)
    return problems


def _model_source_problems(model: dict[str, Any]) -> list[str]:
    """A local model directory must hold safetensors weights (pickle only with allow_pickle);
    a hub id needs the hub, which is named plainly when offline."""
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


def _writable_problems(key: str, root: str) -> list[str]:
    """The directory `root` must be creatable and writable; checked on its nearest existing
    ancestor, without creating anything."""
    path = Path(root).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"{key}: {path}: {existing} is a file, not a directory"]
    try:
        probe = os.statvfs(existing)
    except OSError:
        probe = None
    if probe is not None and probe.f_flag & os.ST_RDONLY:
        return [f"{key}: {path} is on a read-only filesystem"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{key}: {path} is not writable ({existing} does not allow writing)"]
    free = probe.f_bavail * probe.f_frsize if probe is not None else _MIN_FREE
    if free < _MIN_FREE:
        return [f"{key}: {path} is full ({free // 1024} KiB free); free space or move it"]
    return []


_MIN_FREE = 256 * 1024  # not even the run's config files would fit
