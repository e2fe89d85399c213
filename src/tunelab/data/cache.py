"""Prepared data on disk, built once however many processes or threads ask for it at the same
time, held while a run uses it, and pruned by age and size.

The cache root is `<output.root>/.cache/datasets`. Its entries are tunelab's (a from-scratch
tokenizer, tokenized splits: `tunelab/<kind>/<digest>/`, keyed by what decides them) and
`datasets`' (the Arrow files a data file was read into: `<builder>/<config>/<version>/<hash>/`).
A run holds a shared lock on each entry it uses (`tunelab/in-use/`), taken before it looks for
the entry and kept until its rows are gone; pruning removes an entry only under the exclusive
lock, so never one that any process holds."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.data import Rows

log = logging.getLogger("tunelab")


def fingerprint(*parts: Any) -> str:
    """xxh3-128 of JSON-able `parts`: a cache key."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True, default=str).encode())


@dataclass
class CacheEntry:
    """A directory of prepared data: `hit` means it is complete at `path`; otherwise build into
    `building` (renamed to `path` when the `cached` block ends without an error)."""

    path: Path
    hit: bool
    building: Path
    meta: dict[str, Any] = field(default_factory=dict)  # written as meta.json with the entry


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


@dataclass
class Holding:
    """The cache entries one run uses, each held (a shared lock) until this object is gone (with
    the run's rows), the run's limits, and whether the run added an entry."""

    root: Path
    limits: Limits = field(default_factory=Limits)
    grew: bool = False
    locks: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        weakref.finalize(self, _release, self.locks)

    def hold(self, entry: Path) -> None:
        """Hold `entry` (present or not yet): waits only while a pruning removes it."""
        self.locks.append(_in_use_lock(self.root, entry).acquire(wait=True, shared=True))

    def prune(self) -> None:
        """Prune the cache to the run's limits; a failure is a warning, never the run's end."""
        try:
            prune(self.root, self.limits)
        except OSError as exc:
            log.warning("data: pruning the cache %s failed: %s", self.root, exc)


def _release(held: list[Any]) -> None:
    for lock in held:
        lock.release()


def _in_use_lock(root: Path, entry: Path) -> Any:
    from tunelab import locks

    name = fingerprint(Path(os.path.relpath(entry, root)).as_posix())
    return locks.Lock(root / "tunelab" / IN_USE / f"{name}.lock", f"the data cache entry {entry}")


def touch(entry: Path) -> None:
    """Mark `entry` used now (its directory's mtime orders entries for pruning)."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(entry)


IN_USE = "in-use"  # tunelab/in-use/: the lock files of the entries runs hold
_scratch_lock = threading.Lock()
_scratch: tempfile.TemporaryDirectory[str] | None = None


def _cache_root(rows: Rows) -> Path:
    """`<cache_dir>/tunelab`, or a temporary directory removed at exit without a cache_dir."""
    global _scratch
    if rows.cache_dir is not None:
        return rows.cache_dir / "tunelab"
    with _scratch_lock:
        if _scratch is None:
            _scratch = tempfile.TemporaryDirectory(prefix="tunelab-data-")
        return Path(_scratch.name)


@contextlib.contextmanager
def cached(rows: Rows, kind: str, **key: Any) -> Iterator[CacheEntry]:
    """The cache entry `<cache_dir>/tunelab/<kind>/<digest of key>`: reused when complete,
    otherwise built by the caller inside the block. One process or thread builds an entry at a
    time (an flock; the others wait, then reuse it); a build goes to a temporary name and is
    renamed into place, so an entry is complete or absent, even after kill -9. The entry is
    held for as long as `rows` lives; after a build the cache is pruned to the run's limits."""
    from tunelab import locks

    parent = _cache_root(rows) / kind
    final = parent / fingerprint(key)
    if rows.holding is not None:
        rows.holding.hold(final)
    if (final / "meta.json").is_file():
        log.info("data: reusing the cached %s %s", kind, final)
        touch(final)
        yield CacheEntry(final, True, final, json.loads((final / "meta.json").read_text()))
        return
    parent.mkdir(parents=True, exist_ok=True)
    with locks.waiting(parent / f"{final.name}.lock", f"the {kind} cache entry {final}"):
        if (final / "meta.json").is_file():  # built by another process while this one waited
            log.info("data: reusing the cached %s %s", kind, final)
            touch(final)
            yield CacheEntry(final, True, final, json.loads((final / "meta.json").read_text()))
            return
        for stale in parent.glob(f".{final.name}.*"):  # left by a killed build or pruning
            shutil.rmtree(stale, ignore_errors=True)
        building = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=parent))
        entry = CacheEntry(final, False, building)
        try:
            yield entry
            (building / "meta.json").write_text(json.dumps({**entry.meta, "key": key}))
            if final.exists():  # an incomplete entry (no meta.json) of an older tunelab
                shutil.rmtree(final)
            os.rename(building, final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    entry.meta = json.loads((final / "meta.json").read_text())
    touch(final)
    if rows.holding is not None:
        rows.holding.grew = True
        rows.holding.prune()


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
    for info in root.glob("*/*/*/*/dataset_info.json"):  # <builder>/<config>/<version>/<hash>
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
    from tunelab import locks

    lock = _in_use_lock(root, entry)
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
    from tunelab import locks

    lock = _in_use_lock(root, entry.path)
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
    """What a pruning killed midway left (`.<name>.pruned`), unless it is being pruned now."""
    from tunelab import locks

    for doomed in [*root.glob("tunelab/*/.*.pruned"), *root.glob("*/*/*/.*.pruned")]:
        lock = _in_use_lock(root, doomed.with_name(doomed.name[1 : -len(".pruned")]))
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
            root / (str(path).replace("/", "_") + ".lock")]  # fmt: skip


def tokenizer_digest(tokenizer: Any) -> str:
    """What decides a tokenizer's output: its tokenizer.json, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
    return fingerprint(
        body,
        getattr(tokenizer, "chat_template", None),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        type(tokenizer).__name__,
    )


def processes(rows: Rows, n_rows: int) -> int:
    """Processes for a batched map over `n_rows`: training.num_workers, else the cores (at
    most 8); 1 for small data, where starting processes costs more than it saves."""
    if n_rows < 20_000:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(rows.workers or cores, 8, n_rows // 10_000))
