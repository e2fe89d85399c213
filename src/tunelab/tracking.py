"""MLflow tracking: one run per job, params from the resolved config, metrics by global step,
the final artifact, and an honest status. `tracking=none` gives a tracker that does nothing."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab import artifacts

log = logging.getLogger("tunelab")

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

    def checkpoint_hook(self, policy: str) -> Any:
        return None

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
        reopen_finished: bool = False,
    ) -> None:
        """Continue `previous_run_id` when the store still has it unfinished (a resumed run keeps
        its run id, status back to RUNNING), or even finished with `reopen_finished` (a sweep's
        parent); otherwise create a new run."""
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = _experiment_id(self.client, experiment, artifact_root(uri))
        run = _unfinished_run(self.client, previous_run_id, self.experiment_id, reopen_finished)
        self.continued = run is not None
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            resumes = int(run.data.tags.get("tunelab.resumes", "0")) + 1
            self.client.set_tag(run.info.run_id, "tunelab.resumes", str(resumes))
        self.run_id = run.info.run_id
        if self.continued:  # a new process: who runs it now, and from where it resumed
            self.set_tags({k: v for k, v in tags.items() if k.startswith(_PER_PROCESS_TAGS)})
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

        if self.continued:  # only an earlier process of this run can have left one
            for old in _logged_models(self.client, self.experiment_id, self.run_id):
                self.client.delete_logged_model(old.model_id)  # a half-finished upload
        model = self.client.create_logged_model(
            self.experiment_id,
            name="model",
            source_run_id=self.run_id,
            tags={"tunelab.format": "huggingface", "tunelab.loader": "AutoModelForCausalLM"},
            model_type="transformers/causal_lm",
        )
        if not _link_into(model.artifact_location, Path(local_dir)):
            self.client.log_model_artifacts(model.model_id, str(local_dir))
        self._log_transformers_flavor(model.model_id, Path(local_dir))
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

    def checkpoint_hook(self, policy: str) -> Any:
        """For tracking.log_checkpoints: a commit hook that mirrors checkpoints into the run's
        artifacts (`checkpoints/checkpoint-<step>/`) on a background thread."""
        if policy == "none":
            return None
        self._uploader = CheckpointUploader(self, policy)
        return self._uploader.on_commit

    def _log_transformers_flavor(self, model_id: str, local_dir: Path) -> None:
        """An MLmodel file beside the Hugging Face files, so `mlflow.transformers.load_model`
        and pyfunc load the logged model too. It points the flavor's weights at the directory
        itself (model_binary ".") rather than a copy; only the tokenizer files (small) are
        repeated under components/tokenizer/, where the flavor looks for them."""
        import shutil
        import tempfile

        import transformers
        from mlflow.models import Model

        weights_and_ours = ("model.safetensors", "model-", "config.json", "generation_config.json",
                            artifacts.CONFIG, artifacts.MANIFEST, "README.md")  # fmt: skip
        arch = artifacts.read_json(local_dir / "config.json").get("architectures") or ["?"]
        tok_class = artifacts.read_json(local_dir / "tokenizer_config.json").get("tokenizer_class")
        with tempfile.TemporaryDirectory() as tmp:
            components = Path(tmp, "components", "tokenizer")
            components.mkdir(parents=True)
            for file in local_dir.iterdir():
                if file.is_file() and not file.name.startswith(weights_and_ours):
                    shutil.copy2(file, components / file.name)
            flavor = Model(model_id=model_id)
            flavor.add_flavor(
                "transformers",
                transformers_version=transformers.__version__,
                code=None,
                task="text-generation",
                instance_type="TextGenerationPipeline",
                pipeline_model_type=arch[0],
                source_model_name="tunelab",
                framework="pt",
                model_binary=".",
                components=["tokenizer"],
                tokenizer_type=tok_class or "PreTrainedTokenizerFast",
            )
            flavor.add_flavor("python_function", loader_module="mlflow.transformers")
            flavor.save(str(Path(tmp, "MLmodel")))
            self.client.log_model_artifacts(model_id, tmp)

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
        if getattr(self, "_uploader", None) is not None:
            self._uploader.close()  # a FINISHED run has all its checkpoint uploads done
            self._uploader = None
        if getattr(self, "_system", None) is not None:
            self._system.finish()
            self._system = None
        self.flush()
        if error:
            self.set_tags({"tunelab.error": error[:5000]})
        self.client.set_terminated(self.run_id, status)


_PER_PROCESS_TAGS = ("tunelab.resumed", "tunelab.host", "tunelab.pid")


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


class CheckpointUploader:
    """Mirrors committed checkpoints into the run's artifacts, one upload at a time in a
    background thread, so training never waits on the store.

    `all` uploads every checkpoint and never deletes; `last` keeps only the newest in the store;
    `best` uploads a checkpoint only when it is the best and keeps only that one. A checkpoint that
    local rotation removes is removed from the store too (except with `all`). Files go up in name
    order with `manifest.json` last, so a store copy without a manifest is incomplete, as on disk.
    """

    def __init__(self, tracker: MlflowTracker, policy: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.tracker, self.policy = tracker, policy
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelab-upload")
        self.stored: list[str] = []  # checkpoint names in the store, oldest first
        self.errors: list[str] = []

    def on_commit(self, path: Path, removed: list[Path], best: Path | None) -> None:
        if self.policy != "all":
            for old in removed:
                self.pool.submit(self._delete, old.name)
        if self.policy == "best" and path != best:
            return
        self.pool.submit(self._upload, Path(path))

    def _upload(self, path: Path) -> None:
        name = path.name
        if not path.is_dir():  # rotated away locally before its turn came: nothing to mirror
            return
        try:
            files = sorted(p for p in path.rglob("*") if p.is_file())
            files.sort(key=lambda p: p.name == artifacts.MANIFEST)  # the manifest last
            for file in files:
                sub = file.parent.relative_to(path).as_posix()
                dest = f"checkpoints/{name}" + ("" if sub == "." else f"/{sub}")
                self.tracker.client.log_artifact(self.tracker.run_id, str(file), dest)
        except Exception as exc:  # rotated away mid-upload, or the store failed
            self.errors.append(f"{name}: {exc}")
            log.warning("checkpoint upload of %s failed (%s); removing the partial copy", name, exc)
            self._delete(name)
            return
        self.stored.append(name)
        if self.policy in ("last", "best"):
            for older in [n for n in self.stored if n != name]:
                self._delete(older)

    def _delete(self, name: str) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            repo = get_artifact_repository(self.tracker.artifact_uri, tracking_uri=self.tracker.uri)
            repo.delete_artifacts(f"checkpoints/{name}")
        except Exception as exc:  # already gone, or the store cannot delete
            log.debug("could not delete checkpoints/%s from the store: %s", name, exc)
        if name in self.stored:
            self.stored.remove(name)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.errors:
            self.tracker.set_tags(
                {"tunelab.checkpoint_upload_errors": "; ".join(self.errors)[:5000]}
            )


def _link_into(artifact_uri: str, source: Path) -> bool:
    """Hard-link the files of `source` into a local (`file:`) artifact location: the store holds
    the artifact without a second copy of the weights, in no time. False, with nothing left
    behind, when the location is not local or not on the same filesystem: then it is copied.
    The artifact's files are read-only (artifacts.save_final), so neither side is edited in
    place."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    if not artifact_uri.startswith("file:"):
        return False
    dest = Path(local_file_uri_to_path(artifact_uri))
    linked: list[Path] = []
    try:
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            target = dest / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(file, target)
            linked.append(target)
    except OSError as exc:  # another filesystem (EXDEV), no hard links, or a clash
        log.debug("cannot hard-link the artifact into %s (%s); copying", dest, exc)
        for target in linked:
            target.unlink(missing_ok=True)
        return False
    return True


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


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; raised before anything is trained."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when a server is down."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                pass
        except urllib.error.HTTPError:
            return  # the server answered (an auth proxy, a path it does not serve): it is up
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailable(
                f"tracking server {uri} cannot be reached ({reason})"
            ) from None


def start(
    cfg: Any,
    run_name: str,
    tags: dict[str, str],
    resolved: dict,
    overrides: list[str],
    previous_run_id: str | None = None,
) -> NullTracker:
    """A tracker for `cfg.tracking`: an MLflow run (continued when `previous_run_id` is still
    unfinished, so a resumed run never re-logs its params), or a tracker that does nothing.
    Stale RUNNING runs left by dead processes are marked KILLED on the way."""
    if cfg.tracking.backend == "none":
        return NullTracker()
    uri = resolve_uri(cfg.tracking.uri)
    try:
        check_reachable(uri)
    except TrackingUnavailable as exc:
        if cfg.tracking.required:
            raise
        log.warning(
            "%s; training without tracking (tracking.required=false). When the store is back, "
            "run the same command again: it finds the finished artifact and uploads it.",
            exc,
        )
        return NullTracker()
    tracker = MlflowTracker(uri, cfg.tracking.experiment, run_name, tags, previous_run_id)
    repair_stale(tracker.client, tracker.experiment_id, keep=tracker.run_id)
    if cfg.tracking.system_metrics:
        tracker.start_system_metrics()
    if not tracker.continued:
        from omegaconf import OmegaConf

        tracker.log_params(flatten(resolved))
        tracker.log_text(OmegaConf.to_yaml(resolved), "config/tunelab.yaml")
        tracker.log_text(OmegaConf.to_yaml(list(overrides)), "config/overrides.yaml")
    return tracker


def complete_upload(
    cfg: Any,
    run_dir: Path,
    run_id: str | None,
    run_name: str,
    tags: dict[str, str],
    resolved: dict,
    overrides: list[str],
) -> str | None:
    """For a finished artifact whose MLflow run is not FINISHED (the process died between the
    two, or the store was down with tracking.required=false): log it now, into the same run
    when the store still has it, else into a new one. Returns the run id."""
    if cfg.tracking.backend == "none":
        return run_id
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = resolve_uri(cfg.tracking.uri)
    try:
        check_reachable(uri)
        if run_id and MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED":
            return run_id
    except TrackingUnavailable as exc:
        log.warning("%s; the finished artifact stays on disk, not uploaded", exc)
        return run_id
    except MlflowException:
        run_id = None  # not in this store (any more)
    tracker = start(cfg, run_name, tags, resolved, overrides, previous_run_id=run_id)
    with recording(tracker):
        model_dir = Path(run_dir) / "model"
        manifest = artifacts.read_manifest(model_dir)
        tracker.log_model(model_dir, manifest.get("metrics", {}), manifest.get("step", 0))
        tracker.log_metrics(manifest.get("metrics", {}), manifest.get("step", 0))
        if (Path(run_dir) / ".hydra").is_dir():
            tracker.log_artifacts(Path(run_dir) / ".hydra", "config/hydra")
    log.info("uploaded %s to MLflow run %s", model_dir, tracker.run_id)
    return tracker.run_id


def repair_stale(client: Any, experiment_id: str, keep: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment whose process (on this host) is gone,
    so a run never stays RUNNING after a kill -9 or a power cut. Returns their ids."""
    stale = []
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=500
    )
    for run in running:
        if run.info.run_id != keep and _process_gone(run.data.tags):
            why = "its process ended without reporting (killed?)"
            client.set_tag(run.info.run_id, "tunelab.error", why)
            client.set_terminated(run.info.run_id, "KILLED")
            stale.append(run.info.run_id)
    return stale


def _process_gone(tags: dict[str, str]) -> bool:
    """True only when the run's process is known to be gone: same host, and no process with
    that pid and start time (a reused pid is not mistaken for the run's)."""
    import psutil

    if tags.get("tunelab.host") != socket.gethostname() or "tunelab.pid" not in tags:
        return False
    try:
        started = psutil.Process(int(tags["tunelab.pid"])).create_time()
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, ValueError):
        return False
    return abs(started - float(tags.get("tunelab.pid_started", started))) > 1.0


def process_tags() -> dict[str, str]:
    """Who is running this run, so a later start can tell whether it is still alive."""
    import psutil

    me = psutil.Process()
    return {
        "tunelab.host": socket.gethostname(),
        "tunelab.pid": str(me.pid),
        "tunelab.pid_started": f"{me.create_time():.3f}",
    }


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
        **process_tags(),
        **(extra or {}),
    }
    if resumed_from:
        tags["tunelab.resumed_from"] = str(resumed_from)
    if git["commit"]:
        tags["mlflow.source.git.commit"] = git["commit"]
        tags["tunelab.git_dirty"] = str(git["dirty"]).lower()
    return tags


# ---------------------------------------------------------------------------------------------
# Reading the store back: `tunelab runs`, `export`, `generate`, and models:/ or runs:/ sources.

MODEL_URI_SCHEMES = ("runs:/", "models:/")


def client_for(uri: str | None) -> Any:
    from mlflow import MlflowClient

    resolved = resolve_uri(uri)
    check_reachable(resolved)
    # MLflow 3.17 resolves runs:/ID/model -> models:/ID against the *default* store: make the
    # default this store too.
    os.environ["MLFLOW_TRACKING_URI"] = resolved
    return MlflowClient(tracking_uri=resolved)


def download_model(source: str, dst: Path, uri: str | None = None) -> Path:
    """Download a run's model (a run id, runs:/ID/model or models:/...) into `dst`, verified
    against its manifest, written beside `dst` and renamed into place when complete."""
    import tempfile

    import mlflow.artifacts

    client_for(uri)
    if not source.startswith(MODEL_URI_SCHEMES):
        source = f"runs:/{source}/model"
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(source, dst_path=tmp))
        problems = artifacts.verify_manifest(local)
        if problems:
            raise RuntimeError(f"{source}: the download does not match its manifest: {problems[0]}")
        os.replace(local, dst)
    return dst


def fetch_model(name_or_path: str | None, uri: str | None, cache: Path) -> str | None:
    """A local directory for `model.name_or_path`: MLflow URIs are downloaded once into `cache`
    (keyed by the URI); paths and hub ids are returned as they are."""
    if not name_or_path or not name_or_path.startswith(MODEL_URI_SCHEMES):
        return name_or_path
    import hashlib

    key = hashlib.sha1(f"{resolve_uri(uri)} {name_or_path}".encode()).hexdigest()[:16]
    local = Path(cache) / key
    if not artifacts.is_complete(local):
        log.info("downloading %s to %s", name_or_path, local)
        download_model(name_or_path, local, uri)
    return str(local)


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
                "name": info.run_name,
                "status": info.status,
                "eval_exact_match": m.get("eval_exact_match"),
                "eval_loss": m.get("eval_loss"),
                "duration_s": (end - info.start_time) / 1000,
                "artifact": _artifact_of(run.data.tags),
            }
        )
    return rows
