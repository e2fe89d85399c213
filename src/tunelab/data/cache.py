"""The prepared-data cache on disk: its layout, its keys, which entries a process holds, and
pruning by age and size (a run after it adds an entry; `tunelab cache prune`).

The cache root is `<output.root>/.cache/datasets`. Its entries are tunelab's (a from-scratch
tokenizer, tokenized splits: `tunelab/<kind>/<digest>/`, keyed by what decides them; built by
tunelab.data.prepared) and `datasets`' (the Arrow files a data file was read into:
`<builder>/<config>/<version>/<hash>/`; checked by tunelab.data.builder_entries). A run holds a
shared lock on each entry it uses (`tunelab/in-use/`), taken before it looks for the entry and
kept until its rows are gone; pruning removes an entry only under the exclusive lock, so never
one that any process holds."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab import locks

log = logging.getLogger("tunelab")


def cache_key(*parts: Any) -> str:
    """xxh3-128 of JSON-able `parts`: the name of a cache entry, or a digest built from such
    keys (a split's, the data's)."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True, default=str).encode())


@dataclass(frozen=True)
class Limits:
    """How much the cache may keep: entries unused for longer than `max_age_s` seconds go, then
    the least recently used until the rest fit in `max_bytes`. None: no limit."""

    max_bytes: int | None = None
    max_age_s: float | None = None

    @classmethod
    def of(cls, cfg: Any) -> Limits:
        """From the data config: `cache_max_gb` (10**9 bytes) and `cache_max_age_days`."""
        gb, days = cfg.get("cache_max_gb"), cfg.get("cache_max_age_days")
        return cls(None if gb is None else int(gb * 1e9), None if days is None else days * 86400.0)


IN_USE = "in-use"  # tunelab/in-use/: the lock files of the entries runs hold


def in_use_lock(root: Path, entry: Path) -> locks.Lock:
    """The lock a run holds shared on `entry` while it uses it (exclusive: removing it)."""
    name = cache_key(Path(os.path.relpath(entry, root)).as_posix())
    return locks.Lock(root / "tunelab" / IN_USE / f"{name}.lock", f"the data cache entry {entry}")


def touch(entry: Path) -> None:
    """Mark `entry` used now (its directory's mtime orders entries for pruning)."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(entry)


def set_aside(entry: Path) -> None:
    """Remove `entry`: renamed away first (so no process sees it half removed), then deleted."""
    doomed = entry.with_name(f".{entry.name}.damaged")
    shutil.rmtree(doomed, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.rename(entry, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# Listing and pruning


@dataclass
class Entry:
    """A complete entry of the cache."""

    path: Path
    kind: str  # tunelab's ("tokenized", "tokenizers") or the datasets builder's ("json", ...)
    size: int  # bytes of its files
    used: float  # when a run last used it (seconds since the epoch): its directory's mtime


def cached_entries(root: Path) -> list[Entry]:
    """The complete entries of the cache `root`, least recently used first."""
    found = []
    for path in (root / "tunelab").glob("*/*"):  # tunelab/<kind>/<digest>/meta.json
        if path.parent.name != IN_USE and (path / "meta.json").is_file():
            found.append(_entry(path, path.parent.name))
    # <builder>/<config>/<version>/<hash>/, or without the hash (the generator builder's)
    infos = [*root.glob("*/*/*/*/dataset_info.json"), *root.glob("*/*/*/dataset_info.json")]
    for info in infos:
        kind = info.relative_to(root).parts[0]
        if kind != "tunelab" and not info.parent.name.endswith(".incomplete"):
            found.append(_entry(info.parent, kind))
    return sorted((e for e in found if not e.path.name.startswith(".")), key=lambda e: e.used)


def _entry(path: Path, kind: str) -> Entry:
    size = 0
    for folder, _, files in os.walk(path):
        size += sum(os.lstat(os.path.join(folder, f)).st_size for f in files)
    return Entry(path, kind, size, path.stat().st_mtime)


def in_use(root: Path, entry: Path) -> bool:
    """Whether a process holds `entry` now."""
    lock = in_use_lock(root, entry)
    if not lock.path.exists():
        return False
    try:
        lock.acquire()
    except locks.Busy:
        return True
    lock.release()
    return False


def prune(root: Path, limits: Limits, now: float | None = None) -> list[Entry]:
    """Remove the entries of the cache `root` that no process holds and that `limits` do not
    keep: those unused for longer than `limits.max_age_s`, then the least recently used while
    the cache is larger than `limits.max_bytes`. Returns the removed entries."""
    now = time.time() if now is None else now
    _remove_leftovers(root)
    found = cached_entries(root)
    total = sum(e.size for e in found)
    removed = []
    for entry in found:  # least recently used first
        expired = limits.max_age_s is not None and now - entry.used > limits.max_age_s
        over = limits.max_bytes is not None and total > limits.max_bytes
        if not (expired or over):
            break  # the rest were used later, and the total only shrinks
        if _remove(root, entry):
            total -= entry.size
            removed.append(entry)
            log.info(
                "data: pruned the cached %s %s (%.1f MB, unused for %.1f days)",
                entry.kind, entry.path, entry.size / 1e6, (now - entry.used) / 86400,
            )  # fmt: skip
    return removed


def _remove(root: Path, entry: Entry) -> bool:
    """Remove `entry` under its exclusive lock, taken at once or not at all (a run holds it):
    renamed away first, so it is never seen half removed; its lock files go with it."""
    lock = in_use_lock(root, entry.path)
    try:
        lock.acquire()
    except locks.Busy:
        return False
    try:
        try:
            if entry.path.stat().st_mtime != entry.used:
                return False  # used since it was listed
        except FileNotFoundError:
            return False  # removed by another pruning
        doomed = entry.path.with_name(f".{entry.path.name}.pruned")
        shutil.rmtree(doomed, ignore_errors=True)  # a pruning killed midway
        os.rename(entry.path, doomed)
        for lock_file in _lock_files(root, entry.path):
            lock_file.unlink(missing_ok=True)
        lock.path.unlink()  # while held: see locks.Lock
        shutil.rmtree(doomed, ignore_errors=True)
    finally:
        lock.release()
    return True


def _remove_leftovers(root: Path) -> None:
    """What a pruning or a removal of a damaged entry killed midway left (`.<name>.pruned`,
    `.<name>.damaged`), unless that entry is held now."""
    left = [p for depth in ("*/*", "*/*/*") for suffix in ("pruned", "damaged")
            for p in root.glob(f"{depth}/.*.{suffix}")]  # fmt: skip
    for doomed in left:
        lock = in_use_lock(root, doomed.with_name(doomed.name[1:].rsplit(".", 1)[0]))
        try:
            lock.acquire()
        except locks.Busy:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        lock.release()


def _lock_files(root: Path, path: Path) -> list[Path]:
    """The build locks of the entry at `path`: tunelab's beside it; `datasets`' beside it and
    at the root (its path with `_` for `/`)."""
    if path.relative_to(root).parts[0] == "tunelab":
        return [path.with_name(f"{path.name}.lock")]
    return [path.with_name(f"{path.name}_builder.lock"),
            path.with_name(f"{path.name}.incomplete_info.lock"),
            path.with_name(f"{path.name}.tunelab.lock"),
            root / (str(path).replace("/", "_") + ".lock")]  # fmt: skip
