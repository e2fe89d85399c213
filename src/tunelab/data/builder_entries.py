"""`datasets`' own cache entries (the Arrow files a data file was read into, and the map caches
beside them): checked against tunelab's record of their files before they are read, recorded
when `datasets` has just built them, and read as `load_dataset` would read them while the run
holds them (`prepared_split`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab import locks
from tunelab.data import integrity
from tunelab.data.cache import set_aside, touch
from tunelab.data.prepared import Holding

log = logging.getLogger("tunelab")

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
        set_aside(entry)
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
    ends; and checked before it is read (`intact_builder_entry`): a damaged
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
            holding.added_entry |= not entry.is_dir()
            held = True
        if attempt == 0 and not intact_builder_entry(entry):  # removed: made again afresh
            if holding is not None:
                holding.added_entry = True
            continue
        made.download_and_prepare()
        record_builder_entry(entry)
        dataset = made.as_dataset(split=split)
        touch(entry)
        return dataset
    raise AssertionError("unreachable: the second attempt returns or raises")
