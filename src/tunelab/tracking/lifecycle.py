"""A tracked run's life: opened (an MLflow run, new or continued, or a tracker that does
nothing), ended with an honest status whatever stops it, and a finished artifact whose MLflow
run never heard of it (its process died first, or the store was down) uploaded late."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from tunelab import manifests
from tunelab.errors import TrialPruned
from tunelab.tracking import store
from tunelab.tracking.liveness import repair_stale
from tunelab.tracking.lost_store import CLIENT_SETTINGS
from tunelab.tracking.mlflow_tracker import MlflowTracker
from tunelab.tracking.tracker import NullTracker, Tracker
from tunelab.tracking.values import flatten

log = logging.getLogger("tunelab")


def open_run(
    cfg: Any,
    run_name: str,
    tags: dict[str, str],
    resolved: dict[str, Any],
    overrides: list[str],
    previous_run_id: str | None = None,
) -> Tracker:
    """A tracker for `cfg.tracking`: an MLflow run (continued when `previous_run_id` is still
    unfinished, so a resumed run never re-logs its params), or a tracker that does nothing.
    Stale RUNNING runs left by dead processes are marked KILLED on the way."""
    if cfg.tracking.backend == "none":
        return NullTracker()
    uri = store.resolve_uri(cfg.tracking.uri)
    for variable, value in CLIENT_SETTINGS.items():
        os.environ.setdefault(variable, value)
    try:
        store.check_reachable(uri)
        tracker = MlflowTracker(uri, cfg.tracking.experiment, run_name, tags, previous_run_id)
    except store.TrackingUnavailable as exc:
        if cfg.tracking.required:
            raise
        log.warning(
            "%s; training without tracking (tracking.required=false). When the store is back, "
            "run the same command again: it finds the finished artifact and uploads it.",
            exc,
        )
        return NullTracker()
    repair_stale(tracker.client, tracker.experiment_id, keep=tracker.run_id)
    if cfg.tracking.system_metrics:
        tracker.start_system_metrics()
    if not tracker.continued:
        from omegaconf import OmegaConf

        tracker.log_params(flatten(resolved))
        tracker.log_text(OmegaConf.to_yaml(resolved), "config/tunelab.yaml")
        tracker.log_text(OmegaConf.to_yaml(list(overrides)), "config/overrides.yaml")
    return tracker


@contextmanager
def recording(
    tracker: Tracker, defer_signals: Callable[[], AbstractContextManager[Any]] = nullcontext
) -> Iterator[None]:
    """End the run with FINISHED, FAILED (exception, with the error as a tag) or KILLED (Ctrl-C,
    or pruned by a sweep's pruner: tagged `tunelab.trial_state=PRUNED`).
    `defer_signals`: a block in which a further Ctrl-C/SIGTERM waits until the block ends (the
    run ends stopped anyway), so the run's status is always written rather than left RUNNING."""
    status, error = "FINISHED", None
    try:
        yield
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGINT after the checkpoint
        status, error = "KILLED", str(exc) or "interrupted (Ctrl-C)"
        raise
    except TrialPruned as exc:  # KILLED, as MLflow's own Optuna storage ends a pruned trial
        status = "KILLED"
        tracker.set_tags({"tunelab.trial_state": "PRUNED", "tunelab.pruned_at_step": exc.step})
        raise
    except BaseException as exc:
        status, error = "FAILED", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        with defer_signals():
            tracker.finish(status, error=error)


def complete_upload(
    cfg: Any,
    run_dir: Path,
    run_id: str | None,
    run_name: str,
    tags: dict[str, str],
    resolved: dict[str, Any],
    overrides: list[str],
) -> str | None:
    """For a finished artifact whose MLflow run is not FINISHED: log it now, into the same run
    when the store still has it, else into a new one. Returns the run id."""
    if cfg.tracking.backend == "none":
        return run_id
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = store.resolve_uri(cfg.tracking.uri)
    try:
        store.check_reachable(uri)
        if run_id and MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED":
            return run_id
    except store.TrackingUnavailable as exc:
        log.warning("%s; the finished artifact stays on disk, not uploaded", exc)
        return run_id
    except MlflowException:
        run_id = None  # not in this store (any more)
    tracker = open_run(cfg, run_name, tags, resolved, overrides, previous_run_id=run_id)
    with recording(tracker):
        model_dir = Path(run_dir) / "model"
        manifest = manifests.read_manifest(model_dir)
        tracker.log_model(model_dir, manifest.get("metrics", {}), manifest.get("step", 0))
        tracker.log_metrics(manifest.get("metrics", {}), manifest.get("step", 0))
        if (Path(run_dir) / ".hydra").is_dir():
            tracker.log_artifacts(Path(run_dir) / ".hydra", "config/hydra")
    log.info("uploaded %s to MLflow run %s", model_dir, tracker.run_id)
    return tracker.run_id
