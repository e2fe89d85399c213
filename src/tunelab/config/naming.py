"""Run names: the same overrides always give the same, readable, filesystem-safe name, and the
Hydra resolvers that turn them into run, sweep and job directories."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# Overrides that do not change what is trained, so they do not change the run's directory.
_NAME_EXCLUDED = ("resume", "tracking", "output", "training.progress_bar", "sweep", "hydra",
                  "data.cache_max_gb", "data.cache_max_age_days", "name")  # fmt: skip
_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")
_MAX_NAME = 120


def run_name(overrides: Iterable[str]) -> str:
    """A directory-safe name built from the task overrides; `default` when there are none.

    `training.lr=1e-4 seed=2` gives `seed-2+training.lr-1e-4`: order does not matter, and the
    name needs no quoting in a shell or in a Hydra override (a later `model.name_or_path=` can
    point at it). Characters outside [A-Za-z0-9._@-] become `_`; whenever that, a `-` in a key, or
    shortening could make two different commands share a name, a short hash of the exact
    overrides is appended.
    """
    kept = sorted(o.lstrip("+~") for o in overrides if not _excluded(o))
    if not kept:
        return "default"
    items, lossy = [], False
    for override in kept:
        key, _, value = override.partition("=")
        safe_key, safe_value = _UNSAFE.sub("_", key), _UNSAFE.sub("_", value)
        lossy |= safe_key != key or safe_value != value or "-" in key
        items.append(f"{safe_key}-{safe_value}")
    name = "+".join(items)
    if lossy or len(name) > _MAX_NAME:
        digest = hashlib.sha1("\0".join(kept).encode()).hexdigest()[:8]
        name = f"{name[:_MAX_NAME]}-{digest}"
    return name


# A run's MLflow name leads with what most sets it apart: these keys first, in this order.
_LEADING = ("model.name_or_path", "model.task", "peft", "peft.r", "data.train")
_TASKS = {"causal_lm": "lm", "sequence_classification": "cls", "token_classification": "tag"}
# Then the other keys by group: what is trained how, before where its data and checkpoints are.
_GROUPS = ("training", "model", "peft", "seed", "", "data", "checkpoint")
_MAX_VALUE = 28
_MAX_DISPLAY = 120


def display_name(overrides: Iterable[str], given: str | None = None) -> str:
    """The run's name in MLflow (the directory keeps `run_name`'s): `given` (the `name` key)
    when set; else the overrides as a person reads them, leading with the model, the task,
    peft and the data, then the rest by key: each key by its last part (`lr=0.000846`),
    numbers to 3 significant digits, paths as their file's stem. `default` without overrides.
    E.g. `model=all-MiniLM-L6-v2 task=cls peft=lora lr=0.000846 train=intents`."""
    if given:
        return given
    kept = [o.lstrip("+~") for o in overrides if not _excluded(o) and "=" in o]
    keys = {key_of(o) for o in kept}
    # A group's choice adds nothing beside the key that says what it loads.
    kept = [
        o
        for o in kept
        if not (o.startswith("model=") and "model.name_or_path" in keys)
        and not (o.startswith("data=") and "data.train" in keys)
    ]
    if not kept:
        return "default"
    lasts = [key_of(o).rsplit(".", 1)[-1] for o in kept]

    def order(o: str) -> tuple[int, int, str]:
        key = key_of(o)
        group = _GROUPS.index(key.split(".")[0]) if key.split(".")[0] in _GROUPS else 4
        return (_LEADING.index(key) if key in _LEADING else len(_LEADING), group, key)

    parts = []
    for override in sorted(kept, key=order):
        key, _, value = override.partition("=")
        last = key.rsplit(".", 1)[-1]
        short = {"name_or_path": "model"}.get(last, last) if lasts.count(last) == 1 else key
        parts.append(f"{short}={_readable(key, value)}")
    name = " ".join(parts)
    return name if len(name) <= _MAX_DISPLAY else name[: _MAX_DISPLAY - 3] + "..."


def _readable(key: str, value: str) -> str:
    if key == "model.task":
        return _TASKS.get(value, value)
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not value.lstrip("-").isdigit() and number == number:
            return f"{number:.3g}"
        return value
    if "/" in value or value.endswith((".jsonl", ".json", ".csv", ".parquet", ".txt")):
        path = Path(value.rstrip("/"))
        value = path.stem if path.suffix else path.name
        if value in ("model", "adapter") and path.parent.name:
            value = f"{path.parent.name}/{value}"
    return value if len(value) <= _MAX_VALUE else value[: _MAX_VALUE - 3] + "..."


def digest(resolved: dict[str, Any]) -> str:
    """sha256 of what decides the trained model: the resolved config less the keys that do not
    change it (the same ones left out of run names). The run record keeps it (`fingerprint`), so
    a resume whose config changed is refused."""
    kept = {k: v for k, v in resolved.items() if not _excluded(k) and k != "hydra"}
    for dotted in _NAME_EXCLUDED:
        group, _, key = dotted.partition(".")
        if key and isinstance(kept.get(group), dict):
            kept[group] = {k: v for k, v in kept[group].items() if k != key}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _excluded(override: str) -> bool:
    key = key_of(override)
    return any(key == k or key.startswith(k + ".") for k in _NAME_EXCLUDED)


def key_of(override: str) -> str:
    """`+a.b=1` -> `a.b`."""
    return override.lstrip("+~").split("=", 1)[0]


def run_dir_name(overrides: Iterable[str], resume: str = "auto") -> str:
    """The run directory's name: the run name, plus a unique suffix when `resume=never` asks
    for a fresh directory (the same within one process, so a sweep's jobs share it)."""
    name = run_name(overrides)
    return f"{name}@{_fresh_suffix or own_fresh_suffix()}" if str(resume) == "never" else name


_STARTED = time.time()
_fresh_suffix: str | None = None


def own_fresh_suffix() -> str:
    """This process's suffix for a `resume=never` directory: when it started, and its pid."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(_STARTED))}-{os.getpid()}"


def set_fresh_suffix(suffix: str) -> None:
    """Name `resume=never` directories with `suffix` from now on, instead of this process's own:
    under torchrun the caller hands every rank rank 0's, so that all name the same directory."""
    global _fresh_suffix
    _fresh_suffix = suffix


# The sweep's directory name and the keys it varies: fixed by `set_sweep` before any job starts,
# in the environment, so that launcher workers (other processes) inherit them. Read only here.
_SWEEP_ENV = "TUNELAB_SWEEP"


def set_sweep(dir_name: str, swept: list[str]) -> None:
    """Fix the sweep directory's name and the keys the sweep varies, for every job of the sweep
    (and every launcher worker: they inherit the environment)."""
    os.environ[_SWEEP_ENV] = json.dumps({"dir_name": dir_name, "swept": swept})


def _sweep() -> dict[str, Any]:
    found = json.loads(os.environ.get(_SWEEP_ENV) or "{}")
    return found if isinstance(found, dict) else {}


def swept_keys() -> list[str]:
    """The keys the running sweep varies (none outside a sweep)."""
    return [str(k) for k in _sweep().get("swept", [])]


def sweep_dir_name(overrides: Iterable[str], resume: str = "auto") -> str:
    """The sweep's directory: fixed once for the whole sweep (a job's own overrides would
    otherwise re-derive it), from the sweep overrides, so the same -m command finds it again."""
    return str(_sweep().get("dir_name") or run_dir_name(overrides, resume))


def job_display_name(overrides: Iterable[str], given: str | None = None) -> str:
    """A sweep job's MLflow name: what sets it apart from its siblings, as a person reads it
    (`lr=0.00132 batch_size=128`), after `given` (the `name` key) when set."""
    swept = set(swept_keys())
    own = display_name([o for o in overrides if key_of(o) in swept])
    return f"{given} {own}" if given else own


def job_name(overrides: Iterable[str]) -> str:
    """A sweep job's name: only what sets it apart from its siblings, e.g.
    `seed-1+training.lr-0.001`."""
    swept = set(swept_keys())
    return run_name([o for o in overrides if key_of(o) in swept])


def register_resolvers() -> None:
    """`${tunelab.run_dir:...}`, `${tunelab.sweep_dir:...}`, `${tunelab.job_dir:...}` for
    conf/train.yaml's hydra.run.dir and hydra.sweep.dir."""
    if OmegaConf.has_resolver("tunelab.run_dir"):
        return
    OmegaConf.register_new_resolver(
        "tunelab.run_dir", lambda ov, resume="auto": run_dir_name(list(ov or []), resume)
    )
    OmegaConf.register_new_resolver(
        "tunelab.sweep_dir", lambda ov, resume="auto": sweep_dir_name(list(ov or []), resume)
    )
    OmegaConf.register_new_resolver("tunelab.job_dir", lambda ov: job_name(list(ov or [])))
