"""Prepared data on disk (a from-scratch tokenizer, tokenized splits), keyed by what decides
it, built once however many processes or threads ask for it at the same time."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
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
    renamed into place, so an entry is complete or absent, even after kill -9."""
    from tunelab import locks

    parent = _cache_root(rows) / kind
    final = parent / fingerprint(key)
    if (final / "meta.json").is_file():
        log.info("data: reusing the cached %s %s", kind, final)
        yield CacheEntry(final, True, final, json.loads((final / "meta.json").read_text()))
        return
    parent.mkdir(parents=True, exist_ok=True)
    with locks.waiting(parent / f"{final.name}.lock", f"the {kind} cache entry {final}"):
        if (final / "meta.json").is_file():  # built by another process while this one waited
            log.info("data: reusing the cached %s %s", kind, final)
            yield CacheEntry(final, True, final, json.loads((final / "meta.json").read_text()))
            return
        for stale in parent.glob(f".{final.name}.*"):  # left by a killed build
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
