"""A picture of the search on the parent run, refreshed as trials end: the artifact folder
`sweep/` (a table of the trials and plots that render offline, with matplotlib) and the metric
`best_<objective>`, logged with the trial number as its step so its chart is the search's
progress. Read from the child runs (any sweep) and, for an Optuna search, from its study (the
states, the reported curves, parameter importances)."""

from __future__ import annotations

import csv
import logging
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.tracking import store

log = logging.getLogger("tunelab")

FOLDER = "sweep"


@dataclass
class Trial:
    """One trial (or grid job) as the picture shows it."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING
    params: dict[str, Any]
    objective: float | None
    steps: int | None
    run_id: str
    curve: dict[int, float] = field(default_factory=dict)  # step -> the metric it reported


def child_runs(client: Any, parent_id: str) -> list[Any]:
    """The MLflow runs hanging under the sweep's parent run."""
    return client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        max_results=5000,
    )


def trials_of(
    runs: list[Any], client: Any, swept: list[str], objective: str, curve_metric: str
) -> list[Trial]:
    """The child runs as trials, in order (trial or job number)."""
    status = {"FINISHED": "COMPLETE", "FAILED": "FAIL", "KILLED": "FAIL"}
    trials = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        number = int(tags.get("tunelab.trial_number", tags.get("tunelab.job_num", "-1")))
        state = tags.get("tunelab.trial_state") or status.get(run.info.status, run.info.status)
        curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, curve_metric)}
        trials.append(
            Trial(
                number=number,
                state=state,
                params={k: run.data.params.get(k) for k in swept},
                objective=metrics.get(objective) if state == "COMPLETE" else None,
                steps=max(curve) if curve else None,
                run_id=run.info.run_id,
                curve=curve,
            )
        )
    return sorted(trials, key=lambda t: t.number)


def refresh(
    cfg: Any, parent_id: str, swept: list[str], curve_metric: str | None = None, study: Any = None
) -> None:
    """Write the parent's `sweep/` folder and its `best_<objective>` points anew. The objective
    and its direction are the ones the children were tagged with; the curves are of
    `curve_metric` (what an Optuna trial reports to its pruner), else of the objective."""
    if cfg.tracking.backend == "none":
        return
    client = store.client_for(cfg.tracking.uri)
    runs = child_runs(client, parent_id)
    tagged = [r.data.tags for r in runs if r.data.tags.get("tunelab.objective")]
    if not tagged:
        return  # no job got far enough to say what it optimizes
    objective = tagged[0]["tunelab.objective"]
    maximize = tagged[0].get("tunelab.objective_direction") == "maximize"
    curve_metric = curve_metric or objective
    trials = trials_of(runs, client, swept, objective, curve_metric)
    with tempfile.TemporaryDirectory(prefix="tunelab-sweep-") as tmp:
        folder = Path(tmp)
        write_table(folder / "trials.csv", trials, swept, objective)
        draw(folder, trials, swept, objective, maximize, curve_metric, study)
        client.log_artifacts(parent_id, str(folder), FOLDER)
    log_progress(client, parent_id, trials, objective, maximize)


def write_table(path: Path, trials: list[Trial], swept: list[str], objective: str) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["number", "state", *swept, objective, "steps", "run_id"])
        for t in trials:
            value = "" if t.objective is None else f"{t.objective:.6g}"
            row = [t.number, t.state, *(t.params.get(k) for k in swept)]
            out.writerow([*row, value, t.steps if t.steps is not None else "", t.run_id])


def best_so_far(trials: list[Trial], maximize: bool) -> list[tuple[int, float]]:
    """(trial number, best objective up to it) for each trial that improved on the best."""
    points: list[tuple[int, float]] = []
    for t in trials:
        if t.objective is None or not math.isfinite(t.objective):
            continue
        better = not points or (
            t.objective > points[-1][1] if maximize else t.objective < points[-1][1]
        )
        if better:
            points.append((t.number, t.objective))
    return points


def log_progress(
    client: Any, parent_id: str, trials: list[Trial], objective: str, maximize: bool
) -> None:
    """`best_<objective>` at each trial that improved it (step = trial number), once each."""
    name = f"best_{objective}"
    logged = {m.step for m in client.get_metric_history(parent_id, name)}
    for number, value in best_so_far(trials, maximize):
        if number not in logged:
            client.log_metric(parent_id, name, value, step=number)


def draw(
    folder: Path,
    trials: list[Trial],
    swept: list[str],
    objective: str,
    maximize: bool,
    curve_metric: str,
    study: Any,
) -> None:
    """The plots, as PNG files in `folder` (matplotlib's Agg backend: no display, no browser)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    colors = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red"}
    done = [t for t in trials if t.objective is not None]
    values = [float(t.objective or 0.0) for t in done]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([t.number for t in done], values, color="tab:blue",
               label=f"{objective} (complete)", zorder=3)  # fmt: skip
    best = best_so_far(trials, maximize)
    if best:
        xs = [n for n, _ in best] + [trials[-1].number]
        ys = [v for _, v in best] + [best[-1][1]]
        ax.step(xs, ys, where="post", color="tab:green", label="best so far")
    for t in trials:
        if t.state in ("PRUNED", "FAIL"):
            ax.axvline(t.number, color=colors[t.state], alpha=0.25, lw=4)
    ax.set(
        xlabel="trial", ylabel=objective, title=f"{objective} per trial (shaded: pruned, failed)"
    )
    ax.legend(loc="best", fontsize=8)
    _save(fig, folder / "history.png")

    if swept:
        fig, axes = plt.subplots(1, len(swept), figsize=(4 * len(swept), 3.6), squeeze=False)
        for ax, key in zip(axes[0], swept, strict=True):
            xs = _numeric([t.params.get(key) for t in done])
            ax.scatter(xs, values, color="tab:blue")
            numbers = [x for x in xs if isinstance(x, float)]
            wide = bool(numbers) and min(numbers) > 0 and max(numbers) / min(numbers) > 100
            if wide and len(numbers) == len(xs):
                ax.set_xscale("log")  # a learning rate's range
            ax.set(xlabel=key, ylabel=objective)
        fig.suptitle(f"{objective} against each swept parameter")
        _save(fig, folder / "params.png")

    if any(t.curve for t in trials):
        fig, ax = plt.subplots(figsize=(7, 4))
        for t in trials:
            if not t.curve:
                continue
            steps = sorted(t.curve)
            values = [t.curve[s] for s in steps]
            pruned = t.state == "PRUNED"
            ax.plot(steps, values, color=colors.get(t.state, "tab:gray"), alpha=0.8,
                    ls="--" if pruned else "-", marker="x" if pruned else None,
                    markevery=[len(steps) - 1] if pruned else None)  # fmt: skip
        ax.set(xlabel="step", ylabel=curve_metric, title=f"{curve_metric} of every trial "
               "(orange dashed: pruned there)")  # fmt: skip
        _save(fig, folder / "curves.png")

    if study is not None:
        _study_plots(folder, study, plt)


def _study_plots(folder: Path, study: Any, plt: Any) -> None:
    """Parameter importances and parallel coordinates, once the study can give them."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])
    if len(complete) < 2 or len(study.best_trial.params) < 1:
        return
    # Optuna's matplotlib plots are "experimental". A filter for the process, not
    # catch_warnings: the picture is drawn in a background thread, and catch_warnings swaps the
    # filters of every thread.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # PED-ANOVA's note that few trials give equal importances: the bars say so themselves.
    warnings.filterwarnings("ignore", "Target and region quantiles", UserWarning)
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as exc:  # all values equal, or too few trials
        log.debug("no parameter importances yet: %s", exc)
    else:
        fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * len(importances)))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set(xlabel="importance (PED-ANOVA)", title="what moved the objective")
        _save(fig, folder / "importances.png")
    ax = optuna.visualization.matplotlib.plot_parallel_coordinate(study)
    _save(ax.figure, folder / "parallel_coordinates.png")


def _numeric(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(str(v))
    return out


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
