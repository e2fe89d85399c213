"""Tracking in MLflow: the store (store), one run's tracker (tracker), the Logged Model and
models read back (logged_model), background and late uploads (uploads), stale-run repair
(liveness) and Trainer's callback (callback, which imports transformers: import it where
training happens). mlflow itself is imported only inside the functions that use it."""

from tunelab.tracking.logged_model import download_model, fetch_model
from tunelab.tracking.store import (
    MODEL_URI_SCHEMES,
    TrackingUnavailable,
    check_reachable,
    client_for,
    recent_runs,
    resolve_uri,
)
from tunelab.tracking.tracker import (
    MAX_PARAM_VALUE,
    MlflowTracker,
    NullTracker,
    Tracker,
    flatten,
    log_inputs,
    log_outcome,
    log_processes,
    recording,
    run_tags,
    start,
)
from tunelab.tracking.uploads import complete_upload

__all__ = [
    "MAX_PARAM_VALUE",
    "MODEL_URI_SCHEMES",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingUnavailable",
    "check_reachable",
    "client_for",
    "complete_upload",
    "download_model",
    "fetch_model",
    "flatten",
    "log_inputs",
    "log_outcome",
    "log_processes",
    "recent_runs",
    "recording",
    "resolve_uri",
    "run_tags",
    "start",
]
