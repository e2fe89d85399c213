"""One tracked run: the `Tracker` protocol, with an MLflow tracker and a tracker that does
nothing (`tracking=none`) as siblings, and the run's start, inputs and honest end status."""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tunelab import provenance, testhooks
from tunelab.errors import first_line
from tunelab.tracking import store
from tunelab.tracking.liveness import process_tags, repair_stale
from tunelab.tracking.uploads import OnCommit

log = logging.getLogger("tunelab")

MAX_PARAM_VALUE = 6000  # MLflow's limit; longer values are truncated, never dropped
MAX_PARAM_KEY = 250
_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
_PER_PROCESS_TAGS = ("tunelab.resumed", "tunelab.host", "tunelab.pid")


class Tracker(Protocol):
    """What the runner and Trainer's callback tell the tracking store."""

    run_id: str | None
    ui_hint: str | None
    continued: bool  # an earlier process of this run already logged its params

    def checkpoint_hook(self, policy: str) -> OnCommit | None: ...
    def settle(self) -> None: ...
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

    def settle(self) -> None:
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


# A server that stops answering mid-run costs seconds, not MLflow's default minutes of retries
# per call (7 retries, backoff factor 2, 120 s timeouts); the environment's own values win.
CLIENT_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # Queued metrics reach the store one batch at a time, in order: MLflow sends up to 10 at
    # once, and two batches of one run with the same key race on the server's latest-metric
    # upsert (PostgreSQL: "duplicate key value violates unique constraint latest_metric_pk").
    "MLFLOW_ASYNC_LOGGING_THREADPOOL_SIZE": "1",
}

_F = TypeVar("_F", bound=Callable[..., Any])


def _lost_errors() -> tuple[type[BaseException], ...]:
    """What a store that stopped answering raises: MLflow's errors, HTTP and database ones."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    errors: list[type[BaseException]] = [MlflowException, RequestException, OSError]
    try:
        from sqlalchemy.exc import SQLAlchemyError

        errors.append(SQLAlchemyError)
    except ImportError:
        pass
    return tuple(errors)


def _tolerant(method: _F) -> _F:
    """A tracker call that, once the store has stopped answering, does nothing: the run goes
    on, writes its artifact, and the same command uploads it later (tracking.uploads)."""

    @functools.wraps(method)
    def call(self: MlflowTracker, *args: Any, **kwargs: Any) -> Any:
        if self.lost:
            return None
        try:
            return method(self, *args, **kwargs)
        except _lost_errors() as exc:
            self.lose(exc)
            return None

    return call  # type: ignore[return-value]


class MlflowTracker:
    """One MLflow run, written through MlflowClient (no global active-run state)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        tags: dict[str, str],
        previous_run_id: str | None = None,
        reopen_finished: bool = False,
    ) -> None:
        """Continue `previous_run_id` when the store still has it unfinished (a resumed run keeps
        its run id, status back to RUNNING), or even finished with `reopen_finished` (a sweep's
        parent); otherwise create a new run."""
        from mlflow import MlflowClient

        self.uri = uri
        self.lost: str | None = None  # why the store stopped answering mid-run
        self._losing = threading.Lock()
        self._pending: list[Any] = []
        self._uploader: Any = None
        self._system: Any = None
        self.client = MlflowClient(tracking_uri=uri)
        # A store that answered the reachability check may still fail to write (a server's
        # full disk: 503s): one line, store.TrackingUnavailable, before anything is trained.
        doing = f"create the experiment {experiment!r}"
        try:
            root = store.artifact_root(uri)
            self.experiment_id = store.experiment_id(self.client, experiment, root)
            doing = "create the run"
            run = _unfinished_run(self.client, previous_run_id, self.experiment_id, reopen_finished)
            if run is None and previous_run_id is None:
                run = _orphan(self.client, self.experiment_id, tags)
            self.continued = run is not None
            if run is None:
                run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            else:
                doing = f"continue the run {run.info.run_id}"
                self.client.update_run(run.info.run_id, status="RUNNING")
                resumes = int(run.data.tags.get("tunelab.resumes", "0")) + 1
                self.client.set_tag(run.info.run_id, "tunelab.resumes", str(resumes))
        except _lost_errors() as exc:
            raise store.refused(uri, doing, exc) from None
        self.run_id: str | None = run.info.run_id
        if self.continued:  # a new process: who runs it now, and from where it resumed
            self.set_tags({k: v for k, v in tags.items() if k.startswith(_PER_PROCESS_TAGS)})
        self.artifact_uri = run.info.artifact_uri
        self._overrides = tags.get("tunelab.overrides", "")
        self.ui_hint: str | None = store.ui_hint(uri, self.experiment_id, run.info.run_id)

    def lose(self, exc: BaseException) -> None:
        """The store stopped answering: say so once, and log nothing more from this process."""
        with self._losing:  # the training loop and the checkpoint writer may both find out
            if self.lost:
                return
            self.lost = first_line(exc)[:300]
        self.ui_hint = None
        _drop_queued_metrics(self.client)
        if self._uploader is not None:  # checkpoint uploads not started yet: dropped
            self._uploader.pool.shutdown(wait=False, cancel_futures=True)
            self._uploader = None
        if self._system is not None:  # the sampler thread stops at its next tick
            getattr(self._system, "_shutdown_event", threading.Event()).set()
            self._system = None
        log.warning(
            "tracking: %s stopped answering during the run (%s); training goes on without it. "
            "Once it is back, run the same command again: it uploads the finished artifact "
            "into this MLflow run.",
            self.uri,
            self.lost,
        )

    @property
    def id(self) -> str:
        assert self.run_id is not None
        return self.run_id

    @_tolerant
    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.id, params=items[i : i + _BATCH])

    @_tolerant
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Queued on MLflow's background logger, so training never waits on the store."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(metric_key(k), float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if batch:
            self._pending.append(self.client.log_batch(self.id, batch, synchronous=False))

    @_tolerant
    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.id, str(local_dir), artifact_path)

    @_tolerant
    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.id, text, artifact_file)

    @_tolerant
    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def describe(self, text: str) -> None:
        """The run's one-line description in the UI (mlflow.note.content)."""
        self.set_tags({"mlflow.note.content": f"{text}; overrides: {self._overrides}"})

    @_tolerant
    def log_dataset(self, name: str, digest: str, source: str, context: str, rows: int) -> None:
        """The data as an MLflow dataset input (the UI's Datasets column): name, digest, source.
        Only metadata is logged, never the rows."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        # MetaDataset's stub marks `profile` abstract; the class implements it (returns None).
        dataset = MetaDataset(  # type: ignore[abstract]
            source=_dataset_source(source), name=name, digest=digest[:36]
        )
        entity = dataset._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", context), InputTag("tunelab.rows", str(rows))]
        for attempt in range(3):
            try:
                self.client.log_inputs(self.id, datasets=[DatasetInput(entity, tags)])
                return
            except Exception as exc:  # parallel jobs creating the same dataset row at once
                log.debug("logging dataset %s failed (%s); attempt %d", name, exc, attempt + 1)
                time.sleep(0.2 * (attempt + 1))
        # Dataset inputs are metadata: never fail a run over them.
        log.warning("dataset %s not logged to MLflow (the store refused it three times)", name)

    @_tolerant
    def log_model(self, local_dir: Path, metrics: dict[str, Any], step: int) -> str | None:
        from tunelab.tracking.logged_model import log_model

        return log_model(self, Path(local_dir), metrics, step)

    def checkpoint_hook(self, policy: str) -> OnCommit | None:
        """For tracking.log_checkpoints: a commit hook that mirrors checkpoints into the run's
        artifacts (`checkpoints/checkpoint-<step>/`) on a background thread."""
        from tunelab.tracking.uploads import CheckpointUploader

        if policy == "none":
            return None
        uploader = CheckpointUploader(self, policy)
        self._uploader = uploader
        return uploader.on_commit

    def start_system_metrics(self) -> None:
        """CPU, memory, disk, network (and GPU when pynvml finds one), sampled in a thread."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system = SystemMetricsMonitor(
            self.id, sampling_interval=5, resume_logging=self.continued, tracking_uri=self.uri
        )
        _sample(self._system)  # the sampler's first tick is after 5 s: a short run needs one now
        self._system.start()

    @_tolerant
    def settle(self) -> None:
        """Called before each checkpoint commits: the metrics logged so far are in the store,
        so a kill -9 right after the commit loses none (the resume logs only later steps)."""
        self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for op in pending:
            if op is not None and not self.lost:
                op.wait()

    @_tolerant  # nothing to write once the store is lost
    def finish(self, status: str, error: str | None = None) -> None:
        if self._uploader is not None:
            self._uploader.close()  # a FINISHED run has all its checkpoint uploads done
            self._uploader = None
        if self._system is not None:
            self._system.finish()
            _sample(self._system)  # and one at the end, however short the run was
            self._system = None
        self.flush()
        testhooks.pause("FINISH")  # a test signals the process right here
        if error:
            self.set_tags({"tunelab.error": error[:5000]})
        elif self.continued:  # an earlier attempt's error would describe this run wrongly
            self._forget_earlier_error()
        self.client.set_terminated(self.id, status)

    def _forget_earlier_error(self) -> None:
        if "tunelab.error" in self.client.get_run(self.id).data.tags:
            self.client.delete_tag(self.id, "tunelab.error")


def _drop_queued_metrics(client: Any) -> None:
    """Metrics still queued on MLflow's background logger are dropped (each would retry against
    the lost store, one error line each, and the process would wait for them at exit)."""
    from queue import Empty

    logging.getLogger("mlflow.utils.async_logging").setLevel(logging.CRITICAL)
    store_ = getattr(getattr(client, "_tracking_client", None), "store", None)
    queued = getattr(getattr(store_, "_async_logging_queue", None), "_queue", None)
    while queued is not None:
        try:
            batch = queued.get_nowait()
        except Empty:
            return
        batch.exception = RuntimeError("the tracking store was lost")
        batch.complete()  # whoever waits for it is told


def _sample(monitor: Any) -> None:
    """One system-metrics sample, logged at once."""
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as exc:  # a metric source failing must not fail the run
        log.debug("system metrics sample failed: %s", exc)


def metric_key(key: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


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


def _dataset_source(source: str) -> Any:
    """A file source for local files, a code source for data generated in code."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if Path(source).exists():
        return resolve_dataset_source(str(Path(source).resolve()))
    return CodeDatasetSource(tags={"generator": source})


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


def start(
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
    tracker: Tracker, held: Callable[[], AbstractContextManager[Any]] = nullcontext
) -> Iterator[None]:
    """End the run with FINISHED, FAILED (exception, with the error as a tag) or KILLED (Ctrl-C).
    `held`: a block in which a further Ctrl-C/SIGTERM waits (the run ends stopped anyway), so
    the run's status is always written rather than left RUNNING."""
    status, error = "FINISHED", None
    try:
        yield
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGINT after the checkpoint
        status, error = "KILLED", str(exc) or "interrupted (Ctrl-C)"
        raise
    except BaseException as exc:
        status, error = "FAILED", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        with held():
            tracker.finish(status, error=error)


def log_inputs(
    tracker: Tracker, rows: Any, base: str, params: int, trainable: int, train_tokens: int
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


def log_processes(tracker: Tracker, params: dict[str, Any]) -> None:
    """How many processes trained, the global batch size and the backend, as params; a resume
    (its params are set) notes the processes it ran with as a tag, as a resume may change them."""
    if tracker.continued:
        tracker.set_tags({"tunelab.resumed_with." + k: str(v) for k, v in params.items()})
    else:
        tracker.log_params({k: str(v) for k, v in params.items()})


def log_outcome(tracker: Tracker, objective: str, direction: str) -> None:
    tracker.set_tags({"tunelab.objective": objective, "tunelab.objective_direction": direction})


def run_tags(
    run_dir: Path,
    overrides: list[str],
    resumed_from: Path | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    git = provenance.git_state()
    tags = {
        "mlflow.source.name": "tunelab train",
        "mlflow.source.type": "LOCAL",
        "tunelab.overrides": " ".join(overrides) if overrides else "(none)",
        "tunelab.run_dir": str(Path(run_dir).resolve()),
        "tunelab.version": provenance.versions().get("tunelab", "unknown"),
        "tunelab.versions": ", ".join(f"{k} {v}" for k, v in provenance.versions().items()),
        **process_tags(),
        **(extra or {}),
    }
    if resumed_from:
        tags["tunelab.resumed_from"] = str(resumed_from)
    if git["commit"]:
        tags["mlflow.source.git.commit"] = git["commit"]
        tags["tunelab.git_dirty"] = str(git["dirty"]).lower()
    return tags
