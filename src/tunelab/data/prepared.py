"""tunelab's prepared data (a from-scratch tokenizer, tokenized splits), built once however many
processes or threads ask for it at the same time, checked on reuse, and held while a run uses it.

An entry is `<cache_dir>/tunelab/<kind>/<cache key>/`, complete or absent (built under a temporary
name, renamed into place) with a sealed `meta.json` of its files' checksums; a run's `Holding`
keeps a shared lock on every entry it uses (tunelab.data.cache) and prunes the cache after it
added one."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab import locks
from tunelab.data import integrity
from tunelab.data.cache import Limits, cache_key, in_use_lock, prune, set_aside, touch

if TYPE_CHECKING:
    from tunelab.data import Rows

log = logging.getLogger("tunelab")


@dataclass
class CacheEntry:
    """A directory of prepared data: `hit` means it is complete at `path`; otherwise build into
    `building` (renamed to `path` when the `cached` block ends without an error)."""

    path: Path
    hit: bool
    building: Path
    meta: dict[str, Any] = field(default_factory=dict)  # written as meta.json with the entry


@dataclass
class Holding:
    """The cache entries one run uses, each held (a shared lock) until this object is gone (with
    the run's rows), the run's limits, and whether the run added an entry."""

    root: Path
    limits: Limits = field(default_factory=Limits)
    added_entry: bool = False  # the run built an entry, or had `datasets` build one
    held: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        weakref.finalize(self, _release, self.held)

    def hold(self, entry: Path) -> None:
        """Hold `entry` (present or not yet): waits only while a pruning removes it."""
        self.held.append(in_use_lock(self.root, entry).acquire(wait=True, shared=True))

    def prune(self) -> None:
        """Prune the cache to the run's limits; a failure is a warning, never the run's end."""
        try:
            prune(self.root, self.limits)
        except OSError as exc:
            log.warning("data: pruning the cache %s failed: %s", self.root, exc)


def _release(held: list[Any]) -> None:
    for lock in held:
        lock.release()


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
    parent = _cache_root(rows) / kind
    final = parent / cache_key(key)
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
                set_aside(final)
            os.rename(building, final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    touch(final)
    if rows.holding is not None:
        rows.holding.added_entry = True
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
        set_aside(entry)
    return None


def tokenizer_digest(tokenizer: Any) -> str:
    """What decides a tokenizer's output: its tokenizer.json, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
    return cache_key(
        body,
        getattr(tokenizer, "chat_template", None),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        type(tokenizer).__name__,
    )
