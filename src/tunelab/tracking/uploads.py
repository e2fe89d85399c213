"""Uploads that happen beside training: checkpoints mirrored into the run's artifacts in the
background, and a finished artifact uploaded late (its process died before MLflow heard, or
the store was down with tracking.required=false)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab import manifests
from tunelab.checkpoints.protocol import OnCommit

if TYPE_CHECKING:
    from tunelab.tracking.tracker import MlflowTracker

log = logging.getLogger("tunelab")

__all__ = ["CheckpointUploader", "OnCommit", "complete_upload"]


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
            files.sort(key=lambda p: p.name == manifests.MANIFEST)  # the manifest last
            for file in files:
                sub = file.parent.relative_to(path).as_posix()
                dest = f"checkpoints/{name}" + ("" if sub == "." else f"/{sub}")
                self.tracker.client.log_artifact(self.tracker.id, str(file), dest)
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


def complete_upload(
    cfg: Any,
    run_dir: Path,
    run_id: str | None,
    run_name: str,
    tags: dict[str, str],
    resolved: dict[str, Any],
    overrides: list[str],
) -> str | None:
    """For a finished artifact whose MLflow run is not FINISHED: log it now, into the same run
    when the store still has it, else into a new one. Returns the run id."""
    if cfg.tracking.backend == "none":
        return run_id
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tunelab.tracking import store
    from tunelab.tracking.tracker import recording, start

    uri = store.resolve_uri(cfg.tracking.uri)
    try:
        store.check_reachable(uri)
        if run_id and MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED":
            return run_id
    except store.TrackingUnavailable as exc:
        log.warning("%s; the finished artifact stays on disk, not uploaded", exc)
        return run_id
    except MlflowException:
        run_id = None  # not in this store (any more)
    tracker = start(cfg, run_name, tags, resolved, overrides, previous_run_id=run_id)
    with recording(tracker):
        model_dir = Path(run_dir) / "model"
        manifest = manifests.read_manifest(model_dir)
        tracker.log_model(model_dir, manifest.get("metrics", {}), manifest.get("step", 0))
        tracker.log_metrics(manifest.get("metrics", {}), manifest.get("step", 0))
        if (Path(run_dir) / ".hydra").is_dir():
            tracker.log_artifacts(Path(run_dir) / ".hydra", "config/hydra")
    log.info("uploaded %s to MLflow run %s", model_dir, tracker.run_id)
    return tracker.run_id
