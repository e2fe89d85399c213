"""Reading a split through `datasets` (the fast path) and checking every row of it with
vectorised Arrow operations, a record batch at a time; the scanner (tunelab.data.scan) names a
bad row's line only when either fails."""

from __future__ import annotations

import codecs
import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.builder_entries import prepared_split
from tunelab.data.cache import cache_key
from tunelab.data.prepared import Holding
from tunelab.data.scan import canonical_row, first_char, from_scan, scan
from tunelab.data.sources import (
    COMPLETION,
    MESSAGES,
    PROMPT,
    TEXT,
    Columns,
    DataError,
    Source,
    first_line,
)


@dataclass
class Split:
    """One split as read: its rows (canonical columns), the digest of its source."""

    dataset: Any
    digest: str
    kinds: set[str]  # "prompt_completion", "messages", "text": how the rows train


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


def read(
    source: Source, columns: Columns, cache_dir: Path | None, holding: Holding | None = None
) -> Split:
    """One split's rows with canonical columns, the digest of their content and their kinds.
    The cache entries they are read into are held by `holding`."""
    for path in source.paths:
        if source.kind == "files" and path.stat().st_size == 0:
            raise DataError(f"{source.key}: {path} is empty (no rows)")
    digest, suspect = _content_digest(source)
    if suspect or (source.builder == "json" and any(first_char(p) == "[" for p in source.paths)):
        # Also every JSON array, read whole anyway: `datasets` would take ["a", "b"] as text
        # rows, and its rewrite of [null, ...] into lines would crash pyarrow.
        scan(source, columns)
    try:
        raw = _load(source, columns, cache_dir, holding, digest)
        dataset = _canonical(raw, columns, source)
    except Exception as exc:  # anything datasets or pyarrow raise: find the line
        if source.kind != "files" or source.builder == "parquet":
            raise DataError(
                f"{source.key}: {source.spec}: cannot be read: {first_line(exc)}"
            ) from None
        scan(source, columns)  # raises naming the file and the line
        # The rows are fine by tunelab's rules but `datasets` could not give them one Arrow
        # type (say, a column of numbers and strings): build them from the scanned rows,
        # which have canonical names already.
        raw = dataset = from_scan(source, columns, cache_dir, digest, holding)
        columns = Columns()
    if source.kind == "hub":  # datasets' fingerprint follows the hub revision it loaded
        digest = cache_key("hub", source.spec, raw._fingerprint)
    if source.builder == "text":
        dataset = _drop_blank_lines(dataset)
    if len(dataset) == 0:
        raise DataError(f"{source.key}: {source.spec} is empty (no rows)")
    bad, kinds = _check_rows(dataset)
    if bad is not None:
        _locate(source, columns, raw, bad)
    return Split(_texts_as_strings(dataset), digest, kinds)


def _content_digest(source: Source) -> tuple[str, bool]:
    """xxh3 of the bytes of every file, in order (a directory's files by name), or (replaced
    once it is loaded) the hub dataset's id; and whether the files must go through the scanner
    before `datasets`: text that is not UTF-8 (pyarrow's JSON reader would take it as it is), or
    a JSON Lines line that is `null` (pyarrow 25's reader crashes when one starts a block). Both
    are always errors, so the scanner then raises, naming the line; the bytes are read once,
    for the digest anyway."""
    import xxhash

    if source.kind == "hub":
        return cache_key("hub", source.spec), False
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


def _load(
    source: Source, columns: Columns, cache_dir: Path | None, holding: Holding | None, digest: str
) -> Any:
    """The raw rows of `source` through `datasets`. Files are read into the builder's cache
    entry named after `digest` (their content): `datasets` keys local files by path and mtime
    only, so a file rewritten in place with its size and mtime kept (`cp -p`, `rsync -t`)
    would otherwise be served from the old file's Arrow rows."""
    import datasets

    if source.kind == "disk":
        parts = [datasets.load_from_disk(str(p)) for p in source.paths]
        parts = [p.flatten_indices() if p._indices is not None else p for p in parts]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    where = str(cache_dir) if cache_dir else None
    if source.kind == "hub":
        hub = source.spec
        return prepared_split(lambda: datasets.load_dataset_builder(hub, cache_dir=where), holding)
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
    name = f"xxh3-{digest}"
    files = [str(p) for p in source.paths]

    def builder() -> Any:
        return datasets.load_dataset_builder(
            source.builder, name=name, data_files=files, cache_dir=where, **kwargs
        )

    def candidates() -> list[Path]:  # the entries a builder of these files may have read
        return sorted(cache_dir.glob(f"{source.builder}/{name}*/*/*")) if cache_dir else []

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Length of header or names does not match")
        return prepared_split(builder, holding, candidates)


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


def _list_items(column: Any, item_ok: Any) -> Any:
    """(column as one array, its items flattened, each item's row) for a list column whose item
    type passes `item_ok`; None for any other column (no row of it is valid)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not item_ok(kind.value_type):
        return None
    return column, pc.list_flatten(column), np.asarray(pc.list_parent_indices(column))


def _conversations_ok(column: Any) -> Any:
    """Per row: a list of {role, content} strings with at least one assistant turn."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def turns(item: Any) -> bool:
        fields = ("role", "content")
        return pa.types.is_struct(item) and all(
            item.get_field_index(f) >= 0 and _is_string(item.field(f).type) for f in fields
        )

    n = len(column)
    found = _list_items(column, turns)
    if found is None:
        return np.zeros(n, bool)
    column, flat, parents = found
    role, content = pc.struct_field(flat, "role"), pc.struct_field(flat, "content")
    ok = np.asarray(pc.and_(pc.and_(flat.is_valid(), role.is_valid()), content.is_valid()))
    assistant = ok & np.asarray(pc.fill_null(pc.equal(role, "assistant"), False))
    bad_turns = np.bincount(parents[~ok], minlength=n)
    assistants = np.bincount(parents[assistant], minlength=n)
    return np.asarray(column.is_valid()) & (bad_turns == 0) & (assistants > 0)


def _words_ok(column: Any) -> Any:
    """Per row: a list of strings (the words of a token classification row)."""
    import numpy as np

    n = len(column)
    found = _list_items(column, _is_string)
    if found is None:
        return np.zeros(n, bool)
    column, flat, parents = found
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
    canonical_row(raw.select([index], keep_in_memory=True).with_format(None)[0], columns, where)
    raise DataError(f"{where}: cannot be used")  # the scanner and the check disagree


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
        column = batch.column(TEXT)
        if not _texty(column.type):  # lists of words: joined by Arrow, not word by word here
            column = pc.binary_join(column, " ")
        texts = column.to_pylist()
        for i in text_rows.nonzero()[0]:
            out[i] = texts[i]
    return out
