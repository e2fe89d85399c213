"""The run's data: rows generated in code or read from files, as Arrow datasets (`datasets`),
before any tokenizer sees them.

Rows stay columns, memory-mapped from disk; the configured columns are renamed to canonical
names. A row trains one of three ways: `prompt` + `completion` (loss on the completion only;
exact match is reported), `messages` (a conversation, rendered with the tokenizer's chat template;
loss on the assistant turns only), or `text` (loss on every token). `label` and any other column
are kept for the tasks that read them. Each task (tunelab.tasks) turns rows into the tensors its
model trains on, through `cached` so a resume or a sweep job never prepares the same data twice.

Files go through `datasets.load_dataset` (the fast path). When it fails, or a vectorised check of
the loaded columns finds a bad row, the files are read again line by line (`scan`) to name the
file and the line: only on that error path.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import ConfigError

log = logging.getLogger("tunelab")

# Canonical column names: the loader renames data.text_column etc. to these.
TEXT, PROMPT, COMPLETION, MESSAGES, LABEL = "text", "prompt", "completion", "messages", "label"
# File suffix -> the `datasets` builder that reads it.
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
           ".txt": "text", ".text": "text"}  # fmt: skip
FORMAT_NAMES = ".jsonl, .json, .csv, .parquet or .txt"
# Bump when what a digest covers, or how rows are read, changes: older cache entries are unused.
DATA_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DataError(ConfigError):
    """A data file that cannot be used; the message names the key, the file and the line."""

    def __init__(self, message: str) -> None:
        super().__init__([message])


@dataclass
class Rows:
    """The run's rows: `train` and `eval` are `datasets.Dataset`s with canonical columns (`eval`
    has no rows without an eval set)."""

    train: Any
    eval: Any
    source: str  # where the rows came from, for the model card and tracking
    has_completions: bool  # every row is prompt/completion: exact match is meaningful
    digest: str  # content digest of the data and of what decides the rows and the split
    name: str = "data"  # a short name for the MLflow dataset inputs
    split_sources: dict[str, str] = field(default_factory=dict)  # "train"/"eval" -> path
    columns: tuple[str, ...] = ()  # the columns of train (canonical names first)
    has_messages: bool = False  # some rows are conversations (need a chat template)
    cache_dir: Path | None = None  # <output.root>/.cache/datasets; None: a temporary one
    workers: int = 0  # processes for batched maps (training.num_workers); 0: the cores
    split_digests: dict[str, str] = field(default_factory=dict)

    def split_digest(self, split: str) -> str:
        return self.split_digests.get(split) or fingerprint(self.digest, split)

    def texts(self, batch_size: int = 1000) -> Iterator[list[str]]:
        """Training texts in batches, for training a tokenizer from scratch: read from the Arrow
        columns batch by batch, never all at once."""
        for batch in self.train.with_format("arrow").iter(batch_size=batch_size):
            yield training_texts(batch)


def load(cfg: Any, cache_dir: str | Path | None = None, workers: int = 0) -> Rows:
    """Rows for `cfg.data` (an addition task generated in code, or files). `cache_dir`:
    where `datasets` keeps the loaded Arrow files and tunelab its prepared data
    (`<output.root>/.cache/datasets`); `workers`: processes for batched maps (0: the cores)."""
    cache = Path(cache_dir).expanduser().absolute() if cache_dir else None
    if cfg.type == "addition":
        rows = addition(cfg.digits, cfg.train_size, cfg.eval_size, cfg.seed)
    else:
        rows = from_files(cfg, cache)
    rows.cache_dir, rows.workers = cache, workers
    return rows


# ---------------------------------------------------------------------------------------------
# Generated data


def addition(digits: int, train_size: int, eval_size: int, seed: int) -> Rows:
    """`012+345=` -> `0357`: operands below 10**digits, zero-padded to a fixed width (a small
    transformer then learns digit alignment in a minute); eval pairs never appear in train."""
    import datasets

    rng = random.Random(seed)
    space = 10 ** (2 * digits)
    n = min(train_size + eval_size, space)
    pairs = [divmod(i, 10**digits) for i in rng.sample(range(space), n)]
    w = digits
    rows = [
        {"prompt": f"{a:0{w}d}+{b:0{w}d}=", "completion": f"{a + b:0{w + 1}d}"} for a, b in pairs
    ]
    train, evaluation = rows[eval_size:] or rows, rows[:eval_size]

    def dataset(split: list[dict[str, str]]) -> Any:
        return datasets.Dataset.from_dict(
            {PROMPT: [r["prompt"] for r in split], COMPLETION: [r["completion"] for r in split]},
            features=datasets.Features(
                {PROMPT: datasets.Value("string"), COMPLETION: datasets.Value("string")}
            ),
        )

    return Rows(
        train=dataset(train),
        eval=dataset(evaluation),
        source=f"addition(digits={digits}, seed={seed})",
        has_completions=True,
        digest=_digest(train, evaluation),
        name=f"addition-{digits}digit",
        columns=(PROMPT, COMPLETION),
        split_digests={"train": _digest(train), "eval": _digest(evaluation)},
    )


def _digest(*splits: list[dict[str, str]]) -> str:
    """sha256 over the exact rows, train then eval: same digest, same data."""
    h = hashlib.sha256()
    for split in splits:
        for row in split:
            h.update(json.dumps(row, sort_keys=True).encode())
            h.update(b"\n")
        h.update(b"\0")
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    """xxh3-128 of JSON-able `parts`: a cache key."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True, default=str).encode())


# ---------------------------------------------------------------------------------------------
# Where the rows are: files, a glob, a save_to_disk directory, a hub dataset


@dataclass(frozen=True)
class Columns:
    """The configured column names (data.text_column, ...), by canonical name."""

    text: str = TEXT
    prompt: str = PROMPT
    completion: str = COMPLETION
    messages: str = MESSAGES
    label: str = LABEL

    @classmethod
    def of(cls, cfg: Any) -> Columns:
        def get(key: str, default: str) -> str:
            value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
            return str(value or default)

        return cls(
            get("text_column", TEXT),
            get("prompt_column", PROMPT),
            get("completion_column", COMPLETION),
            get("messages_column", MESSAGES),
            get("label_column", LABEL),
        )

    def renames(self) -> dict[str, str]:
        """Configured name -> canonical name."""
        return {self.text: TEXT, self.prompt: PROMPT, self.completion: COMPLETION,
                self.messages: MESSAGES, self.label: LABEL}  # fmt: skip


@dataclass(frozen=True)
class Source:
    """What one of data.train / data.eval names: `kind` files (one `builder` for all),
    disk (directories written by `Dataset.save_to_disk`) or hub (a dataset id)."""

    key: str
    spec: str  # as given, for messages and the model card
    kind: str
    paths: tuple[Path, ...] = ()
    builder: str | None = None


def entries(spec: Any) -> list[str]:
    """data.train / data.eval as a list of strings (one path, or a list)."""
    if spec is None:
        return []
    if isinstance(spec, (str, Path)):
        return [str(spec)]
    return [str(s) for s in spec]


def spec_problems(key: str, spec: Any) -> list[str]:
    """What is wrong with data.train or data.eval before anything is read (pure Python; the
    config checks call it too)."""
    try:
        resolve(key, spec)
    except DataError as exc:
        return exc.problems
    return []


def resolve(key: str, spec: Any) -> Source:
    """The files, directories or hub id that `spec` names; a DataError naming what is wrong."""
    items = entries(spec)
    if not items:
        raise DataError(f"{key}: no files given")
    kinds: list[tuple[str, list[Path]]] = []
    for item in items:
        kinds.append(_resolve_one(key, item))
    kind_names = {k for k, _ in kinds}
    shown = ", ".join(items)
    if len(kind_names) > 1:
        raise DataError(
            f"{key}: {shown} mixes files, save_to_disk directories and hub ids; give one kind"
        )
    kind = kind_names.pop()
    paths = tuple(p for _, ps in kinds for p in ps)
    if kind == "hub":
        if len(items) > 1:
            raise DataError(f"{key}: give one hub dataset id, not {len(items)}")
        return Source(key, items[0], "hub")
    if kind == "disk":
        return Source(key, shown, "disk", paths)
    builders = {FORMATS[_suffix(p)] for p in paths}
    if len(builders) > 1:
        suffixes = ", ".join(sorted({_suffix(p) for p in paths}))
        raise DataError(f"{key}: {shown} mixes formats ({suffixes}); give files of one format")
    return Source(key, shown, "files", paths, builders.pop())


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _resolve_one(key: str, item: str) -> tuple[str, list[Path]]:
    if any(c in item for c in "*?["):
        pattern = str(Path(item).expanduser())
        matched = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        files = [p for p in matched if p.is_file()]
        if not files:
            raise DataError(f"{key}: {item!r} matches no file")
        for p in files:
            _check_suffix(key, p)
        return "files", files
    p = Path(item).expanduser()
    if p.is_file():
        _check_suffix(key, p)
        return "files", [p]
    if p.is_dir():
        if (p / "dataset_dict.json").is_file():
            splits = ", ".join(sorted(d.name for d in p.iterdir() if d.is_dir()))
            raise DataError(
                f"{key}: {p} holds a DatasetDict (splits: {splits}); give one split's "
                f"directory, e.g. {p / 'train'}"
            )
        if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
            return "disk", [p]
        raise DataError(
            f"{key}: {p} is a directory, but not one written by Dataset.save_to_disk; give a "
            f"{FORMAT_NAMES} file, a glob, or such a directory"
        )
    if p.exists():
        raise DataError(
            f"{key}: {p} is not a regular file (a FIFO, socket or device); give a "
            f"{FORMAT_NAMES} file"
        )
    looks_like_path = item.startswith(("/", ".", "~")) or item.count("/") > 1
    if not looks_like_path and _suffix(p) not in FORMATS and _HUB_ID.match(item):
        if _offline():
            raise DataError(
                f"{key}: {item!r} is not a file here and looks like a Hugging Face hub dataset "
                "id, but the hub is offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); give local "
                f"{FORMAT_NAMES} files or a save_to_disk directory"
            )
        return "hub", []
    raise DataError(
        f"{key}: {p} does not exist (a {FORMAT_NAMES} file, a glob, a save_to_disk directory "
        "or a hub dataset id)"
    )


def _check_suffix(key: str, path: Path) -> None:
    if _suffix(path) not in FORMATS:
        raise DataError(
            f"{key}: {path}: unknown format {path.suffix or '(no suffix)'!r}; give a "
            f"{FORMAT_NAMES} file"
        )


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


# ---------------------------------------------------------------------------------------------
# Reading: the fast path through `datasets`, the line scanner on the error path


@dataclass
class _Split:
    dataset: Any
    digest: str
    kinds: set[str]  # "prompt_completion", "messages", "text": how the rows train


def from_files(cfg: Any, cache_dir: Path | None = None) -> Rows:
    """Rows from data.train (and data.eval, else a held-out `eval_fraction` of train)."""
    columns = Columns.of(cfg)
    with quiet_datasets():
        train = _read(resolve("data.train", cfg.train), columns, cache_dir)
        evaluation = _read(resolve("data.eval", cfg.eval), columns, cache_dir) if cfg.eval else None
    options = {
        "version": DATA_VERSION,
        "columns": list(columns.renames()),
        "split": None if evaluation else [cfg.eval_fraction, cfg.seed],
    }
    digest = fingerprint(train.digest, evaluation.digest if evaluation else "", options)
    if evaluation is None:
        train_ds, eval_ds = _hold_out(train.dataset, cfg.eval_fraction, cfg.seed)
    else:
        train_ds, eval_ds = train.dataset, evaluation.dataset
    kinds = train.kinds | (evaluation.kinds if evaluation else set())
    first = entries(cfg.train)[0]
    name = Path(first).parent.name if any(c in first for c in "*?[") else Path(first).stem
    train_source = ", ".join(entries(cfg.train))
    return Rows(
        train=train_ds,
        eval=eval_ds,
        source=train_source + (f" + {', '.join(entries(cfg.eval))}" if cfg.eval else ""),
        has_completions=kinds == {"prompt_completion"},
        digest=digest,
        name=name or "data",
        split_sources={
            "train": train_source,
            "eval": ", ".join(entries(cfg.eval)) if cfg.eval else train_source,
        },
        columns=_ordered_columns(train_ds.column_names),
        has_messages="messages" in kinds,
    )


def _ordered_columns(names: list[str]) -> tuple[str, ...]:
    canonical = [c for c in (TEXT, PROMPT, COMPLETION, MESSAGES, LABEL) if c in names]
    return tuple(canonical + [c for c in names if c not in canonical])


def _hold_out(dataset: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """A random `fraction` of `dataset` as eval, the rest as train: both index the same Arrow
    files, in file order (the Trainer shuffles anyway)."""
    import numpy as np

    n = len(dataset)
    if fraction <= 0 or n <= 1:
        return dataset, dataset.select([], keep_in_memory=True)
    n_eval = max(1, int(n * fraction))
    order = np.random.default_rng(seed).permutation(n)
    eval_idx, train_idx = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    return (
        dataset.select(train_idx, keep_in_memory=True),
        dataset.select(eval_idx, keep_in_memory=True),
    )


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No progress bars and no logged errors from `datasets`: tunelab reports in one line."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _read(source: Source, columns: Columns, cache_dir: Path | None) -> _Split:
    """One split's rows with canonical columns, the digest of their content and their kinds."""
    for path in source.paths:
        if source.kind == "files" and path.stat().st_size == 0:
            raise DataError(f"{source.key}: {path} is empty (no rows)")
    digest, suspect = _content_digest(source)
    if suspect or (source.builder == "json" and any(_first_char(p) == "[" for p in source.paths)):
        # Also every JSON array, read whole anyway: `datasets` would take ["a", "b"] as text
        # rows, and its rewrite of [null, ...] into lines would crash pyarrow.
        scan(source, columns)
    try:
        raw = _load(source, columns, cache_dir)
        dataset = _canonical(raw, columns, source)
    except Exception as exc:  # anything datasets or pyarrow raise: find the line
        if source.kind != "files" or source.builder == "parquet":
            raise DataError(
                f"{source.key}: {source.spec}: cannot be read: {_first_line(exc)}"
            ) from None
        scan(source, columns)  # raises naming the file and the line
        # The rows are fine by tunelab's rules but `datasets` could not give them one Arrow
        # type (say, a column of numbers and strings): build them from the scanned rows,
        # which have canonical names already.
        raw = dataset = _from_scan(source, columns, cache_dir, digest)
        columns = Columns()
    if source.builder == "text":
        dataset = _drop_blank_lines(dataset)
    if len(dataset) == 0:
        raise DataError(f"{source.key}: {source.spec} is empty (no rows)")
    bad, kinds = _check_rows(dataset)
    if bad is not None:
        _locate(source, columns, raw, bad)
    return _Split(_texts_as_strings(dataset), digest, kinds)


def _first_line(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__  # the root cause says the most
    text = (str(cause).strip() if cause else "") or str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _content_digest(source: Source) -> tuple[str, bool]:
    """xxh3 of the bytes of every file, in order (a directory's files by name), or the hub
    dataset's id; and whether the files must go through the scanner before `datasets`: text
    that is not UTF-8 (pyarrow's JSON reader would take it as it is), or a JSON Lines line that
    is `null` (pyarrow 25's reader crashes when one starts a block). Both are always errors, so
    the scanner then raises, naming the line; the bytes are read once, for the digest anyway."""
    import xxhash

    if source.kind == "hub":
        return fingerprint("hub", source.spec), False
    h = xxhash.xxh3_128()
    suspect = False
    text = source.kind == "files" and source.builder != "parquet"
    for path in source.paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            name = str(f.relative_to(path)) if path.is_dir() else ""
            h.update(f"{name}\0{f.stat().st_size}\0".encode())
            utf8 = codecs.getincrementaldecoder("utf-8")()
            tail = b""  # the unfinished last line of the previous chunk
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 23):
                    h.update(chunk)
                    if not text or suspect:
                        continue
                    try:
                        utf8.decode(chunk)
                    except UnicodeDecodeError:
                        suspect = True
                    if source.builder == "json":
                        lines = tail + chunk
                        end = lines.rfind(b"\n") + 1
                        suspect = suspect or _null_line(lines[:end])
                        tail = lines[end:]
            if text and not suspect:
                try:
                    utf8.decode(b"", final=True)
                except UnicodeDecodeError:
                    suspect = True
                suspect = suspect or (source.builder == "json" and _null_line(tail))
    return h.hexdigest(), suspect


def _null_line(lines: bytes) -> bool:
    """Whether a line of `lines` (whole lines) starts with `null` (spaces or a BOM before)."""
    i = lines.find(b"null")
    while i != -1:
        start = lines.rfind(b"\n", 0, i) + 1
        if not lines[start:i].replace(codecs.BOM_UTF8, b"").strip():
            return True
        i = lines.find(b"null", i + 4)
    return False


def _load(source: Source, columns: Columns, cache_dir: Path | None) -> Any:
    import datasets

    cache = str(cache_dir) if cache_dir else None
    if source.kind == "disk":
        parts = [datasets.load_from_disk(str(p)) for p in source.paths]
        parts = [p.flatten_indices() if p._indices is not None else p for p in parts]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if source.kind == "hub":
        return datasets.load_dataset(source.spec, split="train", cache_dir=cache)
    assert source.builder is not None
    kwargs: dict[str, Any] = {}
    if source.builder == "json":
        from datasets.packaged_modules.json.json import JsonConfig

        # A column of mixed types is an error (then located by line), not JSON-encoded text;
        # columns named like agent traces are plain data.
        known = JsonConfig.__dataclass_fields__
        wanted = {"on_mixed_types": None, "parse_agent_traces": False}
        kwargs = {k: v for k, v in wanted.items() if k in known}
    elif source.builder == "csv":
        # Cells stay text: "NA" and "" are not missing values, "0357" keeps its zero; a row
        # with more fields than the header is an error, not an index column.
        text_columns = (columns.text, columns.prompt, columns.completion)
        kwargs = {"na_filter": False, "converters": dict.fromkeys(text_columns, str),
                  "index_col": False}  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Length of header or names does not match")
        return datasets.load_dataset(
            source.builder,
            data_files=[str(p) for p in source.paths],
            split="train",
            cache_dir=cache,
            **kwargs,
        )


def _canonical(dataset: Any, columns: Columns, source: Source) -> Any:
    """The configured columns renamed to the canonical names (a column already named like a
    canonical one that is not the configured one is dropped)."""
    if source.builder == "text":
        return dataset  # one column, `text`
    names = dataset.column_names
    rename = {src: dst for src, dst in columns.renames().items() if src in names and src != dst}
    shadowed = [c for c in names if c in rename.values() and c not in rename]
    if shadowed:
        dataset = dataset.remove_columns(shadowed)
    return dataset.rename_columns(rename) if rename else dataset


def _drop_blank_lines(dataset: Any) -> Any:
    import numpy as np
    import pyarrow.compute as pc

    keep = []
    for batch in dataset.data.to_batches():
        blank = pc.equal(pc.utf8_trim_whitespace(batch.column(TEXT)), "")
        keep.append(np.asarray(pc.invert(pc.fill_null(blank, True))))
    mask = np.concatenate(keep) if keep else np.zeros(0, bool)
    if mask.all():
        return dataset
    return dataset.select(np.flatnonzero(mask), keep_in_memory=True)


def _texts_as_strings(dataset: Any) -> Any:
    """Numbers in text columns become text, as `str()` would have it."""
    import datasets
    import pyarrow as pa

    for name in (TEXT, PROMPT, COMPLETION):
        if name in dataset.column_names:
            kind = dataset.data.schema.field(name).type
            if pa.types.is_integer(kind) or pa.types.is_floating(kind):
                dataset = dataset.cast_column(name, datasets.Value("string"))
    return dataset


# --- the vectorised check of every row


def row_kinds(batch: Any) -> tuple[Any, Any, Any]:
    """Boolean numpy masks (prompt/completion rows, messages rows, text rows) of an Arrow
    table or record batch with canonical columns. A row is prompt/completion when both are
    set, else a conversation when `messages` is set, else text."""
    import numpy as np

    n = batch.num_rows
    names = batch.schema.names

    def valid(name: str) -> Any:
        if name not in names:
            return np.zeros(n, bool)
        return np.asarray(batch.column(name).is_valid(), dtype=bool)

    pc_rows = valid(PROMPT) & valid(COMPLETION)
    msg_rows = ~pc_rows & valid(MESSAGES)
    return pc_rows, msg_rows, ~pc_rows & ~msg_rows


def _texty(kind: Any) -> bool:
    import pyarrow as pa

    return bool(_is_string(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind))


def _is_string(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _conversations_ok(column: Any) -> Any:
    """Per row: a list of {role, content} strings with at least one assistant turn."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        return np.zeros(n, bool)
    item = kind.value_type
    if not pa.types.is_struct(item) or not all(
        item.get_field_index(f) >= 0 and _is_string(item.field(f).type) for f in ("role", "content")
    ):
        return np.zeros(n, bool)
    flat = pc.list_flatten(column)
    parents = np.asarray(pc.list_parent_indices(column))
    role, content = pc.struct_field(flat, "role"), pc.struct_field(flat, "content")
    ok = np.asarray(pc.and_(pc.and_(flat.is_valid(), role.is_valid()), content.is_valid()))
    assistant = ok & np.asarray(pc.fill_null(pc.equal(role, "assistant"), False))
    bad_turns = np.bincount(parents[~ok], minlength=n)
    assistants = np.bincount(parents[assistant], minlength=n)
    return np.asarray(column.is_valid()) & (bad_turns == 0) & (assistants > 0)


def _words_ok(column: Any) -> Any:
    """Per row: a list of strings (the words of a token classification row)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        return np.zeros(n, bool)
    if not _is_string(kind.value_type):
        return np.zeros(n, bool)
    flat = pc.list_flatten(column)
    parents = np.asarray(pc.list_parent_indices(column))
    missing = np.bincount(parents[~np.asarray(flat.is_valid(), dtype=bool)], minlength=n)
    return np.asarray(column.is_valid(), dtype=bool) & (missing == 0)


def _bad_rows(batch: Any) -> tuple[Any, set[str]]:
    """Which rows of an Arrow batch no task can train on, and the kinds of the rows."""
    import numpy as np

    pc_rows, msg_rows, text_rows = row_kinds(batch)
    bad = np.zeros(batch.num_rows, bool)
    schema = batch.schema
    if pc_rows.any() and not (
        _texty(schema.field(PROMPT).type) and _texty(schema.field(COMPLETION).type)
    ):
        bad |= pc_rows
    if msg_rows.any():
        bad |= msg_rows & ~_conversations_ok(batch.column(MESSAGES))
    if text_rows.any():
        if TEXT not in schema.names:
            bad |= text_rows
        elif _texty(schema.field(TEXT).type):
            bad |= text_rows & ~np.asarray(batch.column(TEXT).is_valid(), dtype=bool)
        else:  # a list of words (token classification), or nothing usable
            bad |= text_rows & ~_words_ok(batch.column(TEXT))
    kinds = {k for k, m in (("prompt_completion", pc_rows), ("messages", msg_rows),
                            ("text", text_rows)) if m.any()}  # fmt: skip
    return bad, kinds


def _check_rows(dataset: Any) -> tuple[int | None, set[str]]:
    """The index of the first row no task could train on (or None), and the kinds of the rows;
    checked a batch at a time over the Arrow columns, so memory stays bounded."""
    import numpy as np

    offset, kinds = 0, set[str]()
    used = [c for c in (TEXT, PROMPT, COMPLETION, MESSAGES) if c in dataset.column_names]
    if not used:
        return 0, kinds
    for batch in dataset.select_columns(used).with_format("arrow").iter(batch_size=65536):
        bad, found = _bad_rows(batch)
        kinds |= found
        if bad.any():
            return offset + int(np.argmax(bad)), kinds
        offset += batch.num_rows
    return None, kinds


def _locate(source: Source, columns: Columns, raw: Any, index: int) -> None:
    """Raise the DataError of row `index`: by its line, from the files, for text formats; by
    its row number otherwise."""
    if source.kind == "files" and source.builder != "parquet":
        scan(source, columns)
    where = f"{source.key}: {source.spec} row {index + 1}"
    _row(raw.select([index], keep_in_memory=True).with_format(None)[0], columns, where)
    raise DataError(f"{where}: cannot be used")  # the scanner and the check disagree


# --- the line scanner


def scan(source: Source, columns: Columns) -> int:
    """Read every file of `source` line by line by tunelab's own rules; raise the first problem
    as a DataError naming the file and the line. Returns the number of rows."""
    return sum(1 for _ in scan_rows(source.key, source.paths, source.builder or "", columns))


def scan_rows(key: str, paths: Any, builder: str, columns: Columns) -> Iterator[dict[str, Any]]:
    """The rows of `paths` with canonical columns, read line by line."""
    for path in paths:
        empty = True
        for row in _scan_file(key, Path(path), builder, columns):
            empty = False
            yield row
        if empty:
            raise DataError(f"{key}: {path} is empty (no rows)")


def _utf8_lines(key: str, path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{key}: {path} line {n}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                    f"{exc.start + 1}); re-encode the file as UTF-8"
                ) from None


def _scan_file(key: str, path: Path, builder: str, columns: Columns) -> Iterator[dict[str, Any]]:
    if builder == "text":
        for _, line in _utf8_lines(key, path):
            line = line.rstrip("\r\n")
            if line.strip():
                yield {TEXT: line}
    elif builder == "csv":
        yield from _scan_csv(key, path, columns)
    elif _first_char(path) == "[":  # one JSON array
        text = "".join(line for _, line in _utf8_lines(key, path))
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{key}: {path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        except RecursionError:
            raise DataError(f"{key}: {path}: JSON nested too deeply to read") from None
        for n, record in enumerate(records, start=1):
            yield _row(record, columns, f"{key}: {path} line {n}")
    else:
        for n, line in _utf8_lines(key, path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{key}: {path} line {n}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "each line must be one JSON object"
                ) from None
            except RecursionError:
                raise DataError(f"{key}: {path} line {n}: JSON nested too deeply to read") from None
            yield _row(record, columns, f"{key}: {path} line {n}")


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return chr(stripped[0])
    return ""


def _scan_csv(key: str, path: Path, columns: Columns) -> Iterator[dict[str, Any]]:
    for _ in _utf8_lines(key, path):
        pass  # the encoding first, with line and column
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        start = 1
        try:
            for values in reader:
                line, start = start, reader.line_num + 1
                if not values:
                    continue
                if header is None:
                    header = values
                    continue
                if len(values) > len(header):
                    raise DataError(
                        f"{key}: {path} line {line}: {len(values)} fields, but the header has "
                        f"{len(header)}"
                    )
                padded = values + [None] * (len(header) - len(values))
                record = dict(zip(header, padded, strict=True))
                yield _row(record, columns, f"{key}: {path} line {line}")
        except csv.Error as exc:
            raise DataError(
                f"{key}: {path} line {reader.line_num}: not valid CSV ({exc})"
            ) from None


def _row(record: Any, columns: Columns, where: str) -> dict[str, Any]:
    """One record as canonical columns, or a DataError `where` (the file and line) says why not.
    The same rules as the vectorised check (`_bad_rows`)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    t_col, p_col, c_col, m_col = columns.text, columns.prompt, columns.completion, columns.messages

    def text(column: str) -> Any:
        value = record[column]
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        words = column == t_col and isinstance(value, list) and value
        if words and all(isinstance(w, str) for w in value):
            return value  # the words of a token classification row
        kind = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: {column!r} is {kind}, not text; every row needs a string there")

    out: dict[str, Any]
    if record.get(p_col) is not None and record.get(c_col) is not None:
        out = {PROMPT: text(p_col), COMPLETION: text(c_col)}
    elif record.get(m_col) is not None:
        out = {MESSAGES: _conversation(record[m_col], m_col, where)}
    elif t_col in record:
        out = {TEXT: text(t_col)}
    elif record.get(p_col) is not None or record.get(c_col) is not None:
        missing = c_col if record.get(p_col) is not None else p_col
        if missing in record:
            text(missing)  # null: says so
        raise DataError(
            f"{where}: {missing!r} is missing beside {({p_col, c_col} - {missing}).pop()!r} (and "
            f"there is no {t_col!r} column); it has {', '.join(map(repr, record))}"
        )
    else:
        raise DataError(
            f"{where}: no {t_col!r} column (nor {p_col!r} + {c_col!r}); it has "
            f"{', '.join(map(repr, record)) or 'no columns'}: set data.text_column, or "
            "data.prompt_column and data.completion_column, or data.messages_column"
        )
    if record.get(columns.label) is not None:
        out[LABEL] = record[columns.label]
    return out


def _conversation(value: Any, column: str, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise DataError(
            f"{where}: {column!r} is {type(value).__name__}, not a list of "
            "{'role': ..., 'content': ...} turns"
        )
    turns = []
    for i, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {column!r} turn {i} is {type(turn).__name__}, not an object")
        for key in ("role", "content"):
            got = turn.get(key)
            if not isinstance(got, str):
                kind = (
                    "missing" if key not in turn else "null" if got is None else type(got).__name__
                )
                raise DataError(f"{where}: {column!r} turn {i}: {key!r} is {kind}, not text")
        turns.append({"role": turn["role"], "content": turn["content"]})
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError(
            f"{where}: {column!r} has no assistant turn, so nothing to train on; every "
            "conversation needs at least one {'role': 'assistant', ...}"
        )
    return turns


def _scanned_rows(
    key: str, paths: list[str], builder: str, columns: Columns, digest: str
) -> Iterator[dict[str, Any]]:
    """`Dataset.from_generator`'s generator: every row with every canonical column."""
    names = (TEXT, PROMPT, COMPLETION, MESSAGES, LABEL)
    for row in scan_rows(key, paths, builder, columns):
        yield {name: row.get(name) for name in names}


def _from_scan(source: Source, columns: Columns, cache_dir: Path | None, digest: str) -> Any:
    """The rows of `source` as the scanner reads them, written to Arrow in batches."""
    import datasets

    try:
        dataset = datasets.Dataset.from_generator(
            _scanned_rows,
            gen_kwargs={"key": source.key, "paths": [str(p) for p in source.paths],
                        "builder": source.builder, "columns": columns, "digest": digest},
            cache_dir=str(cache_dir) if cache_dir else None,
        )  # fmt: skip
    except Exception as exc:
        raise DataError(
            f"{source.key}: {source.spec}: cannot be read: {_first_line(exc)}"
        ) from None
    unused = [c for c in dataset.column_names if dataset.data.column(c).null_count == len(dataset)]
    return dataset.remove_columns(unused)


def training_texts(batch: Any) -> list[str]:
    """The text a tokenizer learns from, per row of an Arrow batch: the text (words joined by
    spaces), prompt + completion, or a conversation's contents one per line."""
    import pyarrow.compute as pc

    pc_rows, msg_rows, text_rows = row_kinds(batch)
    if text_rows.all() and _texty(batch.schema.field(TEXT).type):
        return list(batch.column(TEXT).to_pylist())
    out: list[str] = [""] * batch.num_rows
    if pc_rows.any():
        joined = pc.binary_join_element_wise(
            pc.cast(batch.column(PROMPT), "string"), pc.cast(batch.column(COMPLETION), "string"), ""
        ).to_pylist()
        for i in pc_rows.nonzero()[0]:
            out[i] = joined[i]
    if msg_rows.any():
        conversations = batch.column(MESSAGES).to_pylist()
        for i in msg_rows.nonzero()[0]:
            out[i] = "\n".join(turn["content"] for turn in conversations[i])
    if text_rows.any():
        texts = batch.column(TEXT).to_pylist()
        for i in text_rows.nonzero()[0]:
            out[i] = texts[i] if isinstance(texts[i], str) else " ".join(texts[i])
    return out


# ---------------------------------------------------------------------------------------------
# Prepared data on disk, keyed by what decides it


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
