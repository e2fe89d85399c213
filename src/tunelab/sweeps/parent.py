"""The sweep's MLflow parent run: created (or found again) before any job starts, its children
ranked at the end, the best on the parent; and the Hydra callback that wraps a multirun in it.

The sweep's directory is derived from its overrides (like a run's), so the identical `-m` command
lands in the same directory, finds `sweep.json` and attaches to the same parent run; each job's
own `resume=auto` then skips finished jobs and resumes interrupted ones.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tunelab import config, tracking
from tunelab.constants import OPTUNA_SWEEPER
from tunelab.errors import TunelabError, first_line
from tunelab.sweeps import report
from tunelab.sweeps.records import failures, parent_run_id, write_record
from tunelab.tracking import store
from tunelab.tracking.liveness import process_tags

log = logging.getLogger("tunelab")


def job_count(task_overrides: list[str]) -> int | None:
    """Jobs in a grid sweep (the product of the comma-separated choices); None when a sweep
    override is not a plain list (ranges, intervals: the sweeper decides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    counts = []
    for override in OverridesParser.create().parse_overrides(task_overrides):
        if override.is_sweep_override():
            if not override.is_choice_sweep():
                return None
            counts.append(len(list(override.sweep_iterator())))
    return math.prod(counts) if counts else 1


def sweep_overrides(cfg: DictConfig) -> list[str]:
    """The sweep's overrides: the command line's and, for keys it does not set, the preset's
    search space (`hydra.sweeper.params`)."""
    params = cfg.hydra.sweeper.get("params") or {}
    return config.with_preset_space(list(cfg.hydra.overrides.task), params)


def draw_picture(
    cfg: DictConfig,
    parent_id: str,
    swept: list[str],
    curve_metric: str | None = None,
    study: Any = None,
) -> None:
    """The parent's `sweep/` picture, refreshed; a picture that cannot be drawn is a warning,
    never the sweep's failure."""
    try:
        report.refresh(cfg, parent_id, swept, curve_metric, study)
    except Exception as exc:  # noqa: BLE001 (matplotlib, the store: the search goes on)
        log.warning("the sweep's picture was not refreshed: %s", first_line(exc))


def pin_sweep(overrides: list[str], resume: str) -> None:
    """Fix the sweep directory's name and the keys the sweep varies, for every job (and every
    launcher worker, which inherits the environment)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
    config.set_sweep(config.run_dir_name(overrides, resume), swept)


_failed = 0  # jobs of the last multirun of this process that failed (for the exit status)
_unrecorded: str | None = None  # why the last multirun's end could not be recorded, if it could not
_unranked: str | None = None  # the objective no finished job of the last multirun reported


def failed_jobs() -> int:
    """Jobs of this process's last multirun that failed (0 before any)."""
    return _failed


def unrecorded_end() -> str | None:
    """Why the end of this process's last multirun could not be recorded in MLflow (None when
    it was, or nothing was tracked)."""
    return _unrecorded


def unranked_objective() -> str | None:
    """The objective no finished job of this process's last multirun reported, when none did
    (the jobs trained, but nothing ranks them)."""
    return _unranked


def forget_failures() -> None:
    global _failed, _unrecorded, _unranked
    _failed, _unrecorded, _unranked = 0, None, None


def start_parent(
    cfg: DictConfig, sweep_dir: Path, task_overrides: list[str], previous: str | None = None
) -> str | None:
    """Create the store, the experiment and the parent run before any job starts (parallel jobs
    then never race to create them), or reattach to the parent run of an earlier attempt
    (`previous`, else the one the sweep directory records) or of another worker."""
    if cfg.tracking.backend == "none":
        return None
    name = config.display_name(task_overrides, cfg.get("name"))
    tags = {
        **process_tags(),  # so stale-run repair ends it if this process dies
        "tunelab.sweep": "parent",
        "tunelab.sweep_overrides": " ".join(task_overrides),
        "tunelab.sweep_dir": str(sweep_dir.resolve()),
        "mlflow.source.name": "tunelab train -m",
    }
    jobs = job_count(task_overrides)
    if jobs is not None:
        tags["tunelab.sweep_jobs"] = str(jobs)
    previous = previous or parent_run_id(sweep_dir)
    uri = store.resolve_uri(cfg.tracking.uri)
    store.check_reachable(uri)
    parent = tracking.MlflowTracker(
        uri, cfg.tracking.experiment, f"sweep:{name}", tags, previous, reopen_finished=True
    )
    parent.describe(f"sweep over {' '.join(task_overrides)} ({jobs or '?'} jobs)")
    record = {"parent_run_id": parent.run_id, "name": name, "overrides": task_overrides}
    write_record(sweep_dir, record)
    return parent.run_id


def finish_parent(cfg: DictConfig, sweep_dir: Path) -> list[dict[str, Any]]:
    """Tag the parent with the best job and the failed ones, end it, and return the jobs
    (best first, failed last) for the summary. A job that failed before its MLflow run existed
    is listed (and counted) from the failure noted in its directory."""
    failed = failures(sweep_dir)
    run_id = parent_run_id(sweep_dir)
    if cfg.tracking.backend == "none" or not run_id:
        return [_untracked(f) for f in failed]
    client = store.client_for(cfg.tracking.uri)
    jobs = children(client, run_id)
    tracked = {j["name"] for j in jobs}
    jobs += [_untracked(f) for f in failed if f.get("name") not in tracked]
    done = [j for j in jobs if j["objective"] is not None]
    tags: dict[str, str] = {"tunelab.sweep_finished_jobs": str(len(done))}
    tags["tunelab.sweep_failed_jobs"] = str(len(failed))
    if done:
        best = done[0]
        tags.update(
            {
                "tunelab.best_run_id": best["run_id"],
                "tunelab.best_run_name": best["name"],
                "tunelab.best_objective": f"{best['objective_name']}={best['objective']:.6g}",
            }
        )
    before = client.get_run(run_id).data.tags
    promoted = before.get(REGISTERED_RUN) == (done[0]["run_id"] if done else None)
    if done and cfg.sweep.get("register_as") and not promoted:
        # Once per winner: another worker of the study, or the same command again, ends the
        # same parent without registering the same model twice.
        tags[REGISTERED] = promote(cfg, run_id, done[0])
        tags[REGISTERED_RUN] = done[0]["run_id"]
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if str(cfg.hydra.sweeper.get("_target_", "")) != OPTUNA_SWEEPER:  # its sweeper drew it
        draw_picture(cfg, run_id, config.swept_keys())
    client.set_terminated(run_id, "FAILED" if jobs and not done else "FINISHED")
    return jobs


def abandon(cfg: DictConfig, parent_id: str, why: str) -> None:
    """End a parent run FAILED with `why`: its sweep stopped on an error."""
    client = store.client_for(cfg.tracking.uri)
    client.set_tag(parent_id, "tunelab.error", why[:5000])
    client.set_terminated(parent_id, "FAILED")


REGISTERED = "tunelab.registered_model"  # on the parent: where the winner was registered
REGISTERED_RUN = "tunelab.registered_run_id"  # on the parent: the run registered there


def promote(cfg: DictConfig, parent_id: str, best: dict[str, Any]) -> str:
    """Register the best job's model as a new version of `sweep.register_as`, alias champion,
    tagged with the sweep and its objective. Returns what the parent is tagged with."""
    name = str(cfg.sweep.register_as)
    tags = {
        "tunelab.sweep_parent_run_id": parent_id,
        "tunelab.objective": str(best["objective_name"]),
        "tunelab.objective_value": f"{best['objective']:.6g}",
    }
    done = tracking.registry.register(
        cfg.tracking.uri, best["run_id"], name, tracking.registry.CHAMPION, tags
    )
    print(f"tunelab: the best job is registered as {done.name} version {done.version}: {done.uri}")
    return f"{done.uri} (version {done.version})"


def _untracked(failure: dict[str, str]) -> dict[str, Any]:
    return {
        "run_id": "no MLflow run",
        "name": failure.get("name", "?"),
        "status": "FAILED",
        "overrides": "",
        "objective_name": None,
        "objective": None,
        "maximize": False,
        "error": failure.get("error", ""),
    }


def children(client: Any, parent_id: str) -> list[dict[str, Any]]:
    """The parent's child runs with their overrides and objective, best first, failed last."""
    jobs = []
    for run in report.child_runs(client, parent_id):
        name = run.data.tags.get("tunelab.objective")
        value = run.data.metrics.get(name) if name else None
        jobs.append(
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                "overrides": run.data.tags.get("tunelab.overrides", ""),
                "objective_name": name,
                "objective": None if run.info.status != "FINISHED" else value,
                "maximize": run.data.tags.get("tunelab.objective_direction") == "maximize",
                "error": run.data.tags.get("tunelab.error", ""),
                "trial_state": run.data.tags.get("tunelab.trial_state"),
                "pruned_at_step": run.data.tags.get("tunelab.pruned_at_step"),
            }
        )
    ranked = sorted(
        (j for j in jobs if j["objective"] is not None),
        key=lambda j: -j["objective"] if j["maximize"] else j["objective"],
    )
    return ranked + [j for j in jobs if j["objective"] is None]


def find_parent(
    uri: str | None, experiment: str, ref: str
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The tags and the jobs of the sweep whose parent run has id `ref`, or name `ref` /
    `sweep:ref`."""
    from mlflow.exceptions import MlflowException

    client = store.client_for(uri)
    try:
        run = client.get_run(ref)
    except MlflowException:
        pass
    else:
        tags = run.data.tags
        if tags.get("tunelab.sweep") != "parent":
            of = tags.get("mlflow.parentRunId")
            raise TunelabError(
                f"run {ref} is not a sweep's parent run"
                + (f"; it is a job of the sweep {of}: tunelab runs --sweep {of}" if of else "")
            )
        return tags, children(client, run.info.run_id)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        for name in (ref, f"sweep:{ref}"):
            found = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.mlflow.runName = '{name}' and tags.`tunelab.sweep` = 'parent'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if found:
                return found[0].data.tags, children(client, found[0].info.run_id)
    raise TunelabError(
        f"no sweep {ref!r} in experiment {experiment!r} (give its parent run's id or name, as "
        "`tunelab runs` lists them)"
    )


def summary(jobs: list[dict[str, Any]]) -> str:
    """The sweep's jobs side by side, best first; failed jobs with their error."""
    if not jobs:
        return "tunelab: sweep finished (no tracked jobs, none failed)"
    lines = ["tunelab: sweep finished, best first:"]
    for rank, job in zip(itertools.count(1), jobs):
        if job["objective"] is not None:
            score = f"{job['objective_name']}={job['objective']:.4g}"
        elif job.get("trial_state") == "PRUNED":
            score = f"PRUNED at step {job.get('pruned_at_step') or '?'}"
        else:
            score = f"{job['status']}: {job['error'][:200]}"
        lines.append(f"  {rank:>3}. {job['name']}  ->  {score}  [{job['run_id']}]")
    return "\n".join(lines)


class SweepCallback(Callback):
    """Hydra callback: the parent run around a multirun."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        overrides = sweep_overrides(config)
        pin_sweep(overrides, str(config.get("resume", "auto")))
        # Hydra sets this only per job; the sweep's own paths resolve against it too.
        HydraConfig.instance().set_config(config)
        if str(config.hydra.sweeper.get("_target_", "")) != OPTUNA_SWEEPER:
            start_parent(config, Path(HydraConfig.get().sweep.dir), overrides)
        # else the sweeper does, with its study locked: its workers share one parent

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        global _failed, _unrecorded, _unranked
        HydraConfig.instance().set_config(config)
        sweep_dir = Path(HydraConfig.get().sweep.dir)
        _failed = len(failures(sweep_dir))  # counted first: the store may be gone
        try:
            jobs = finish_parent(config, sweep_dir)
        except Exception as exc:  # noqa: BLE001 (Hydra would turn it into a warning, exit 0)
            _unrecorded = first_line(exc)
            jobs = [_untracked(f) for f in failures(sweep_dir)]
        print(summary(jobs))
        finished = [
            j for j in jobs if j["status"] == "FINISHED" and j.get("trial_state") != "PRUNED"
        ]
        if finished and all(j["objective"] is None for j in finished):
            _unranked = str(finished[0]["objective_name"] or config.sweep.objective)


def mark_trial(cfg: DictConfig, parent_id: str, number: int, state: str) -> None:
    """Tag the child run of Optuna trial `number` with the state the study holds for it
    (COMPLETE, PRUNED, FAIL), so the UI can filter the search's runs by it."""
    if cfg.tracking.backend == "none":
        return
    client = store.client_for(cfg.tracking.uri)
    found = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=(
            f"tags.mlflow.parentRunId = '{parent_id}' and tags.`tunelab.trial_number` = '{number}'"
        ),
        max_results=5,
    )
    for run in found:
        client.set_tag(run.info.run_id, "tunelab.trial_state", state)
