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
    allow_pickle: bool = False


@dataclass
class AdditionDataSchema:
    type: str = _f("addition", choices=["addition", "files"])
    digits: int = _f(3, min=1, max=9)
    train_size: int = _f(20000, min=1)
    eval_size: int = _f(500, min=0)
    seed: int = 1234
    max_length: int = _f(32, min=2)
    truncate: bool = True


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
    truncate: bool = True


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
    metric = ck.get("metric")
    if metric and (ck["strategy"] == "best" or ck.get("keep_best") or uploads == "best"):
        name = metric if metric.startswith("eval_") else f"eval_{metric}"
        if name not in _TASK_METRICS:
            problems.append(
                f"checkpoint.metric: {metric!r} is not produced by this task; "
                f"one of {', '.join(_TASK_METRICS)}"
            )
    if uploads == "best" and not ck.get("metric"):
        problems.append("tracking.log_checkpoints=best: needs checkpoint.metric (e.g. eval_loss)")
    resume = c.get("resume", "auto")
    if resume not in ("auto", "never") and not Path(resume).exists():
        problems.append(f"resume: {resume!r} is not auto, never or an existing checkpoint path")
    positions = (model.get("arch") or {}).get("n_positions")
    if positions and not model.get("name_or_path") and data["max_length"] > positions:
        problems.append(
            f"data.max_length: {data['max_length']} is longer than the model's "
            f"model.arch.n_positions={positions}; lower it or raise n_positions"
        )
    if model.get("name_or_path"):
        problems.extend(_model_source_problems(model))
    if data.get("type") == "files":
        for key in ("train", "eval"):
            path = data.get(key)
            if path and path != "???" and not Path(path).expanduser().is_file():
                problems.append(f"data.{key}: {path} does not exist (a .jsonl, .json or .txt file)")
    problems.extend(_output_problems(c["output"]["root"]))


# What evaluation reports (data.metrics_fn): exact match needs prompt/completion rows.
_TASK_METRICS = ("eval_loss", "eval_token_accuracy", "eval_exact_match")


def _model_source_problems(model: dict) -> list[str]:
    """A local model directory must hold safetensors weights (pickle only with allow_pickle);
    a hub id needs the hub, which is named plainly when offline."""
    from tunelab.artifacts import PICKLE_SUFFIXES
    from tunelab.tracking import MODEL_URI_SCHEMES

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
            if not model.get("allow_pickle"):
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


def check(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem in `cfg`."""
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------------------------------
# Preflight: every config `tunelab train ARGS` would run, composed and validated before Hydra
# starts (so before any directory, MLflow run or heavy import), Hydra's own errors included.

_RUN_FLAGS = ("-m", "--multirun")
_MAX_JOBS_CHECKED = 32  # a bigger grid is checked one swept value at a time


def preflight(args: Sequence[str]) -> list[str]:
    """One line per problem in the configs `tunelab train ARGS` would train: for `-m`, every
    job's (the grid expanded, search-space ends for a sweeper's `interval`). Empty when all are
    valid, or when ARGS ask Hydra for something else (`--cfg`, `--help`, ...: Hydra answers)."""
    flags = [a for a in args if a.startswith("-")]
    if any(f not in _RUN_FLAGS for f in flags):
        return []
    overrides = [a for a in args if not a.startswith("-")]
    try:
        jobs = _jobs(overrides, multirun=bool(flags))
    except _Problem as exc:
        return [str(exc)]
    problems: dict[str, list[list[str]]] = {}
    with _composer() as compose_one:
        for job in jobs:
            try:
                found = validate(compose_one(job))
            except _Problem as exc:
                found = [str(exc)]
            for problem in found:
                problems.setdefault(problem, []).append(job)
    if not flags or len(jobs) == 1:
        return list(problems)
    return [
        f"{p} (in {len(js)} of {len(jobs)} jobs, e.g. {' '.join(js[0])})"
        for p, js in problems.items()
    ]


class _Problem(Exception):
    """One problem line, from Hydra's parser or composer."""


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of the jobs to check."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = _parse(parser, overrides)
    if not multirun:
        return [overrides]
    common = [o.input_line for o in parsed if not o.is_sweep_override()]
    swept: dict[str, list[str]] = {}
    for o in parsed:
        if o.is_sweep_override():
            swept[o.get_key_element()] = _candidates(o)
    with _composer(return_hydra_config=True) as compose_one:
        sweeper = compose_one(common).hydra.sweeper
    params = sweeper.get("params") or {}
    for key, spec in params.items():
        if key not in swept:
            (o,) = _parse(parser, [f"{key}={spec}"])
            swept[o.get_key_element()] = _candidates(o) if o.is_sweep_override() else [str(spec)]
    if not swept:
        return [common]
    import itertools
    import math

    keys = list(swept)
    if math.prod(len(v) for v in swept.values()) <= _MAX_JOBS_CHECKED:
        grid = itertools.product(*(swept[k] for k in keys))
        return [common + [f"{k}={v}" for k, v in zip(keys, combo, strict=True)] for combo in grid]
    firsts = {k: v[0] for k, v in swept.items()}
    return [
        common + [f"{k}={value if k == key else firsts[k]}" for k in keys]
        for key in keys
        for value in swept[key]
    ]


def _parse(parser: Any, overrides: list[str]) -> list[Any]:
    from hydra.errors import HydraException

    try:
        return parser.parse_overrides(overrides=overrides)
    except HydraException as exc:
        bad = next((o for o in overrides if _unparsable(parser, o)), " ".join(overrides))
        first = str(exc).splitlines()[0]
        raise _Problem(
            f"{bad!r}: not a valid override ({first}); write key=value, group=option, "
            "+key=value to add a key, or key=a,b for a sweep with -m"
        ) from None


def _unparsable(parser: Any, override: str) -> bool:
    try:
        parser.parse_overrides(overrides=[override])
    except Exception:
        return True
    return False


def _candidates(override: Any) -> list[str]:
    """The values a sweep override can take: each choice or range value; an interval's ends."""
    from hydra.core.override_parser.types import IntervalSweep

    value = override.value()
    if isinstance(value, IntervalSweep):
        return [str(value.start), str(value.end)]
    return list(override.sweep_string_iterator())


class _composer:
    """Compose `conf/train.yaml` again and again inside one Hydra context; Hydra's errors come
    out as one problem line each."""

    def __init__(self, return_hydra_config: bool = False) -> None:
        self.return_hydra_config = return_hydra_config

    def __enter__(self) -> Any:
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        os.environ.setdefault("TUNELAB_EXPERIMENTS_DIR", str(paths.experiments_dir()))
        GlobalHydra.instance().clear()
        self._context = initialize_config_dir(config_dir=str(paths.conf_dir()), version_base="1.3")
        self._context.__enter__()
        return self.compose

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()

    def compose(self, overrides: list[str]) -> DictConfig:
        from hydra import compose as hydra_compose
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            return hydra_compose(
                "train", overrides=overrides, return_hydra_config=self.return_hydra_config
            )
        except (HydraException, OmegaConfBaseException) as exc:
            raise _Problem(_composition_problem(str(exc), overrides)) from None
        except Exception as exc:  # Hydra raises plain ValueErrors too (`checkpoint=0`)
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise _Problem(f"{' '.join(overrides)}: {first}") from None


def _composition_problem(message: str, overrides: list[str]) -> str:
    """Hydra's composition error as one line naming the key and what is allowed."""
    bad_key = re.match(r"Could not override '([^']*)'", message)
    if bad_key:
        return _unknown_key_problem(bad_key.group(1), overrides)
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", message.split("Config search path")[0], re.M)
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        return f"{group}={option}: no such option{hint}; options: {', '.join(options)}"
    return "config: " + message.splitlines()[0]


def _unknown_key_problem(key: str, overrides: list[str]) -> str:
    if not key:
        return "'=': an override needs a key: key=value or group=option"
    # The keys that exist once the overrides' group choices (data=text_files, ...) are made.
    groups = [o for o in overrides if "." not in _key(o) and not o.startswith(("+", "~"))]
    try:
        base = compose(groups)
    except Exception:  # a bad group choice too: fall back to the defaults
        base = compose()
    node: Any = OmegaConf.to_container(base, resolve=False)
    parts, walked = key.split("."), []
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            break
        node, walked = node[part], [*walked, part]
    prefix = ".".join(walked) + "." if walked else ""
    if node is None and walked:
        return f"{key}: unknown key; {prefix[:-1]} is null with these choices, so it has no keys"
    allowed = sorted(str(k) for k in node) if isinstance(node, dict) else []
    missing = parts[len(walked)] if len(walked) < len(parts) else parts[-1]
    close = difflib.get_close_matches(missing, allowed, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    listed = f"; allowed: {', '.join(allowed)}" if allowed else ""
    return f"{key}: unknown key{hint}{listed}"


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
