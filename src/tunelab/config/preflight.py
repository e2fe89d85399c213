"""Preflight: every config `tunelab train ARGS` would run, composed and validated before Hydra
starts (so before any directory, MLflow run or heavy import), Hydra's own errors included.

A config preflight validated is marked (by a digest in the environment, which launcher workers
inherit), so the job that runs it does not validate it again; a job preflight could not foresee
(a sweeper's choice, a grid too big to expand) validates its own config.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from tunelab.config.checks import resolved, validate
from tunelab.config.compose import compose, composer
from tunelab.config.naming import key_of
from tunelab.errors import first_line

_RUN_FLAGS = ("-m", "--multirun")
_MAX_JOBS_CHECKED = 32  # a bigger grid is checked one swept value at a time
VALIDATED_ENV = "TUNELAB_VALIDATED"


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
    valid: list[str] = []
    with composer() as compose_one:
        for job in jobs:
            try:
                cfg = _compose_checked(compose_one, job)
                found = validate(cfg)
            except _Problem as exc:
                found = [str(exc)]
            else:
                if not found:
                    valid.append(digest(cfg))
            for problem in found:
                problems.setdefault(problem, []).append(job)
    if not problems:
        os.environ[VALIDATED_ENV] = json.dumps(valid)
    if not flags or len(jobs) == 1:
        return list(problems)
    return [
        f"{p} (in {len(js)} of {len(jobs)} jobs, e.g. {' '.join(js[0])})"
        for p, js in problems.items()
    ]


def digest(cfg: DictConfig) -> str:
    """What identifies a job's config for `validated`: its resolved body, Hydra's keys aside."""
    body = resolved(cfg)
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def validated(cfg: DictConfig) -> bool:
    """True when preflight already validated exactly this config in this command."""
    marked = os.environ.get(VALIDATED_ENV)
    if not marked:
        return False
    try:
        return digest(cfg) in json.loads(marked)
    except Exception:  # unresolvable: not validated, let validate() say why
        return False


def exit_on_problems(problems: list[str]) -> None:
    """Print each problem on its own line and exit with status 2 (nothing has been created)."""
    if problems:
        fail(problems)


def fail(problems: list[str]) -> NoReturn:
    from tunelab import distributed

    if distributed.is_main():  # under torchrun every rank finds the same problems
        for p in problems:
            print(f"tunelab: config error: {p}", file=sys.stderr)
    raise SystemExit(2)


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
    with composer(return_hydra_config=True) as compose_one:
        sweeper = _compose_checked(compose_one, common).hydra.sweeper
    params = sweeper.get("params") or {}
    for key, spec in params.items():
        if key not in swept:
            (o,) = _parse(parser, [f"{key}={spec}"])
            swept[o.get_key_element()] = _candidates(o) if o.is_sweep_override() else [str(spec)]
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


def _parse(parser: Any, overrides: list[str]) -> list[Any]:
    from hydra.errors import HydraException

    try:
        return list(parser.parse_overrides(overrides=overrides))
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


def _compose_checked(compose_one: Any, overrides: list[str]) -> DictConfig:
    """Compose; Hydra's errors come out as one problem line each."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg: DictConfig = compose_one(overrides)
        return cfg
    except (HydraException, OmegaConfBaseException) as exc:
        raise _Problem(_composition_problem(str(exc), overrides)) from None
    except Exception as exc:  # Hydra raises plain ValueErrors too (`checkpoint=0`)
        first = first_line(exc)
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
