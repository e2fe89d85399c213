"""The line scanner: tunelab's own reading of text files, line by line, used only on the error
path (to name the file and the line of a bad row) and for files whose rows are fine but that
`datasets` cannot give one Arrow type."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.data.builder_entries import prepared_split
from tunelab.data.prepared import Holding
from tunelab.data.sources import (
    COMPLETION,
    LABEL,
    MESSAGES,
    PROMPT,
    TEXT,
    Columns,
    DataError,
    Source,
    first_line,
)


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
    elif first_char(path) == "[":  # one JSON array
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
            yield canonical_row(record, columns, f"{key}: {path} line {n}")
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
            yield canonical_row(record, columns, f"{key}: {path} line {n}")


def first_char(path: Path) -> str:
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
                yield canonical_row(record, columns, f"{key}: {path} line {line}")
        except csv.Error as exc:
            raise DataError(
                f"{key}: {path} line {reader.line_num}: not valid CSV ({exc})"
            ) from None


def canonical_row(record: Any, columns: Columns, where: str) -> dict[str, Any]:
    """One record as canonical columns, or a DataError `where` (the file and line) says why not.
    The same rules as the vectorised check (tunelab.data.arrow._bad_rows)."""
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


def from_scan(
    source: Source,
    columns: Columns,
    cache_dir: Path | None,
    digest: str,
    holding: Holding | None = None,
) -> Any:
    """The rows of `source` as the scanner reads them, written to Arrow in batches, as
    `Dataset.from_generator` would, into a cache entry keyed by `digest` (in `gen_kwargs`), held
    by `holding` and checked before it is read (tunelab.data.builder_entries.prepared_split)."""
    from datasets.io.generator import GeneratorDatasetInputStream

    def builder() -> Any:
        return GeneratorDatasetInputStream(
            _scanned_rows,
            gen_kwargs={"key": source.key, "paths": [str(p) for p in source.paths],
                        "builder": source.builder, "columns": columns, "digest": digest},
            cache_dir=str(cache_dir) if cache_dir else None,
        ).builder  # fmt: skip

    try:
        dataset = prepared_split(builder, holding)
    except Exception as exc:
        raise DataError(f"{source.key}: {source.spec}: cannot be read: {first_line(exc)}") from None
    unused = [c for c in dataset.column_names if dataset.data.column(c).null_count == len(dataset)]
    return dataset.remove_columns(unused)
