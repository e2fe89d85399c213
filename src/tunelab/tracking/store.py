"""Where runs are tracked: the store's URI, whether it answers, a client for it, the experiment,
links into its UI, and reading runs back for `tunelab runs`."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab.errors import TrackingUnavailable, first_line
from tunelab.tracking.liveness import repair_stale

LOCAL_UI = "http://127.0.0.1:5000"  # what `tunelab ui` serves a local store on
MODEL_URI_TAG = "tunelab.model_uri"  # on a run: its Logged Model, models:/m-...


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI, always absolute: `uri`, else $MLFLOW_TRACKING_URI, else
    sqlite:///<cwd>/mlflow.db. A relative sqlite path or a bare *.db path is made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        return "sqlite:///" + str(Path(path).expanduser().resolve())
    if "://" not in uri and uri.endswith(".db"):
        return "sqlite:///" + str(Path(uri).expanduser().resolve())
    return uri


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def artifact_root(uri: str) -> str | None:
    """For a sqlite store, artifacts live beside the database in `mlartifacts/`."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).parent / "mlartifacts")
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when a server is down, or up
    without its database: /health answers without touching it, so a one-row query follows
    (MLflow's client retries a 5xx for minutes)."""
    if not is_server(uri):
        return
    import urllib.error
    import urllib.request

    base = uri.rstrip("/")
    query = urllib.request.Request(
        base + "/api/2.0/mlflow/experiments/search",
        data=b'{"max_results": 1}',
        headers={"Content-Type": "application/json", **_credentials()},
    )
    for request, wait in ((base + "/health", timeout), (query, 3 * timeout)):
        try:
            with urllib.request.urlopen(request, timeout=wait):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403) and request is query:  # MLflow's login (--auth)
                given = "" if _credentials() else "; none were given"
                raise TrackingUnavailable(
                    f"tracking server {uri} refused the login (HTTP {exc.code}{given}): set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (`tunelab server "
                    "--auth` names the file that holds them)"
                ) from None
            if exc.code < 500:
                return  # it answered (a path it does not serve): it is up
            raise TrackingUnavailable(
                f"tracking server {uri} answers, but its backend store does not "
                f"(HTTP {exc.code}: {_error_message(exc)})"
            ) from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailable(
                f"tracking server {uri} cannot be reached ({reason})"
            ) from None


def _credentials() -> dict[str, str]:
    """The Authorization header MLflow's client sends, from the same environment variables:
    MLFLOW_TRACKING_USERNAME/PASSWORD (basic), else MLFLOW_TRACKING_TOKEN (bearer)."""
    import base64

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        pair = base64.standard_b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def refused(uri: str, what: str, exc: BaseException) -> TrackingUnavailable:
    """The one line for a store that answered the reachability check but would not `what`
    (create the experiment, create the run): a server whose database cannot write (a full
    disk: HTTP 503 after MLflow's retries), a refusal it answered, a local store's error."""
    text = first_line(exc)
    retried = re.search(r"Caused by ResponseError\('(.+?)'\)", text)
    code = str(getattr(exc, "error_code", ""))
    failing = bool(retried) or code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")
    reason = retried.group(1) if retried else text[:300]
    if not is_server(uri):
        return TrackingUnavailable(f"tracking store {uri} could not {what} ({reason})")
    if failing:
        return TrackingUnavailable(
            f"tracking server {uri} answers, but could not {what} ({reason}): its backend "
            "store fails to write (a full disk?); see the server's log (`make server`: "
            ".tunelab-server/mlflow.log)"
        )
    return TrackingUnavailable(f"tracking server {uri} refused to {what} ({reason})")


def _error_message(exc: Any) -> str:
    """The first line of an MLflow server's error answer (JSON with a `message`), else its
    reason."""
    import json

    try:
        message = str(json.loads(exc.read()).get("message") or "")
    except (OSError, ValueError, AttributeError):
        message = ""
    return (message.strip().splitlines() or [str(exc.reason)])[0][:300]


def client_for(uri: str | None) -> Any:
    """An MlflowClient for the store `uri` names (resolved), once it answers."""
    from mlflow import MlflowClient

    resolved = resolve_uri(uri)
    check_reachable(resolved)
    return MlflowClient(tracking_uri=resolved)


@contextmanager
def default_store(uri: str) -> Iterator[None]:
    """Make `uri` MLflow's default store while the block runs: MLflow 3.17 resolves
    runs:/ID/model -> models:/ID against the default store, whatever store was passed."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link to the experiment (or run) in the UI of the store actually used: the server's own
    address, or `tunelab ui`'s local one for a file or database store."""
    base = uri.rstrip("/") if is_server(uri) else LOCAL_UI
    page = f"{base}/#/experiments/{experiment_id}"
    return (f"{page}/runs/{run_id}" if run_id else page) + MODEL_TRAINING


# The UI's switch between its GenAI and model-training views is kept in the browser (GenAI by
# default); a link that says which one opens the latter, and the browser keeps it from then on.
MODEL_TRAINING = "?workflowType=machine_learning"


def ui_hint(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """What a finished run prints: the link, and for a local store the command that serves it."""
    url = ui_url(uri, experiment_id, run_id)
    return url if is_server(uri) else f"tunelab ui  ->  {url}"


def experiment_id(client: Any, name: str, root: str | None) -> str:
    """The id of experiment `name`, created (with its artifacts under `root`) if missing."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if root:
        slug = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        location = Path(root, slug).as_uri()
    try:
        # experimentKind opens the experiment in the UI's "Model training" view, not GenAI's.
        kind = {"mlflow.experimentKind": "custom_model_development"}
        return str(client.create_experiment(name, artifact_location=location, tags=kind))
    except MlflowException:  # created meanwhile by a parallel job
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _artifact_of(tags: dict[str, str]) -> str:
    """Where a run's artifact is on disk: `<run dir>/model`, or a sweep parent's directory."""
    if "tunelab.run_dir" in tags:
        return tags["tunelab.run_dir"] + "/model"
    return tags.get("tunelab.sweep_dir", "-")


def recent_runs(uri: str | None, experiment: str, limit: int = 20) -> list[dict[str, Any]]:
    """Rows for `tunelab runs`, newest first (stale RUNNING runs are repaired first)."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    repair_stale(client, exp.experiment_id)
    rows = []
    newest_first = ["attributes.start_time DESC"]
    for run in client.search_runs([exp.experiment_id], max_results=limit, order_by=newest_first):
        info, m = run.info, run.data.metrics
        end = info.end_time or int(time.time() * 1000)
        rows.append(
            {
                "run_id": info.run_id,
                "experiment_id": str(exp.experiment_id),
                "name": info.run_name,
                "status": info.status,
                "task": run.data.params.get("model.task"),
                "objective": run.data.tags.get("tunelab.objective"),
                "metrics": dict(m),
                "duration_s": (end - info.start_time) / 1000,
                "artifact": _artifact_of(run.data.tags),
                "model": run.data.tags.get(MODEL_URI_TAG),
            }
        )
    return rows
