"""Checkpoints mirrored into a run's artifacts beside training, in a background thread
(tracking.log_checkpoints)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tunelab import manifests

log = logging.getLogger("tunelab")


class CheckpointUploader:
    """Mirrors committed checkpoints into the artifacts of run `run_id` (through `client`), one
    upload at a time in a background thread, so training never waits on the store.

    `all` uploads every checkpoint and never deletes; `last` keeps only the newest in the store;
    `best` uploads a checkpoint only when it is the best and keeps only that one. A checkpoint that
    local rotation removes is removed from the store too (except with `all`). Files go up in name
    order with `manifest.json` last, so a store copy without a manifest is incomplete, as on disk.
    """

    def __init__(
        self, client: Any, run_id: str, artifact_uri: str, tracking_uri: str, policy: str
    ) -> None:
        self.client, self.run_id, self.policy = client, run_id, policy
        self.artifact_uri, self.tracking_uri = artifact_uri, tracking_uri
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelab-upload")
        self.stored: list[str] = []  # checkpoint names in the store, oldest first
        self.errors: list[str] = []

    def on_commit(self, path: Path, removed: list[Path], best: Path | None) -> None:
        """A checkpointing Trainer's commit hook (checkpoints.protocol.OnCommit)."""
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
                self.client.log_artifact(self.run_id, str(file), dest)
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
            repo = get_artifact_repository(self.artifact_uri, tracking_uri=self.tracking_uri)
            repo.delete_artifacts(f"checkpoints/{name}")
        except Exception as exc:  # already gone, or the store cannot delete
            log.debug("could not delete checkpoints/%s from the store: %s", name, exc)
        if name in self.stored:
            self.stored.remove(name)

    def abandon(self) -> None:
        """The store is lost: uploads not started yet are dropped."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> list[str]:
        """Wait for every upload; the ones that failed, one line each."""
        self.pool.shutdown(wait=True)
        return self.errors
