"""The jobs a `tunelab train ARGS` command line would run, composed as Hydra would compose them,
with Hydra's own errors (an unparsable override, an unknown key, a missing option) turned into
one problem line each, naming the key and what is allowed. tunelab.preflight checks them all
before Hydra starts."""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tunelab import metrics
from tunelab.config.compose import compose, composer
from tunelab.config.naming import key_of
from tunelab.constants import OPTUNA_SWEEPER, PRUNERS, STUDY_STORES
from tunelab.errors import ConfigError, first_line

_RUN_FLAGS = ("-m", "--multirun")
_MAX_JOBS_CHECKED = 32  # a bigger grid is checked one swept value at a time


def trains(args: Sequence[str]) -> bool:
    """Whether ARGS ask Hydra to train (one run, or `-m`), not for something else (`--cfg`,
    `--help`, ...: Hydra answers those)."""
    return all(a in _RUN_FLAGS for a in args if a.startswith("-"))


def job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of the jobs `tunelab train [-m] OVERRIDES` would run: for `-m`, the
    grid expanded (one swept value at a time past 32 jobs), a sweeper's `interval` by its ends.
    ConfigError (one line) for an override Hydra cannot parse or a sweep it cannot compose."""
    parsed = _parse(overrides)
    if not multirun:
        return [overrides]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    with composer(return_hydra_config=True) as compose_one:
        composed = compose_job(compose_one, fixed)
    sweeper = composed.hydra.sweeper
    if problems := sweeper_problems(sweeper, composed.model.task):
        raise ConfigError(problems)
    searched = _parse(with_preset_space(overrides, sweeper.get("params") or {}))
    common = [o.input_line for o in searched if not o.is_sweep_override()]
    swept = {o.get_key_element(): _candidates(o) for o in searched if o.is_sweep_override()}
    if not swept:
        return [common]
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


def with_preset_space(overrides: list[str], params: Mapping[str, Any]) -> list[str]:
    """A sweep's overrides: the command line's, plus the sweeper's `params` (a preset's search
    space) for the keys the command line does not set. The command line's value of a key wins,
    so `hparams_search=X training.batch_size=16` trains every trial at 16."""
    given = {o.get_key_element() for o in _parse(overrides)}
    return [*overrides, *(f"{k}={v}" for k, v in params.items() if k not in given)]


def sweeper_problems(sweeper: Any, task: str) -> list[str]:
    """What is wrong with tunelab's Optuna sweeper's settings (none for another sweeper)."""
    if str(sweeper.get("_target_", "")) != OPTUNA_SWEEPER:
        return []
    found = []
    reported = metrics.produced(task)
    pruned_by = sweeper.pruning.get("metric")
    if sweeper.pruner != "none" and pruned_by and pruned_by not in reported:
        found.append(
            f"hydra.sweeper.pruning.metric: {pruned_by!r} is not reported by a {task} run's "
            f"evaluations; use one of {', '.join(reported)}"
        )
    if sweeper.pruner not in PRUNERS:
        found.append(
            f"hydra.sweeper.pruner: {sweeper.pruner!r} is not a pruner; use one of "
            + ", ".join(PRUNERS)
        )
    storage = sweeper.storage
    if storage is not None and not str(storage).startswith(STUDY_STORES):
        found.append(
            f"hydra.sweeper.storage: {str(storage).split('://')[0]}:// cannot hold a study "
            "shared by workers; use sqlite:///ABS/PATH.db (one machine) or "
            "postgresql://USER@HOST/DB (several machines)"
        )
    for key in ("n_trials", "n_jobs"):
        if int(sweeper[key]) < 1:
            found.append(f"hydra.sweeper.{key}: {sweeper[key]}; give 1 or more")
    if int(sweeper.max_retry) < 0:
        found.append(f"hydra.sweeper.max_retry: {sweeper.max_retry}; give 0 or more")
    return found


def compose_job(compose_one: Callable[[list[str]], DictConfig], overrides: list[str]) -> DictConfig:
    """Compose one job (with a `composer`'s function); Hydra's errors come out as ConfigError,
    one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose_one(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError([_composition_problem(str(exc), overrides)]) from None
    except Exception as exc:  # Hydra raises plain ValueErrors too (`checkpoint=0`)
        raise ConfigError([f"{' '.join(overrides)}: {first_line(exc)}"]) from None


def _parse(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    try:
        return list(parser.parse_overrides(overrides=overrides))
    except HydraException as exc:
        bad = next((o for o in overrides if _unparsable(parser, o)), " ".join(overrides))
        raise ConfigError(
            [
                f"{bad!r}: not a valid override ({str(exc).splitlines()[0]}); write key=value, "
                "group=option, +key=value to add a key, or key=a,b for a sweep with -m"
            ]
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
    groups = [o for o in overrides if "." not in key_of(o) and not o.startswith(("+", "~"))]
    try:
        base = compose(groups)
    except Exception:  # a bad group choice too: fall back to the defaults
        base = compose()
    node: Any = OmegaConf.to_container(base, resolve=False)
    parts, walked = key.split("."), list[str]()
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
