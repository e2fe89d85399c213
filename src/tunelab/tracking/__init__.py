"""Tracking in MLflow, from the bottom of the package up:

    values, liveness, lost_store   MLflow's limits on names and values; stale RUNNING runs; a
                                   store that stops answering mid-run
    store                          the store's URI, whether it answers, a client, links, listing
    tracker                        the `Tracker` protocol, and the tracker that does nothing
    uploads, logged_model,         checkpoints mirrored beside training; the artifact as the
    system_metrics, continuation   run's Logged Model; the machine's metrics; a run created or
                                   continued (each takes a client and a run id, not a tracker)
    downloads                      models read back into local directories (`resolve_model`)
    mlflow_tracker                 one MLflow run as a `Tracker`
    records, lifecycle             what a run records; a run opened, ended, uploaded late
    callback                       Trainer's logs to the tracker (imports transformers: import
                                   it where training happens)

mlflow itself is imported only inside the functions that use it."""

from tunelab.constants import MODEL_URI_SCHEMES
from tunelab.tracking import registry
from tunelab.tracking.downloads import download_model, resolve_model
from tunelab.tracking.lifecycle import complete_upload, open_run, recording
from tunelab.tracking.mlflow_tracker import MlflowTracker
from tunelab.tracking.records import log_inputs, log_outcome, log_processes, run_tags
from tunelab.tracking.store import (
    MODEL_URI_TAG,
    TrackingUnavailable,
    check_reachable,
    client_for,
    recent_runs,
    resolve_uri,
)
from tunelab.tracking.tracker import NullTracker, Tracker
from tunelab.tracking.values import MAX_PARAM_VALUE, flatten

__all__ = [
    "MAX_PARAM_VALUE",
    "MODEL_URI_SCHEMES",
    "MODEL_URI_TAG",
    "MlflowTracker",
    "registry",
    "NullTracker",
    "Tracker",
    "TrackingUnavailable",
    "check_reachable",
    "client_for",
    "complete_upload",
    "download_model",
    "flatten",
    "log_inputs",
    "log_outcome",
    "log_processes",
    "open_run",
    "recent_runs",
    "recording",
    "resolve_model",
    "resolve_uri",
    "run_tags",
]
