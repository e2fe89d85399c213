"""Models read back from the store into local directories: a run's model exported
(`download_model`: the Hugging Face files only, verified against their manifest, sharing no
file with the store), and `model.name_or_path` resolved to a directory a run loads from
(`resolve_model`: MLflow URIs downloaded once into a cache)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from tunelab import locks, manifests
from tunelab.constants import MODEL_URI_SCHEMES
from tunelab.errors import ConfigError, ModelNotFound
from tunelab.tracking import store
from tunelab.tracking.logged_model import MLFLOW_FILES

log = logging.getLogger("tunelab")


def resolve_model(name_or_path: str | None, uri: str | None, cache_dir: Path) -> str | None:
    """A local directory for `model.name_or_path`: a runs:/ or models:/ URI is downloaded once
    into `cache_dir` (an entry per store and URI); paths and hub ids are returned as they are.
    A URI the store does not have is a ConfigError naming the key."""
    if not name_or_path or not name_or_path.startswith(MODEL_URI_SCHEMES):
        return name_or_path
    key = hashlib.sha1(f"{store.resolve_uri(uri)} {name_or_path}".encode()).hexdigest()[:16]
    local = Path(cache_dir) / key
    if manifests.is_complete(local):
        return str(local)
    # Parallel jobs fetching the same model: one downloads (into a temporary name, renamed into
    # place), the others wait and then reuse the complete entry.
    try:
        with locks.waiting(Path(cache_dir) / f".{key}.lock", f"model cache entry {local}"):
            if not manifests.is_complete(local):
                log.info("downloading %s to %s", name_or_path, local)
                if local.exists():  # an incomplete entry left by a killed download
                    shutil.rmtree(local)
                download_model(name_or_path, local, uri)
    except ModelNotFound as exc:
        raise ConfigError([f"model.name_or_path: {exc}"]) from None
    return str(local)


def download_model(source: str, dst: Path, uri: str | None = None) -> Path:
    """Download a run's model (a run id, runs:/ID/model or models:/...) into `dst`: the Hugging
    Face files only, verified against the manifest (no file it does not list), written beside
    `dst` and renamed into place when complete."""
    import tempfile

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    resolved = store.resolve_uri(uri)
    store.check_reachable(resolved)
    if not source.startswith(MODEL_URI_SCHEMES):
        source = f"runs:/{source}/model"
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp,
        store.default_store(resolved),
    ):
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(source, dst_path=tmp, tracking_uri=resolved)
            )
        except MlflowException as exc:
            first = (str(exc).strip().splitlines() or ["not found"])[0]
            raise ModelNotFound(f"{source}: not found in the store {resolved} ({first})") from None
        for name in MLFLOW_FILES:
            target = local / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        problems = manifests.verify_manifest(local)
        if problems:
            raise RuntimeError(f"{source}: the download does not match its manifest: {problems[0]}")
        _unshare(local)
        os.replace(local, dst)
    return dst


def _unshare(folder: Path) -> None:
    """Every file of a download its own: one that shares its inode with another file (a hard
    link into the store, whose files are the run's own `model/`: logged_model._link_into) is
    replaced by a copy, so editing the download never edits the run. A copy-on-write clone
    where the filesystem makes one (btrfs, XFS), else a plain copy."""
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        if file.stat().st_nlink == 1:
            continue
        copy = file.with_name(f".{file.name}.copy")
        with open(file, "rb") as src, open(copy, "wb") as dst:
            if not _clone(src.fileno(), dst.fileno()):
                shutil.copyfileobj(src, dst, 1 << 20)
        shutil.copystat(file, copy)
        os.replace(copy, file)


def _clone(src: int, dst: int) -> bool:
    """A copy-on-write clone of `src` into `dst` (Linux FICLONE); False where not supported."""
    import fcntl

    try:
        fcntl.ioctl(dst, 0x40049409, src)  # FICLONE
    except OSError:
        return False
    return True
