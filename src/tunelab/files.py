"""Files written so that a crash never leaves one half-written: JSON replaced atomically, data
fsynced, directories swapped into place; and their digests. The ground floor: imports nothing of
tunelab."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

CHECKSUMS = ("sha256", "xxh3_128")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object at `path`, or {} when it is missing or unreadable."""
    try:
        found = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` atomically (a temporary sibling, fsynced, renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    fsync_file(tmp)
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def file_digest(path: Path, checksum: str) -> str:
    """Hex digest of a file. `xxh3_128` is ~12x faster than sha256 here: checkpoints use it, so
    hashing in the background does not take CPU from training (it guards against torn or rotted
    files, not tampering); the published artifact keeps sha256."""
    if checksum == "sha256":
        h: Any = hashlib.sha256()
    elif checksum == "xxh3_128":
        import xxhash

        h = xxhash.xxh3_128()
    else:
        raise ValueError(f"unknown checksum {checksum!r}; allowed: {', '.join(CHECKSUMS)}")
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def replace_dir(src: Path, dst: Path) -> None:
    """Move a complete directory into place; an older `dst` is removed only after the move."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
