"""What a run tells its tracking store: the `Tracker` protocol (the runner's stages and
Trainer's callback talk to it), and the tracker that does nothing (`tracking=none`, or a store
that is down with tracking.required=false). MLflow's is tracking.mlflow_tracker.MlflowTracker;
a new tracker is a class beside it satisfying this protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from tunelab.checkpoints.protocol import OnCommit


class Tracker(Protocol):
    """What the runner and Trainer's callback tell the tracking store."""

    run_id: str | None
    ui_hint: str | None
    continued: bool  # an earlier process of this run already logged its params

    def checkpoint_hook(self, policy: str) -> OnCommit | None: ...
    def flush_metrics(self) -> None: ...
    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None: ...
    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def describe(self, text: str) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, context: str, rows: int) -> None: ...
    def log_model(self, local_dir: Path, metrics: dict[str, Any], step: int) -> str | None: ...
    def finish(self, status: str, error: str | None = None) -> None: ...


class NullTracker:
    """`tracking=none`, or a store that is down with tracking.required=false: the run trains
    and writes its artifact, nothing is logged."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.ui_hint: str | None = None
        self.continued = False

    def checkpoint_hook(self, policy: str) -> OnCommit | None:
        return None

    def flush_metrics(self) -> None:
        pass

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def describe(self, text: str) -> None:
        pass

    def log_dataset(self, name: str, digest: str, source: str, context: str, rows: int) -> None:
        pass

    def log_model(self, local_dir: Path, metrics: dict[str, Any], step: int) -> str | None:
        return None

    def finish(self, status: str, error: str | None = None) -> None:
        pass
