"""A directory's manifest (`manifest.json`): the checksum and size of every file, written last and
fsynced, so that a directory with a valid manifest is complete (checkpoints and artifacts alike),
and verified before anything trusts the directory."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from tunelab.files import CHECKSUMS, file_digest, fsync_dir, fsync_file, read_json, write_json
from tunelab.provenance import git_state, versions

MANIFEST = "manifest.json"


def write_manifest(
    directory: Path,
    info: dict[str, Any],
    checksum: str = "sha256",
    known: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The checksum (`sha256`, or the much cheaper `xxh3_128` for checkpoints) and size of every
    file, plus `info` and the environment; written last, fsynced. `known`: checksums of files
    written (and fsynced) from memory whose digest was taken there, by relative name."""
    directory = Path(directory)
    known = known or {}
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        name = path.relative_to(directory).as_posix()
        if name not in known:
            fsync_file(path)
        files[name] = {
            checksum: known.get(name) or file_digest(path, checksum),
            "size": path.stat().st_size,
        }
    manifest = {
        "format": "tunelab.manifest/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **info,
        "files": files,
        "versions": versions(),
        "git": git_state(),
    }
    write_json(directory / MANIFEST, manifest)
    fsync_dir(directory)
    return manifest


def verify_manifest(directory: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Problems with `directory` against its manifest (empty when every file matches, and no
    file is there that the manifest does not list). `ignore`: top-level names others may add
    beside the listed files (MLflow's own files in a store's copy)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{directory / MANIFEST}: missing or unreadable"]
    problems = []
    for name in files:
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or name.startswith("~"):
            problems.append(f"{directory / MANIFEST}: lists {name!r}, outside the directory")
    if problems:
        return problems
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        top = name.split("/", 1)[0]
        if path.is_dir() or name == MANIFEST or name in files or top in ignore:
            continue
        problems.append(f"{path}: not listed in the manifest")
    for name, want in files.items():
        path = directory / name
        want = want if isinstance(want, dict) else {}
        checksum = next((c for c in CHECKSUMS if c in want), None)
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif checksum is None:
            problems.append(f"{path}: no checksum in the manifest")
        elif (
            path.stat().st_size != want.get("size") or file_digest(path, checksum) != want[checksum]
        ):
            problems.append(f"{path}: contents do not match the manifest")
    return problems


def read_manifest(directory: Path) -> dict[str, Any]:
    return read_json(Path(directory) / MANIFEST)


def is_complete(directory: Path) -> bool:
    """A directory whose manifest exists and whose files are all there at their recorded size
    (cheap: no hashing; `verify_manifest` hashes)."""
    files = read_manifest(directory).get("files")
    if not files or not isinstance(files, dict):
        return False
    for name, want in files.items():
        path = Path(directory) / name
        if not isinstance(want, dict) or not path.is_file():
            return False
        if path.stat().st_size != want.get("size"):
            return False
    return True
