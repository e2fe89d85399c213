"""A run's MLflow run created, or continued: the unfinished run of an earlier process of the
same run (a resume keeps its run id), or the orphan a killed process left before it recorded
its id."""

from __future__ import annotations

from typing import Any

from tunelab.tracking import store
from tunelab.tracking.lost_store import lost_errors


def create_or_continue(
    client: Any,
    uri: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    previous_run_id: str | None = None,
    reopen_finished: bool = False,
) -> tuple[str, Any, bool]:
    """(experiment id, run, continued): `previous_run_id` continued when the store still has it
    unfinished (status back to RUNNING), or even finished with `reopen_finished` (a sweep's
    parent); else an orphan of the same run directory and config; else a new run. A store that
    answered the reachability check may still fail to write (a server's full disk: 503s): one
    line, store.TrackingUnavailable, before anything is trained."""
    doing = f"create the experiment {experiment!r}"
    try:
        experiment_id = store.experiment_id(client, experiment, store.artifact_root(uri))
        doing = "create the run"
        run = _unfinished_run(client, previous_run_id, experiment_id, reopen_finished)
        if run is None and previous_run_id is None:
            run = _orphan(client, experiment_id, tags)
        continued = run is not None
        if run is None:
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        else:
            doing = f"continue the run {run.info.run_id}"
            client.update_run(run.info.run_id, status="RUNNING")
            resumes = int(run.data.tags.get("tunelab.resumes", "0")) + 1
            client.set_tag(run.info.run_id, "tunelab.resumes", str(resumes))
    except lost_errors() as exc:
        raise store.refused(uri, doing, exc) from None
    return experiment_id, run, continued


def _unfinished_run(
    client: Any, run_id: str | None, experiment_id: str, reopen_finished: bool = False
) -> Any:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    ok = run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"
    return run if ok and (reopen_finished or run.info.status != "FINISHED") else None


def _orphan(client: Any, experiment_id: str, tags: dict[str, str]) -> Any:
    """The unfinished run an earlier process created for the same run directory and config but
    died (kill -9) before recording its id: continued rather than left beside a new one. The
    run directory's lock guarantees that process is gone."""
    run_dir, fingerprint = tags.get("tunelab.run_dir"), tags.get("tunelab.fingerprint")
    if not run_dir or not fingerprint or "'" in run_dir:
        return None
    found = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`tunelab.run_dir` = '{run_dir}' and tags.`tunelab.fingerprint` = '{fingerprint}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=10,
    )
    return next((r for r in found if r.info.status != "FINISHED"), None)
