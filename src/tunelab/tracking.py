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
    continued: bool = False

    def start_system_metrics(self) -> None:
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

    def log_dataset(self, name: str, digest: str, source: str, context: str, rows: int) -> None:
        """The data as an MLflow dataset input (the UI's Datasets column): name, digest, source.
        Only metadata is logged, never the rows."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        dataset = MetaDataset(source=_dataset_source(source), name=name, digest=digest[:36])
        entity = dataset._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", context), InputTag("tunelab.rows", str(rows))]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(entity, tags)])

    def log_model(self, local_dir: Path, metrics: dict[str, Any], step: int) -> str | None:
        """The final artifact as the run's Logged Model `model`: the Hugging Face directory is
        uploaded once, as the model's artifacts (MLflow 3 serves them under runs:/ID/model too),
        with the final metrics linked to it. Returns the model id."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

        for old in _logged_models(self.client, self.experiment_id, self.run_id):
            self.client.delete_logged_model(old.model_id)  # a half-finished earlier upload
        model = self.client.create_logged_model(
            self.experiment_id,
            name="model",
            source_run_id=self.run_id,
            tags={"tunelab.format": "huggingface", "tunelab.loader": "AutoModelForCausalLM"},
            model_type="transformers/causal_lm",
        )
        self.client.log_model_artifacts(model.model_id, str(local_dir))
        now = int(time.time() * 1000)
        final = [
            Metric(_metric_key(k), float(v), now, step, model_id=model.model_id)
            for k, v in metrics.items()
            if k.startswith("eval_") and isinstance(v, (int, float))
        ]
        if final:
            self.client.log_batch(self.run_id, metrics=final)
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
        return model.model_id

    def start_system_metrics(self) -> None:
        """CPU, memory, disk, network (and GPU when pynvml finds one), sampled in a thread."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system = SystemMetricsMonitor(
            self.run_id, sampling_interval=5, resume_logging=self.continued, tracking_uri=self.uri
        )
        self._system.start()

    def describe(self, text: str) -> None:
        """The run's one-line description in the UI (mlflow.note.content)."""
        self.set_tags({"mlflow.note.content": f"{text}; overrides: {self._overrides}"})

    def flush(self) -> None:
        for op in self._pending:
            if op is not None:
                op.wait()
        self._pending.clear()

    def finish(self, status: str, error: str | None = None) -> None:
        if getattr(self, "_system", None) is not None:
            self._system.finish()
            self._system = None
        self.flush()
        if error:
            self.set_tags({"tunelab.error": error[:5000]})
        self.client.set_terminated(self.run_id, status)


def _dataset_source(source: str) -> Any:
    """A file source for local files, a code source for data generated in code."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if Path(source).exists():
        return resolve_dataset_source(str(Path(source).resolve()))
    return CodeDatasetSource(tags={"generator": source})


def _logged_models(client: Any, experiment_id: str, run_id: str) -> list[Any]:
    found = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string="name = 'model'"
    )
    return [m for m in found if m.source_run_id == run_id]


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
    if cfg.tracking.system_metrics:
        tracker.start_system_metrics()
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
        tracker = MlflowTracker(
            resolve_uri(cfg.tracking.uri), cfg.tracking.experiment, "", {}, previous_run_id=run_id
        )
        manifest = artifacts.read_manifest(Path(run_dir) / "model")
        tracker.log_model(Path(run_dir) / "model", manifest.get("metrics", {}), manifest["step"])
        if (Path(run_dir) / ".hydra").is_dir():
            tracker.log_artifacts(Path(run_dir) / ".hydra", "config/hydra")
        tracker.finish("FINISHED")


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
        """Also adds throughput over each logging interval: samples/s and tokens/s."""

        def __init__(self) -> None:
            self.last: tuple[float, int, int] | None = None

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.last = (time.perf_counter(), state.global_step, state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if not logs or not state.is_world_process_zero:
                return
            logs = dict(logs)
            if "loss" in logs and self.last is not None:
                now, step, tokens = (
                    time.perf_counter(),
                    state.global_step,
                    state.num_input_tokens_seen,
                )
                elapsed = max(now - self.last[0], 1e-9)
                per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
                samples = (step - self.last[1]) * per_step * args.world_size
                logs["throughput/samples_per_second"] = samples / elapsed
                if tokens:
                    logs["throughput/tokens_per_second"] = (tokens - self.last[2]) / elapsed
                self.last = (now, step, tokens)
            tracker.log_metrics(logs, step=state.global_step)

    return TrackingCallback()


def log_inputs(
    tracker: NullTracker, rows: Any, base: str, params: int, trainable: int, train_tokens: int
) -> None:
    """What went in: a one-line description, the datasets, and model and data sizes as params
    (not again for a resumed run, whose params are already there)."""
    tracker.describe(
        f"{base} ({params / 1e6:.2f}M params) on {rows.source}: "
        f"{len(rows.train)} train / {len(rows.eval)} eval rows"
    )
    if tracker.continued:
        return
    for split in ("train", "eval"):
        if getattr(rows, split):
            source = rows.split_sources.get(split, rows.source)
            n_rows = len(getattr(rows, split))
            tracker.log_dataset(
                f"{rows.name}-{split}", rows.split_digest(split), source, split, n_rows
            )
    tracker.log_params(
        {
            "model.parameters": str(params),
            "model.trainable_parameters": str(trainable),
            "data.train_examples": str(len(rows.train)),
            "data.eval_examples": str(len(rows.eval)),
            "data.train_tokens": str(train_tokens),
        }
    )


def run_tags(
    run_dir: Path,
    overrides: list[str],
    resumed_from: Path | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    git = artifacts.git_state()
    tags = {
        "mlflow.source.name": "tunelab train",
        "mlflow.source.type": "LOCAL",
        "tunelab.overrides": " ".join(overrides) if overrides else "(none)",
        "tunelab.run_dir": str(Path(run_dir).resolve()),
        "tunelab.version": artifacts.versions().get("tunelab", "unknown"),
        "tunelab.versions": ", ".join(f"{k} {v}" for k, v in artifacts.versions().items()),
        **(extra or {}),
    }
    if resumed_from:
        tags["tunelab.resumed_from"] = str(resumed_from)
    if git["commit"]:
        tags["mlflow.source.git.commit"] = git["commit"]
        tags["tunelab.git_dirty"] = str(git["dirty"]).lower()
    return tags
