"""The typed schema of a run's config, and the check of a resolved config against it.

The YAML files in conf/ hold every default; the schema holds none. It says which keys exist,
their types and their allowed values (a `Rule` beside the type), so a config missing a key,
with an unknown key or a wrong value is refused with one line per problem.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields, is_dataclass
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

from tunelab import metrics


@dataclass(frozen=True)
class Rule:
    """The allowed values of a key, beyond its type."""

    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    min_exclusive: float | None = None
    max_exclusive: float | None = None

    def problems(self, key: str, value: Any) -> list[str]:
        out = []
        if isinstance(value, float) and not math.isfinite(value):
            return [f"{key}: {value!r} is not a finite number"]
        if self.choices and value not in self.choices:
            out.append(f"{key}: {value!r} is not one of {', '.join(self.choices)}")
        if self.min is not None and value < self.min:
            out.append(f"{key}: {value!r} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            out.append(f"{key}: {value!r} is above the maximum {self.max}")
        if self.min_exclusive is not None and value <= self.min_exclusive:
            out.append(f"{key}: {value!r} must be greater than {self.min_exclusive}")
        if self.max_exclusive is not None and value >= self.max_exclusive:
            out.append(f"{key}: {value!r} must be less than {self.max_exclusive}")
        return out


# Bounds on counts that no run can mean (a typo, or a value meant for another key).
_MANY = 10**9
_SEED = Rule(min=0, max=2**32 - 1)  # what numpy and torch accept

_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
               "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau",
               "cosine_with_min_lr", "warmup_stable_decay")  # fmt: skip


@dataclass
class ModelSchema:
    name_or_path: str | None
    task: Annotated[str, Rule(choices=metrics.TASKS)]
    arch: dict | None
    tokenizer_vocab_size: Annotated[int, Rule(min=0, max=10**7)]
    trust_remote_code: bool
    allow_pickle: bool


# The prepared-data cache under output.root: its size and the age of its entries (null: no limit).
_CACHE_GB = Annotated[float | None, Rule(min=0.0, max=1e9)]
_CACHE_DAYS = Annotated[float | None, Rule(min=0.0, max=1e6)]


@dataclass
class AdditionDataSchema:
    type: Annotated[str, Rule(choices=("addition", "files"))]
    digits: Annotated[int, Rule(min=1, max=9)]
    train_size: Annotated[int, Rule(min=1, max=10**8)]
    eval_size: Annotated[int, Rule(min=0, max=10**8)]
    seed: Annotated[int, _SEED]
    max_length: Annotated[int, Rule(min=2, max=2**20)]
    truncate: bool
    cache_max_gb: _CACHE_GB
    cache_max_age_days: _CACHE_DAYS


@dataclass
class FilesDataSchema:
    type: Annotated[str, Rule(choices=("addition", "files"))]
    train: str | list[str]
    eval: str | list[str] | None
    eval_fraction: Annotated[float, Rule(min=0.0, max=0.9)]
    text_column: str
    prompt_column: str
    completion_column: str
    messages_column: str
    label_column: str
    seed: Annotated[int, _SEED]
    max_length: Annotated[int, Rule(min=2, max=2**20)]
    truncate: bool
    cache_max_gb: _CACHE_GB
    cache_max_age_days: _CACHE_DAYS


@dataclass
class TrainingSchema:
    max_steps: Annotated[int, Rule(min=-1, max=_MANY)]
    epochs: Annotated[float, Rule(min_exclusive=0.0, max=1e6)]
    lr: Annotated[float, Rule(min_exclusive=0.0, max=10.0)]
    batch_size: Annotated[int, Rule(min=1, max=2**20)]
    eval_batch_size: Annotated[int, Rule(min=1, max=2**20)]
    grad_accum: Annotated[int, Rule(min=1, max=2**16)]
    weight_decay: Annotated[float, Rule(min=0.0, max=100.0)]
    warmup_steps: Annotated[int, Rule(min=0, max=_MANY)]
    lr_scheduler: Annotated[str, Rule(choices=_SCHEDULERS)]
    max_grad_norm: Annotated[float, Rule(min=0.0, max=1e6)]
    eval_every: Annotated[int, Rule(min=0, max=_MANY)]
    log_every: Annotated[int, Rule(min=1, max=_MANY)]
    precision: Annotated[str, Rule(choices=("auto", "fp32", "bf16", "fp16"))]
    device: Annotated[str, Rule(choices=("auto", "cpu", "cuda"))]
    num_workers: Annotated[int, Rule(min=0, max=1024)]
    find_unused_parameters: bool
    fsdp: bool
    fsdp_config: dict
    progress_bar: bool
    early_stopping_patience: Annotated[int | None, Rule(min=1, max=_MANY)] = None


@dataclass
class CheckpointSchema:
    strategy: Annotated[str, Rule(choices=("steps", "epoch", "best", "none"))]
    every: Annotated[int | None, Rule(min=1, max=_MANY)]
    keep: Annotated[int | None, Rule(min=1, max=10**6)]
    metric: str | None
    mode: Annotated[str | None, Rule(choices=("min", "max"))]
    keep_best: bool
    async_write: bool


@dataclass
class OutputSchema:
    root: str


@dataclass
class TrackingSchema:
    backend: Annotated[str, Rule(choices=("mlflow", "none"))]
    uri: str | None
    experiment: str
    log_checkpoints: Annotated[str, Rule(choices=("none", "last", "best", "all"))]
    system_metrics: bool
    required: bool


@dataclass
class SweepSchema:
    objective: str | None
    direction: Annotated[str | None, Rule(choices=("min", "max"))]
    register_as: str | None  # the registered model the best job becomes a version of


@dataclass
class NoPeftSchema:
    method: Annotated[str, Rule(choices=("none", "lora"))]


@dataclass
class PeftSchema:
    """peft=lora: a LoRA adapter trains, the model's own weights stay frozen."""

    method: Annotated[str, Rule(choices=("none", "lora"))]
    r: Annotated[int, Rule(min=1, max=2**16)]
    alpha: Annotated[float, Rule(min_exclusive=0.0, max=1e6)]
    dropout: Annotated[float, Rule(min=0.0, max_exclusive=1.0)]
    target_modules: list[str] | str | None  # null: peft's default for the model type
    bias: Annotated[str, Rule(choices=("none", "all", "lora_only"))]


@dataclass
class TrainSchema:
    model: ModelSchema
    data: Any  # picked by data.type, see DATA_SCHEMAS
    training: TrainingSchema
    checkpoint: CheckpointSchema
    output: OutputSchema
    tracking: TrackingSchema
    sweep: SweepSchema
    peft: Any  # picked by peft.method, see PEFT_SCHEMAS
    seed: Annotated[int, _SEED]
    resume: str
    name: str | None  # the run's name in MLflow (null: from the overrides)


DATA_SCHEMAS: dict[str, type] = {"addition": AdditionDataSchema, "files": FilesDataSchema}
PEFT_SCHEMAS: dict[str, type] = {"none": NoPeftSchema, "lora": PeftSchema}
# Groups whose keys depend on one of their values: (that key, its schema for each value).
_PICKED = {"data": ("type", DATA_SCHEMAS), "peft": ("method", PEFT_SCHEMAS)}


def check_types(plain: dict[str, Any]) -> list[str]:
    """Every key of the resolved config `plain` against the schema: unknown, missing, wrong
    type, out of range. One line per problem."""
    problems: list[str] = []
    _check_node(plain, TrainSchema, "", problems)
    return problems


def _check_node(node: Any, schema: type, prefix: str, problems: list[str]) -> None:
    if not isinstance(node, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {node!r}")
        return
    hints = get_type_hints(schema, include_extras=True)
    known = {f.name for f in fields(schema)}
    for key in node:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(
                f"{prefix}{key}: unknown key{hint}; allowed: {', '.join(sorted(known))}"
            )
    for name in sorted(known, key=list(hints).index):
        key = prefix + name
        if name not in node:
            problems.append(f"{key}: missing")
            continue
        value = node[name]
        if value == "???":
            problems.append(f"{key}: required, set it on the command line ({key}=...)")
            continue
        if name in _PICKED and schema is TrainSchema:
            by, table = _PICKED[name]
            kind = value.get(by) if isinstance(value, dict) else None
            sub = table.get(kind) if isinstance(kind, str) else None
            if sub is None:
                problems.append(f"{name}.{by}: {kind!r} is not one of {sorted(table)}")
            else:
                _check_node(value, sub, f"{name}.", problems)
            continue
        _check_value(key, value, hints[name], problems)


def _check_value(key: str, value: Any, hint: Any, problems: list[str]) -> None:
    rule = Rule()
    if get_origin(hint) is Annotated:
        hint, rule = get_args(hint)
    if isinstance(hint, type) and is_dataclass(hint):
        _check_node(value, hint, key + ".", problems)
        return
    allowed = list(get_args(hint)) if get_origin(hint) in (Union, UnionType) else [hint]
    if value is None:
        if type(None) not in allowed:
            problems.append(f"{key}: must be set, got null")
        return
    if not any(_is_type(value, t) for t in allowed if t is not type(None)):
        names = " or ".join(_type_name(t) for t in allowed)
        problems.append(f"{key}: expected {names}, got {value!r}")
        return
    problems.extend(rule.problems(key, value))


def _is_type(value: Any, t: Any) -> bool:
    if t is Any:
        return True
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = get_origin(t) or t
    if origin is list and get_args(t):  # list[str]: every item too
        return isinstance(value, list) and all(_is_type(v, get_args(t)[0]) for v in value)
    return isinstance(value, origin)


def _type_name(t: Any) -> str:
    if get_origin(t) is list and get_args(t):
        return f"a list of {_type_name(get_args(t)[0])}"
    return "null" if t is type(None) else getattr(t, "__name__", str(t))
