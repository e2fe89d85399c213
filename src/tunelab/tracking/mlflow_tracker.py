"""One MLflow run as a `Tracker`: written through MlflowClient (no global active-run state), its
metrics queued so training never waits on the store, its checkpoints mirrored (uploads), its
Logged Model (logged_model), the machine's metrics (system_metrics); once the store stops
answering, every call does nothing (lost_store)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from tunelab import testhooks
from tunelab.checkpoints.protocol import OnCommit
from tunelab.errors import first_line
from tunelab.tracking import logged_model, store, system_metrics
from tunelab.tracking.continuation import create_or_continue
from tunelab.tracking.lost_store import drop_queued_metrics, tolerant
from tunelab.tracking.uploads import CheckpointUploader
from tunelab.tracking.values import metric_key

log = logging.getLogger("tunelab")

_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
# Set again when a run is continued: they describe this attempt (the process, where it resumed,
# the study's trial it now runs: a failed trial is asked again under a new number).
_PER_ATTEMPT_TAGS = ("tunelab.resumed", "tunelab.host", "tunelab.pid", "tunelab.trial_number")


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
        parent); otherwise create a new run (tracking.continuation)."""
        from mlflow import MlflowClient

        self.uri = uri
        self.lost: str | None = None  # why the store stopped answering mid-run
        self._losing = threading.Lock()
        self._pending: list[Any] = []
        self._uploader: CheckpointUploader | None = None
        self._system: Any = None  # MLflow's system-metrics monitor, while it samples
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id, run, self.continued = create_or_continue(
            self.client, uri, experiment, run_name, tags, previous_run_id, reopen_finished
        )
        self.run_id: str | None = run.info.run_id
        if self.continued:  # a new process: who runs it now, and from where it resumed
            self.set_tags({k: v for k, v in tags.items() if k.startswith(_PER_ATTEMPT_TAGS)})
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
        drop_queued_metrics(self.client)
        if self._uploader is not None:  # checkpoint uploads not started yet: dropped
            self._uploader.abandon()
            self._uploader = None
        if self._system is not None:
            system_metrics.abandon_monitor(self._system)
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

    @tolerant
    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.id, params=items[i : i + _BATCH])

    @tolerant
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

    @tolerant
    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.id, str(local_dir), artifact_path)

    @tolerant
    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.id, text, artifact_file)

    @tolerant
    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def describe(self, text: str) -> None:
        """The run's one-line description in the UI (mlflow.note.content)."""
        self.set_tags({"mlflow.note.content": f"{text}; overrides: {self._overrides}"})

    @tolerant
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

    @tolerant
    def log_model(self, local_dir: Path, metrics: dict[str, Any], step: int) -> str | None:
        """The artifact as the run's Logged Model; a continued run's earlier, half-finished one
        (only an earlier process of this run can have left one) is replaced."""
        return logged_model.log_model(
            self.client, self.experiment_id, self.id, Path(local_dir), metrics, step,
            replace_earlier=self.continued,
        )  # fmt: skip

    def checkpoint_hook(self, policy: str) -> OnCommit | None:
        """For tracking.log_checkpoints: a commit hook that mirrors checkpoints into the run's
        artifacts (`checkpoints/checkpoint-<step>/`) on a background thread."""
        if policy == "none":
            return None
        self._uploader = CheckpointUploader(
            self.client, self.id, self.artifact_uri, self.uri, policy
        )
        return self._uploader.on_commit

    def start_system_metrics(self) -> None:
        """CPU, memory, disk, network (and GPU when pynvml finds one), sampled in a thread."""
        self._system = system_metrics.start_monitor(self.id, self.uri, resume=self.continued)

    @tolerant
    def flush_metrics(self) -> None:
        """Wait until the metrics queued so far are in the store. Called before each checkpoint
        commits, so a kill -9 right after the commit loses none (the resume logs only later
        steps)."""
        self._wait_for_metrics()

    def _wait_for_metrics(self) -> None:
        pending, self._pending = self._pending, []
        for op in pending:
            if op is not None and not self.lost:
                op.wait()

    @tolerant  # nothing to write once the store is lost
    def finish(self, status: str, error: str | None = None) -> None:
        if self._uploader is not None:  # a FINISHED run has all its checkpoint uploads done
            failed = self._uploader.close()
            self._uploader = None
            if failed:
                self.set_tags({"tunelab.checkpoint_upload_errors": "; ".join(failed)[:5000]})
        if self._system is not None:
            system_metrics.finish_monitor(self._system)
            self._system = None
        self._wait_for_metrics()
        testhooks.pause("FINISH")  # a test signals the process right here
        if error:
            self.set_tags({"tunelab.error": error[:5000]})
        elif self.continued:  # an earlier attempt's error would describe this run wrongly
            self._forget_earlier_error()
        self.client.set_terminated(self.id, status)

    def _forget_earlier_error(self) -> None:
        if "tunelab.error" in self.client.get_run(self.id).data.tags:
            self.client.delete_tag(self.id, "tunelab.error")


def _dataset_source(source: str) -> Any:
    """A file source for local files, a code source for data generated in code."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if Path(source).exists():
        return resolve_dataset_source(str(Path(source).resolve()))
    return CodeDatasetSource(tags={"generator": source})
