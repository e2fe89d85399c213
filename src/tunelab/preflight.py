"""Preflight: every config `tunelab train ARGS` would run, checked before Hydra starts (so before
any directory, MLflow run or heavy import): its values (tunelab.config), then what it points at
on disk: the checkpoint to resume, the model directory (safetensors weights, or pickle only when
allowed) or hub id (offline: only from the cache), the data files (tunelab.data.sources), the
sqlite store's directory and the output root (writable, not full), and the peft package when
LoRA is asked for. Nothing is read beyond a directory listing, nothing is created.

A config preflight found valid is marked (by a digest in TUNELAB_VALIDATED, which launcher workers
inherit; set and read only here), so the job that runs it does not check it again; a job
preflight could not foresee (a sweeper's choice, a grid too big to expand) checks its own.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tunelab import config
from tunelab.constants import MODEL_URI_SCHEMES, PICKLE_SUFFIXES
from tunelab.data.sources import spec_problems
from tunelab.errors import ConfigError

_CHECKED_ENV = "TUNELAB_VALIDATED"


def check_jobs(args: Sequence[str]) -> list[str]:
    """One line per problem in the configs `tunelab train ARGS` would train: for `-m`, every
    job's (the grid expanded, search-space ends for a sweeper's `interval`). Empty when all are
    valid, or when ARGS ask Hydra for something else (`--cfg`, `--help`, ...: Hydra answers)."""
    if not config.trains(args):
        return []
    multirun = any(a.startswith("-") for a in args)
    try:
        jobs = config.job_overrides([a for a in args if not a.startswith("-")], multirun)
    except ConfigError as exc:
        return exc.problems
    problems: dict[str, list[list[str]]] = {}
    valid: list[str] = []
    with config.composer() as compose_one:
        for job in jobs:
            try:
                cfg = config.compose_job(compose_one, job)
            except ConfigError as exc:
                found = exc.problems
            else:
                found = job_problems(cfg)
                if not found:
                    valid.append(_checked_key(cfg))
            for problem in found:
                problems.setdefault(problem, []).append(job)
    if not problems:
        os.environ[_CHECKED_ENV] = json.dumps(valid)
    if not multirun or len(jobs) == 1:
        return list(problems)
    return [
        f"{p} (in {len(js)} of {len(jobs)} jobs, e.g. {' '.join(js[0])})"
        for p, js in problems.items()
    ]


def job_problems(cfg: DictConfig | dict[str, Any]) -> list[str]:
    """Every problem of one job's config, one line each: its values, then (when its keys have
    the schema's types) what it points at on disk."""
    plain, found = config.check_values(cfg)
    return found if plain is None else found + _disk_problems(plain)


def require_valid(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem of one job's config, unless `check_jobs` found
    exactly this config valid in this command (this process or the one that started it)."""
    if not _already_checked(cfg):
        found = job_problems(cfg)
        if found:
            raise ConfigError(found)


def _checked_key(cfg: DictConfig) -> str:
    """What identifies a job's config for the mark: its resolved body, Hydra's keys aside."""
    body = config.resolved(cfg)
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _already_checked(cfg: DictConfig) -> bool:
    marked = os.environ.get(_CHECKED_ENV)
    if not marked:
        return False
    try:
        return _checked_key(cfg) in json.loads(marked)
    except Exception:  # unresolvable: not checked, let job_problems say why
        return False


def _disk_problems(c: dict[str, Any]) -> list[str]:
    found: list[str] = []
    resume = c["resume"]
    if resume not in ("auto", "never"):
        found.extend(_resume_problems(resume))
    found.extend(_peft_problems(c["peft"], resume))
    found.extend(_store_problems(c["tracking"]))
    model = c["model"]
    if model["name_or_path"]:
        found.extend(_model_source_problems(model))
    data = c["data"]
    if data["type"] == "files":
        for key in ("train", "eval"):
            spec = data[key]
            if spec and spec != "???":
                found.extend(spec_problems(f"data.{key}", spec))
    found.extend(_writable_problems("output.root", c["output"]["root"]))
    return found


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


def _peft_problems(peft: dict[str, Any], resume: str) -> list[str]:
    """A checkpoint resumed with the peft it was trained with; the peft package installed."""
    found = []
    lora = peft["method"] != "none"
    ckpt = Path(resume).expanduser()
    if resume not in ("auto", "never") and (ckpt / "manifest.json").is_file():
        adapter = (ckpt / "adapter_config.json").is_file()
        if adapter != lora:  # Trainer would load nothing of it, silently
            held = "a LoRA adapter (peft=lora)" if adapter else "a full model (peft=none)"
            found.append(
                f"resume: {resume} holds {held}; resume it with the peft it was trained with"
            )
    if lora and importlib.util.find_spec("peft") is None:
        found.append(f"peft={peft['method']}: needs the peft package (pip install 'peft>=0.17')")
    return found


def _store_problems(tracking: dict[str, Any]) -> list[str]:
    """A sqlite store: its directory writable (sqlite writes its journal beside the database),
    the database a writable file."""
    uri = tracking["uri"]
    if tracking["backend"] == "none" or not uri:
        return []
    if not (uri.startswith("sqlite:///") or ("://" not in uri and uri.endswith(".db"))):
        return []
    db = Path(uri.removeprefix("sqlite:///")).expanduser()
    found = _writable_problems("tracking.uri", str(db.parent))
    if not found and db.is_dir():
        found = [f"tracking.uri: {db} is a directory, not a sqlite database file"]
    elif not found and db.exists() and not os.access(db, os.W_OK):
        found = [f"tracking.uri: {db} is not writable"]
    return found


def _model_source_problems(model: dict[str, Any]) -> list[str]:
    """A local model directory must hold safetensors weights (pickle only with allow_pickle);
    a hub id needs the hub, which is named plainly when offline."""
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
