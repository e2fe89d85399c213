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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data import integrity

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
    """The cache entry `<cache_dir>/tunelab/<kind>/<digest of key>`: reused when complete and
    intact, otherwise built by the caller inside the block. One process or thread builds an
    entry at a time (an flock; the others wait, then reuse it); a build goes to a temporary name
    and is renamed into place, so an entry is complete or absent, even after kill -9. Its
    `meta.json`, written last, records the size and xxh3 of every file: an entry found damaged
    on reuse is removed (one warning) and built again. The entry is held for as long as `rows`
    lives; after a build the cache is pruned to the run's limits."""
    from tunelab import locks

    parent = _cache_root(rows) / kind
    final = parent / fingerprint(key)
    if rows.holding is not None:
        rows.holding.hold(final)
    meta = _intact(final)
    if meta is not None:
        log.info("data: reusing the cached %s %s", kind, final)
        touch(final)
        yield CacheEntry(final, True, final, meta)
        return
    parent.mkdir(parents=True, exist_ok=True)
    with locks.waiting(parent / f"{final.name}.lock", f"the {kind} cache entry {final}"):
        meta = _intact(final, kind)  # built by another process while this one waited?
        if meta is not None:
            log.info("data: reusing the cached %s %s", kind, final)
            touch(final)
            yield CacheEntry(final, True, final, meta)
            return
        for stale in parent.glob(f".{final.name}.*"):  # left by a killed build or pruning
            shutil.rmtree(stale, ignore_errors=True)
        building = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=parent))
        entry = CacheEntry(final, False, building)
        try:
            yield entry
            files = integrity.checksums(building, skip=frozenset({META}))
            body = {**entry.meta, "key": key, integrity.CHECKSUMS: files}
            entry.meta = integrity.write_sealed(building / META, body)  # last: the entry is whole
            if final.exists():  # set aside above, or an entry of an older tunelab
                _set_aside(final)
            os.rename(building, final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    touch(final)
    if rows.holding is not None:
        rows.holding.grew = True
        rows.holding.prune()


META = "meta.json"  # a tunelab entry's record: what the caller noted, the key, the checksums


def _intact(entry: Path, kind: str | None = None) -> dict[str, Any] | None:
    """The meta.json of the tunelab entry `entry` when the entry is there, complete and intact;
    else None. With `kind` (the caller holds the entry's build lock), a damaged entry is removed
    with one warning naming it and what is wrong."""
    if not entry.is_dir():
        return None
    meta, problem = integrity.read_sealed(entry / META)
    if meta is not None:
        problem = integrity.damage(entry, meta.get(integrity.CHECKSUMS)) or ""
    if not problem:
        return meta
    if kind is not None:
        if problem == "unsealed":  # written by a tunelab without checksums: not damage
            log.info("data: the cached %s %s has no checksums (an older tunelab's); "
                     "building it again", kind, entry)  # fmt: skip
        elif problem != f"{META} is missing":  # else a build killed before it was whole
            log.warning("data: the cached %s %s is damaged (%s); removed it, building it again",
                        kind, entry, problem)  # fmt: skip
        _set_aside(entry)
    return None


def _set_aside(entry: Path) -> None:
    """Remove `entry`: renamed away first (so no process sees it half removed), then deleted."""
    doomed = entry.with_name(f".{entry.name}.damaged")
    shutil.rmtree(doomed, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.rename(entry, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# `datasets`' entries: its Arrow files, checked against tunelab's record beside them

RECORD = "tunelab.json"  # in a `datasets` builder entry: the checksums of its files, sealed
INFO = "dataset_info.json"  # `datasets`' own record, written when its entry is complete


def _built_files(entry: Path) -> list[Path]:
    """The files `datasets` made an entry of (its info and Arrow files), not the map caches
    (`cache-*.arrow`, a classifier's tokenized columns) nor temporary files written beside them."""
    return sorted(p for p in entry.iterdir() if p.name == INFO or (
        p.suffix == ".arrow" and not p.name.startswith("cache-")))  # fmt: skip


def intact_builder_entry(entry: Path) -> bool:
    """Whether the `datasets` builder entry `entry` (`<builder>/<config>/<version>/[<hash>/]`) may
    be read: absent, or its files match the record tunelab made of them (made now, after a check
    that every Arrow file reads, for an entry that has none). A damaged entry is removed with one
    warning and False returned: build it again. A damaged map cache beside its files is removed
    alone (the map makes it again)."""
    from tunelab import locks

    problem = _builder_damage(entry)
    if problem is None:
        return True
    lock = entry.with_name(f"{entry.name}.tunelab.lock")
    with locks.waiting(lock, f"the data cache entry {entry}"):
        problem = _builder_damage(entry)  # removed by another process meanwhile?
        if problem is None:
            return True
        log.warning("data: the cached rows %s are damaged (%s); removed them, reading the "
                    "files again", entry, problem)  # fmt: skip
        _set_aside(entry)
    return False


def record_builder_entry(entry: Path) -> None:
    """Make the record of a `datasets` entry's files, if it has none yet (just built)."""
    if entry.is_dir() and not (entry / RECORD).exists() and (entry / INFO).is_file():
        files = {p.name: [p.stat().st_size, integrity.file_digest(p)] for p in _built_files(entry)}
        integrity.write_sealed(entry / RECORD, {integrity.CHECKSUMS: files, "maps": {}})


def _builder_damage(entry: Path) -> str | None:
    """What is wrong with the `datasets` entry `entry`, or None (also when it is absent or
    incomplete: `datasets` builds it then). Damaged map caches are removed here."""
    try:
        return _builder_files_damage(entry)
    except FileNotFoundError:  # removed meanwhile (another process found it damaged)
        return None


def _builder_files_damage(entry: Path) -> str | None:
    if not (entry / INFO).is_file():
        return None
    record, problem = integrity.read_sealed(entry / RECORD)
    if record is None and problem != f"{RECORD} is missing":
        return problem
    if record is None:  # made by datasets before tunelab kept records, or just now elsewhere
        for path in _built_files(entry):
            problem = _unreadable(path) or ""
            if problem:
                return problem
        record_builder_entry(entry)
        return None
    problem = integrity.damage(entry, record.get(integrity.CHECKSUMS)) or ""
    if problem:
        return problem
    _check_maps(entry, record)
    return None


def _check_maps(entry: Path, record: dict[str, Any]) -> None:
    """The map caches `datasets` wrote beside an entry's files (`cache-*.arrow`): each checked
    against the record, or, first seen, checked that it reads whole and recorded (`datasets`
    renames a map's file into place when it is complete). A damaged one is removed with one
    warning: the map makes it again."""
    maps = record.get("maps")
    maps = dict(maps) if isinstance(maps, dict) else {}
    changed = False
    for path in sorted(entry.glob("cache-*.arrow")):
        if path.name in maps:
            problem = integrity.damage(entry, {path.name: maps[path.name]})
        else:
            problem = _unreadable(path)
            if not problem:
                maps[path.name] = [path.stat().st_size, integrity.file_digest(path)]
                changed = True
        if problem:
            log.warning("data: the cached map %s is damaged (%s); removed it, to be made again",
                        path, problem)  # fmt: skip
            path.unlink(missing_ok=True)
            maps.pop(path.name, None)
            changed = True
    for name in [n for n in maps if not (entry / n).exists()]:
        del maps[name]
        changed = True
    if changed:
        integrity.write_sealed(entry / RECORD, {**record, "maps": maps})


def _unreadable(path: Path) -> str | None:
    """Why the Arrow stream (or JSON) file `path` does not read whole, or None: a cheap check
    (the batches are memory-mapped, not copied) that finds a truncated file."""
    import pyarrow as pa

    if path.suffix != ".arrow":
        try:
            json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError):
            return f"{path.name} is not valid JSON"
        return None
    try:
        with pa.memory_map(str(path)) as source:
            pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as exc:
        return f"{path.name} cannot be read: {str(exc).splitlines()[0][:200]}"
    return None


def prepared_split(
    builder: Callable[[], Any],
    holding: Holding | None,
    candidates: Callable[[], list[Path]] = list,
    split: str = "train",
) -> Any:
    """`split` of the `datasets` builder that `builder()` makes, as `load_dataset` would give it,
    in `load_dataset`'s steps: its cache entry (the builder's directory) is held from before
    `datasets` looks for it, so no pruning removes it while this run reads it nor until the run
    ends; and checked before it is read (tunelab.data.cache.intact_builder_entry): a damaged
    entry is removed with one warning and built again. A builder that cannot even be made (its
    `dataset_info.json` broken) has the `candidates` entries checked, then is made again."""
    held = False
    for attempt in range(2):
        try:
            made = builder()
        except Exception:
            if attempt or all([intact_builder_entry(p) for p in candidates()]):
                raise
            continue
        entry = Path(made.cache_dir)
        if holding is not None and not held:
            holding.hold(entry)
            holding.grew |= not entry.is_dir()
            held = True
        if attempt == 0 and not intact_builder_entry(entry):  # removed: made again afresh
            if holding is not None:
                holding.grew = True
            continue
        made.download_and_prepare()
        record_builder_entry(entry)
        dataset = made.as_dataset(split=split)
        touch(entry)
        return dataset
    raise AssertionError("unreachable: the second attempt returns or raises")


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
    """What a pruning or a removal of a damaged entry killed midway left (`.<name>.pruned`,
    `.<name>.damaged`), unless that entry is held now."""
    from tunelab import locks

    left = [p for depth in ("*/*", "*/*/*") for suffix in ("pruned", "damaged")
            for p in root.glob(f"{depth}/.*.{suffix}")]  # fmt: skip
    for doomed in left:
        lock = _in_use_lock(root, doomed.with_name(doomed.name[1:].rsplit(".", 1)[0]))
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
