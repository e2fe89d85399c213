"""MLflow tracking: one run per job, params from the resolved config, metrics by global step,
the final artifact, and an honest status. `tracking=none` gives a tracker that does nothing."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab import artifacts

MAX_PARAM_VALUE = 6000  # MLflow's limit; longer values are truncated, never dropped
MAX_PARAM_KEY = 250
_BATCH = 100  # MLflow accepts at most 100 params per log_batch call


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


def artifact_root(uri: str) -> str | None:
    """For a sqlite store, artifacts live beside the database in `mlartifacts/`."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).parent / "mlartifacts")
    return None


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}; lists become JSON; values cut at MLflow's limit."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    value = json.dumps(tree) if isinstance(tree, (list, tuple)) else str(tree)
    if len(value) > MAX_PARAM_VALUE:
        marker = "...[truncated]"
        value = value[: MAX_PARAM_VALUE - len(marker)] + marker
    out[prefix.rstrip(".")[:MAX_PARAM_KEY]] = value
    return out


class NullTracker:
    """`tracking=none`: the run trains and writes its artifact, nothing is logged."""

    run_id: str | None = None
    ui_hint: str | None = None

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

    def finish(self, status: str, error: str | None = None) -> None:
        pass


class MlflowTracker(NullTracker):
    """One MLflow run, written through MlflowClient (no global active-run state)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        tags: dict[str, str],
        previous_run_id: str | None = None,
    ) -> None:
        """Continue `previous_run_id` when the store still has it unfinished (a resumed run keeps
        its run id, status back to RUNNING); otherwise create a new run."""
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = _experiment_id(self.client, experiment, artifact_root(uri))
        run = _unfinished_run(self.client, previous_run_id, self.experiment_id)
        self.continued = run is not None
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            resumes = int(run.data.tags.get("tunelab.resumes", "0")) + 1
            self.client.set_tag(run.info.run_id, "tunelab.resumes", str(resumes))
        self.run_id = run.info.run_id
        if self.continued:
            self.set_tags({k: v for k, v in tags.items() if k.startswith("tunelab.resumed")})
        self.artifact_uri = run.info.artifact_uri
        self._pending: list[Any] = []
        self._overrides = tags.get("tunelab.overrides", "")
        self.ui_hint = (
            f"tunelab ui  ->  http://127.0.0.1:5000/#/experiments/{self.experiment_id}"
            f"/runs/{self.run_id}"
        )

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Queued on MLflow's background logger, so training never waits on the store."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(_metric_key(k), float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if batch:
            self._pending.append(self.client.log_batch(self.run_id, batch, synchronous=False))

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=items)

    def describe(self, text: str) -> None:
        """The run's one-line description in the UI (mlflow.note.content)."""
        self.set_tags({"mlflow.note.content": f"{text}; overrides: {self._overrides}"})

    def flush(self) -> None:
        for op in self._pending:
            if op is not None:
                op.wait()
        self._pending.clear()

    def finish(self, status: str, error: str | None = None) -> None:
        self.flush()
        if error:
            self.set_tags({"tunelab.error": error[:5000]})
        self.client.set_terminated(self.run_id, status)


def _unfinished_run(client: Any, run_id: str | None, experiment_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    ok = run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"
    return run if ok and run.info.status != "FINISHED" else None


def _metric_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


def _experiment_id(client: Any, name: str, root: str | None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if root:
        slug = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        location = Path(root, slug).as_uri()
    try:
        # experimentKind opens the experiment in the UI's "Model training" view, not GenAI's.
        kind = {"mlflow.experimentKind": "custom_model_development"}
        return client.create_experiment(name, artifact_location=location, tags=kind)
    except MlflowException:  # created meanwhile by a parallel job
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def start(
    cfg: Any,
    run_name: str,
    tags: dict[str, str],
    resolved: dict,
    overrides: list[str],
    previous_run_id: str | None = None,
) -> NullTracker:
    """A tracker for `cfg.tracking`: an MLflow run (continued when `previous_run_id` is still
    unfinished, so a resumed run never re-logs its params), or a tracker that does nothing."""
    if cfg.tracking.backend == "none":
        return NullTracker()
    uri = resolve_uri(cfg.tracking.uri)
    tracker = MlflowTracker(uri, cfg.tracking.experiment, run_name, tags, previous_run_id)
    if not tracker.continued:
        from omegaconf import OmegaConf

        tracker.log_params(flatten(resolved))
        tracker.log_text(OmegaConf.to_yaml(resolved), "config/tunelab.yaml")
        tracker.log_text(OmegaConf.to_yaml(list(overrides)), "config/overrides.yaml")
    return tracker


def complete_upload(cfg: Any, run_id: str | None, run_dir: Path) -> None:
    """For a run whose artifact is complete on disk but whose MLflow run is not FINISHED (the
    process died between the two): log the artifact again and mark the run FINISHED."""
    if cfg.tracking.backend == "none" or not run_id:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=resolve_uri(cfg.tracking.uri))
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return
    if run.info.status != "FINISHED":
        client.log_artifacts(run_id, str(Path(run_dir) / "model"), "model")
        if (Path(run_dir) / ".hydra").is_dir():
            client.log_artifacts(run_id, str(Path(run_dir) / ".hydra"), "config/hydra")
        client.set_terminated(run_id, "FINISHED")


@contextmanager
def recording(tracker: NullTracker) -> Iterator[None]:
    """End the run with FINISHED, FAILED (exception, with the error as a tag) or KILLED (Ctrl-C)."""
    try:
        yield
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGINT after the checkpoint
        tracker.finish("KILLED", error=str(exc) or "interrupted (Ctrl-C)")
        raise
    except BaseException as exc:
        tracker.finish("FAILED", error=f"{type(exc).__name__}: {exc}")
        raise
    tracker.finish("FINISHED")


def trainer_callback(tracker: NullTracker) -> Any:
    """A TrainerCallback sending Trainer's logs (loss, lr, grad norm, eval metrics, throughput)
    to `tracker` at the global step. Replaces report_to="mlflow", which drops long params and
    uploads every checkpoint in the foreground."""
    from transformers import TrainerCallback

    class TrackingCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if logs and state.is_world_process_zero:
                tracker.log_metrics(logs, step=state.global_step)

    return TrackingCallback()


def run_tags(
    run_dir: Path, overrides: list[str], resumed_from: Path | None = None
) -> dict[str, str]:
    git = artifacts.git_state()
    tags = {
        "mlflow.source.name": "tunelab train",
        "mlflow.source.type": "LOCAL",
        "tunelab.overrides": " ".join(overrides) if overrides else "(none)",
        "tunelab.run_dir": str(Path(run_dir).resolve()),
        "tunelab.version": artifacts.versions().get("tunelab", "unknown"),
    }
    if resumed_from:
        tags["tunelab.resumed_from"] = str(resumed_from)
    if git["commit"]:
        tags["mlflow.source.git.commit"] = git["commit"]
        tags["tunelab.git_dirty"] = str(git["dirty"]).lower()
    return tags
