"""Compose and validate the run config. Nothing here imports torch, transformers or mlflow."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf

from tunelab import paths

# ---------------------------------------------------------------------------------------------
# Run names: the same overrides always give the same, readable, filesystem-safe name.

# Overrides that do not change what is trained, so they do not change the run's directory.
_NAME_EXCLUDED = ("resume", "tracking", "output", "training.progress_bar", "sweep", "hydra")
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


def fingerprint(resolved: dict) -> str:
    """sha256 of what decides the trained model: the resolved config less the keys that do not
    change it (the same ones left out of run names)."""
    import json

    kept = {k: v for k, v in resolved.items() if not _excluded(k) and k != "hydra"}
    if isinstance(kept.get("training"), dict):
        kept["training"] = {k: v for k, v in kept["training"].items() if k != "progress_bar"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _excluded(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return any(key == k or key.startswith(k + ".") for k in _NAME_EXCLUDED)


def run_dir_name(overrides: Iterable[str], resume: str = "auto") -> str:
    """The run directory's name: the run name, plus a unique suffix when `resume=never` asks
    for a fresh directory (the same within one process, so a sweep's jobs share it)."""
    name = run_name(overrides)
    return f"{name}@{_FRESH_SUFFIX}" if str(resume) == "never" else name


_FRESH_SUFFIX = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"

# Set by the sweep callback before any job starts (and inherited by launcher workers): the
# sweep directory's name and the keys the sweep varies.
SWEEP_ENV = "TUNELAB_SWEEP"


def _sweep() -> dict:
    import json

    return json.loads(os.environ.get(SWEEP_ENV) or "{}")


def sweep_dir_name(overrides: Iterable[str], resume: str = "auto") -> str:
    """The sweep's directory: fixed once for the whole sweep (a job's own overrides would
    otherwise re-derive it), from the sweep overrides, so the same -m command finds it again."""
    return _sweep().get("dir_name") or run_dir_name(overrides, resume)


def job_name(overrides: Iterable[str]) -> str:
    """A sweep job's name: only what sets it apart from its siblings, e.g.
    `seed-1+training.lr-0.001`."""
    swept = set(_sweep().get("swept", []))
    return run_name([o for o in overrides if _key(o) in swept])


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("tunelab.run_dir"):
        OmegaConf.register_new_resolver(
            "tunelab.run_dir", lambda ov, resume="auto": run_dir_name(list(ov or []), resume)
        )
        OmegaConf.register_new_resolver(
            "tunelab.sweep_dir", lambda ov, resume="auto": sweep_dir_name(list(ov or []), resume)
        )
        OmegaConf.register_new_resolver("tunelab.job_dir", lambda ov: job_name(list(ov or [])))


_register_resolvers()


# ---------------------------------------------------------------------------------------------
# Composition (for tests, tools and anything that needs the config without running Hydra's app).


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose `conf/train.yaml` with overrides, exactly as `tunelab train` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    os.environ.setdefault("TUNELAB_EXPERIMENTS_DIR", str(paths.experiments_dir()))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(paths.conf_dir()), version_base="1.3"):
        return hydra_compose(
            "train", overrides=list(overrides), return_hydra_config=return_hydra_config
        )


# ---------------------------------------------------------------------------------------------
# Schema. `choices`, `min` and `min_exclusive` in a field's metadata are checked by `validate`.


def _f(default: Any = MISSING, **meta: Any) -> Any:
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSchema:
    name_or_path: str | None = None
    task: str = _f("causal_lm", choices=["causal_lm"])
    arch: dict | None = None
    tokenizer_vocab_size: int = _f(0, min=0)
    trust_remote_code: bool = False


@dataclass
class AdditionDataSchema:
    type: str = _f("addition", choices=["addition", "files"])
    digits: int = _f(3, min=1, max=9)
    train_size: int = _f(20000, min=1)
    eval_size: int = _f(500, min=0)
    seed: int = 1234
    max_length: int = _f(32, min=2)


@dataclass
class FilesDataSchema:
    type: str = _f("files", choices=["addition", "files"])
    train: str = ""
    eval: str | None = None
    eval_fraction: float = _f(0.05, min=0.0, max=0.9)
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    seed: int = 1234
    max_length: int = _f(128, min=2)


@dataclass
class TrainingSchema:
    max_steps: int = _f(2000, min=-1)
    epochs: float = _f(1.0, min_exclusive=0.0)
    lr: float = _f(3e-3, min_exclusive=0.0)
    batch_size: int = _f(64, min=1)
    eval_batch_size: int = _f(256, min=1)
    grad_accum: int = _f(1, min=1)
    weight_decay: float = _f(0.0, min=0.0)
    warmup_steps: int = _f(0, min=0)
    lr_scheduler: str = _f(
        "cosine",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau",
                 "cosine_with_min_lr", "warmup_stable_decay"],
    )  # fmt: skip
    max_grad_norm: float = _f(1.0, min=0.0)
    eval_every: int = _f(250, min=0)
    log_every: int = _f(25, min=1)
    precision: str = _f("auto", choices=["auto", "fp32", "bf16", "fp16"])
    device: str = _f("auto", choices=["auto", "cpu", "cuda"])
    num_workers: int = _f(0, min=0)
    progress_bar: bool = True


@dataclass
class CheckpointSchema:
    strategy: str = _f("steps", choices=["steps", "epoch", "best", "none"])
    every: int | None = _f(None, min=1)
    keep: int | None = _f(None, min=1)
    metric: str | None = None
    mode: str | None = _f(None, choices=["min", "max"])
    keep_best: bool = True
    async_write: bool = True


@dataclass
class OutputSchema:
    root: str = "outputs"


@dataclass
class TrackingSchema:
    backend: str = _f("mlflow", choices=["mlflow", "none"])
    uri: str | None = None
    experiment: str = "tunelab"
    log_checkpoints: str = _f("none", choices=["none", "last", "best", "all"])
    system_metrics: bool = True
    required: bool = True


@dataclass
class SweepSchema:
    objective: str | None = None
    direction: str | None = _f(None, choices=["min", "max"])


@dataclass
class TrainSchema:
    model: ModelSchema
    data: Any  # picked by data.type, see _DATA_SCHEMAS
    training: TrainingSchema
    checkpoint: CheckpointSchema
    output: OutputSchema
    tracking: TrackingSchema
    sweep: SweepSchema = field(default_factory=SweepSchema)
    seed: int = 42
    resume: str = "auto"


_DATA_SCHEMAS = {"addition": AdditionDataSchema, "files": FilesDataSchema}


class ConfigError(ValueError):
    """The config has problems; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def validate(cfg: DictConfig) -> list[str]:
    """Every problem in the config, one line each (empty when the config is valid)."""
    body = {k: v for k, v in cfg.items() if k != "hydra"} if isinstance(cfg, DictConfig) else cfg
    try:
        plain = OmegaConf.to_container(OmegaConf.create(body), resolve=True)
    except Exception as exc:  # an interpolation that does not resolve
        return [f"config: cannot resolve: {exc}".splitlines()[0]]
    problems: list[str] = []
    _check_node(plain, TrainSchema, "", problems)
    if not problems:
        _check_combinations(plain, problems)
    return problems


def _check_node(node: Any, schema: type, prefix: str, problems: list[str]) -> None:
    if not isinstance(node, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {node!r}")
        return
    hints = get_type_hints(schema)
    known = {f.name: f for f in fields(schema)}
    for key in node:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(
                f"{prefix}{key}: unknown key{hint}; allowed: {', '.join(sorted(known))}"
            )
    for name, f in known.items():
        key = prefix + name
        if name not in node:
            if f.default is MISSING and f.default_factory is MISSING:
                problems.append(f"{key}: missing")
            continue
        value = node[name]
        if value == "???":
            problems.append(f"{key}: required, set it on the command line ({key}=...)")
            continue
        if name == "data" and schema is TrainSchema:
            kind = value.get("type") if isinstance(value, dict) else None
            sub = _DATA_SCHEMAS.get(kind)
            if sub is None:
                problems.append(f"data.type: {kind!r} is not one of {sorted(_DATA_SCHEMAS)}")
            else:
                _check_node(value, sub, "data.", problems)
            continue
        _check_value(key, value, hints[name], f.metadata, problems)


def _check_value(key: str, value: Any, hint: Any, meta: Any, problems: list[str]) -> None:
    if is_dataclass(hint):
        _check_node(value, hint, key + ".", problems)
        return
    allowed = [t for t in (get_args(hint) if get_origin(hint) in (Union, _UnionType) else [hint])]
    if value is None:
        if type(None) not in allowed:
            problems.append(f"{key}: must be set, got null")
        return
    if not any(_is_type(value, t) for t in allowed if t is not type(None)):
        names = " or ".join(_type_name(t) for t in allowed)
        problems.append(f"{key}: expected {names}, got {value!r}")
        return
    if "choices" in meta and value not in meta["choices"]:
        problems.append(f"{key}: {value!r} is not one of {', '.join(meta['choices'])}")
    if "min" in meta and value < meta["min"]:
        problems.append(f"{key}: {value!r} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        problems.append(f"{key}: {value!r} is above the maximum {meta['max']}")
    if "min_exclusive" in meta and value <= meta["min_exclusive"]:
        problems.append(f"{key}: {value!r} must be greater than {meta['min_exclusive']}")


try:  # `X | None` annotations evaluate to types.UnionType
    from types import UnionType as _UnionType
except ImportError:  # pragma: no cover - Python < 3.10
    _UnionType = Union  # type: ignore[assignment,misc]


def _is_type(value: Any, t: Any) -> bool:
    if t is Any:
        return True
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


def _type_name(t: Any) -> str:
    return "null" if t is type(None) else getattr(t, "__name__", str(t))


def _check_combinations(c: dict, problems: list[str]) -> None:
    model, data, ck, tr = c["model"], c["data"], c["checkpoint"], c["training"]
    if model.get("name_or_path") is None and not model.get("arch"):
        problems.append("model: set model.name_or_path (a local dir or hub id) or model.arch")
    if tr["max_steps"] == 0:
        problems.append("training.max_steps: 0 trains nothing; use a positive count or -1 (epochs)")
    if ck["strategy"] == "steps" and ck.get("every") is None:
        problems.append("checkpoint.every: required with checkpoint=steps (e.g. 500)")
    has_eval = data.get("eval_size", 0) > 0 or data.get("eval") or data.get("eval_fraction", 0) > 0
    if ck["strategy"] == "best":
        if not ck.get("metric"):
            problems.append("checkpoint.metric: required with checkpoint=best (e.g. eval_loss)")
        if not has_eval:
            problems.append("checkpoint=best: needs an eval set (data.eval or data.eval_size > 0)")
    uploads = c["tracking"].get("log_checkpoints", "none")
    if uploads != "none" and ck["strategy"] == "none":
        problems.append(
            f"tracking.log_checkpoints={uploads}: there are no checkpoints with checkpoint=none; "
            "use checkpoint=steps|epoch|best or tracking.log_checkpoints=none"
        )
    if uploads == "best" and not ck.get("metric"):
        problems.append("tracking.log_checkpoints=best: needs checkpoint.metric (e.g. eval_loss)")
    resume = c.get("resume", "auto")
    if resume not in ("auto", "never") and not Path(resume).exists():
        problems.append(f"resume: {resume!r} is not auto, never or an existing checkpoint path")


def check(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem in `cfg`."""
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)


def _hydra_callback_base() -> type:
    from hydra.experimental.callback import Callback

    return Callback


class ValidateOnStart(_hydra_callback_base()):  # type: ignore[misc]
    """Hydra callback: refuse a bad config before Hydra creates the run directory."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        exit_on_problems(validate(config))


def exit_on_problems(problems: list[str]) -> None:
    """Print each problem on its own line and exit with status 2 (nothing has been created)."""
    if problems:
        import sys

        for p in problems:
            print(f"tunelab: config error: {p}", file=sys.stderr)
        raise SystemExit(2)
