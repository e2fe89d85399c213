"""The on-disk protocol of a checkpoint: written, committed, found, verified, removed.

A checkpoint is *complete* only when its `manifest.json` (xxh3-128 checksum and size of every
file, step, epoch, metrics) has been written last and fsynced: a directory without a valid
manifest is never resumed from, never counted as kept, and is removed at the next start. A
background write goes to `.checkpoint-<step>.partial/` and is renamed to `checkpoint-<step>/`
after its manifest. Resume verifies checksums and falls back to the next older checkpoint when
one does not match.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab import files, manifests, testhooks
from tunelab.errors import ConfigError, IncompleteCheckpoint

log = logging.getLogger("tunelab")

PREFIX = "checkpoint-"
PARTIAL = ".partial"  # `.checkpoint-<step>.partial/`: being written in the background
CORRUPT = ".corrupt"  # checkpoints whose files no longer match their manifest are moved here
ARGS_JSON = "training_args.json"
CHECKSUM = "xxh3_128"

# Told of each commit: the new checkpoint, what rotation removed, the best checkpoint now.
OnCommit = Callable[[Path, list[Path], "Path | None"], None]


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


# What a checkpoint must hold to resume from it: one name of each group.
REQUIRED = (
    ("config.json",),
    ("model.safetensors", "model.safetensors.index.json"),
    ("optimizer.safetensors", "optimizer.pt"),
    ("scheduler.json", "scheduler.pt"),
    ("trainer_state.json",),
    (ARGS_JSON,),
    ("rng_state.pth", "rng_state_0.pth"),
)
# A PEFT model's checkpoint (peft=lora) holds its adapter instead of the model: the base model
# comes from the run's config, the adapter and its optimizer state from the checkpoint.
ADAPTER_REQUIRED = (("adapter_config.json",), ("adapter_model.safetensors",), *REQUIRED[2:])


def required_for(directory: Path) -> tuple[tuple[str, ...], ...]:
    """ADAPTER_REQUIRED for a checkpoint holding an adapter (either of its files), else REQUIRED."""
    adapter = any((directory / n).is_file() for (n,) in ADAPTER_REQUIRED[:2])
    return ADAPTER_REQUIRED if adapter else REQUIRED


def missing(directory: Path, required: tuple[tuple[str, ...], ...] | None = None) -> list[str]:
    """The required files `directory` lacks (one name per missing group); `required` defaults
    to what its kind of checkpoint needs (required_for)."""
    required = required_for(directory) if required is None else required
    return [names[0] for names in required if not any((directory / n).is_file() for n in names)]


def commit(
    ckpt: Path,
    step: int,
    epoch: float | None,
    metrics: dict[str, float],
    written: Path | None = None,
    known: dict[str, str] | None = None,
    required: tuple[tuple[str, ...], ...] | None = None,
) -> None:
    """Make `ckpt` complete: check that it holds every `required` file, fsync every file, then
    write the manifest last (and fsync it). With `written` (a `.partial` directory), the files
    are there and are renamed to `ckpt` after. `known`: checksums already taken from memory, by
    file name."""
    if written is None:
        testhooks.pause("COMMIT")
    lacking = missing(written or ckpt, required)
    if lacking:
        raise IncompleteCheckpoint(
            f"{ckpt.name} is missing {', '.join(lacking)}; not committed (older checkpoints "
            "are intact)"
        )
    info = {"kind": "checkpoint", "step": step, "epoch": epoch, "metrics": metrics}
    manifests.write_manifest(written or ckpt, info, checksum=CHECKSUM, known=known)
    if written is not None:
        files.replace_dir(written, ckpt)  # fsyncs checkpoints/
    else:
        files.fsync_dir(ckpt.parent)  # the checkpoint's own entry in checkpoints/


def partial_dir(root: Path, step: int) -> Path:
    return root / f".{PREFIX}{step}{PARTIAL}"


def manifest_of(ckpt: Path) -> dict[str, Any] | None:
    return manifests.read_manifest(ckpt) or None


def _candidates(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    found = [p for p in found if p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=step_of, reverse=True)


def committed(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, newest first (manifest present; files not re-hashed)."""
    return [p for p in _candidates(root) if manifest_of(p) is not None]


def clean_incomplete(root: Path) -> list[Path]:
    """Remove checkpoint directories that have no valid manifest (a write that never finished)."""
    removed = []
    for path in _candidates(root):
        if manifest_of(path) is None:
            log.warning("removing incomplete checkpoint %s (no manifest: never committed)", path)
            remove(path)
            removed.append(path)
    for leftover in root.glob(f".{PREFIX}*{PARTIAL}") if root.is_dir() else []:
        log.warning("removing incomplete checkpoint %s (its write never finished)", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    for leftover in root.glob(".deleting-*") if root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
    return removed


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest. Ones that fail verification are
    moved to `.corrupt/` with a warning, and an older one is tried."""
    for path in committed(root):
        problems = manifests.verify_manifest(path)
        if not problems:
            return path
        target = root / CORRUPT / f"{path.name}-{int(time.time())}"
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        log.warning(
            "checkpoint %s does not match its manifest (%s); moved to %s, trying an older one",
            path,
            "; ".join(problems[:3]),
            target,
        )
    return None


def resume_point(resume: str, root: Path) -> Path | None:
    """The checkpoint to resume from: the newest valid one under `root` for `auto`, none for
    `never`, or the verified checkpoint at `resume`. Incomplete checkpoints are removed first."""
    clean_incomplete(root)
    if resume == "never":
        return None
    if resume == "auto":
        found = latest_valid(root)
        if found:
            log.info("resuming from %s", found)
        return found
    path = Path(resume).expanduser().resolve()
    problems = manifests.verify_manifest(path)
    if problems:
        raise ConfigError([f"resume: {resume} is not a complete tunelab checkpoint: {problems[0]}"])
    set_aside_later(root, int(manifests.read_manifest(path).get("step", 0)))
    return path


def set_aside_later(root: Path, step: int) -> list[Path]:
    """Move the committed checkpoints after `step` to `.set-aside-<time>/`: a run rolled back
    to an earlier checkpoint writes new ones with lower step numbers, which rotation (newest
    first) would otherwise remove as soon as they are committed."""
    later = [p for p in committed(root) if step_of(p) > step]
    if not later:
        return []
    aside = root / f".set-aside-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for path in later:
        os.replace(path, aside / path.name)
    files.fsync_dir(root)
    log.warning(
        "resuming from step %d: set aside the %d later checkpoint(s) in %s",
        step,
        len(later),
        aside,
    )
    return [aside / p.name for p in later]


def remove(path: Path) -> None:
    # Rename first: a crash mid-delete leaves `.deleting-*`, never a checkpoint-N missing files.
    doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
