"""The run's data: rows generated in code or read from files, before any tokenizer sees them.

A row is either `{"text": ...}` (trained on all tokens) or `{"prompt": ..., "completion": ...}`
(trained on the completion only; exact match is reported). Each task (tunelab.tasks) turns rows
into the tensors its model trains on.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import ConfigError


@dataclass
class Rows:
    train: list[dict[str, str]]
    eval: list[dict[str, str]]
    source: str  # where the rows came from, for the model card and tracking
    has_completions: bool  # prompt/completion rows: exact match is meaningful
    name: str = "data"  # a short name for the MLflow dataset inputs
    split_sources: dict[str, str] = field(default_factory=dict)  # "train"/"eval" -> path

    @property
    def digest(self) -> str:
        """sha256 over the exact rows, train then eval: same digest, same data."""
        return _digest(self.train, self.eval)

    def split_digest(self, split: str) -> str:
        return _digest(getattr(self, split))

    def texts(self) -> list[str]:
        """Training texts, for training a tokenizer from scratch."""
        return [_text_of(r) for r in self.train]


def _text_of(row: dict[str, Any]) -> str:
    if "text" in row:
        return " ".join(row["text"]) if isinstance(row["text"], list) else str(row["text"])
    return str(row["prompt"]) + str(row["completion"])


def _digest(*splits: list[dict[str, str]]) -> str:
    h = hashlib.sha256()
    for split in splits:
        for row in split:
            h.update(json.dumps(row, sort_keys=True).encode())
            h.update(b"\n")
        h.update(b"\0")
    return h.hexdigest()


def load(cfg: Any) -> Rows:
    """Rows for `cfg.data` (an addition task generated in code, or local files)."""
    if cfg.type == "addition":
        return addition(cfg.digits, cfg.train_size, cfg.eval_size, cfg.seed)
    return from_files(cfg)


def addition(digits: int, train_size: int, eval_size: int, seed: int) -> Rows:
    """`012+345=` -> `0357`: operands below 10**digits, zero-padded to a fixed width (a small
    transformer then learns digit alignment in a minute); eval pairs never appear in train."""
    rng = random.Random(seed)
    space = 10 ** (2 * digits)
    n = min(train_size + eval_size, space)
    pairs = [divmod(i, 10**digits) for i in rng.sample(range(space), n)]
    w = digits
    rows = [
        {"prompt": f"{a:0{w}d}+{b:0{w}d}=", "completion": f"{a + b:0{w + 1}d}"} for a, b in pairs
    ]
    return Rows(
        train=rows[eval_size:] or rows,
        eval=rows[:eval_size],
        source=f"addition(digits={digits}, seed={seed})",
        has_completions=True,
        name=f"addition-{digits}digit",
    )


class DataError(ConfigError):
    """A data file that cannot be used; the message names the key, the file and the line."""

    def __init__(self, message: str) -> None:
        super().__init__([message])


def from_files(cfg: Any) -> Rows:
    """Rows from .jsonl/.json (one object per line, or one array) or .txt (one example per
    line). Read here rather than through `datasets`, so a bad line is reported by its number."""
    train = read_rows("data.train", cfg.train, cfg)
    if cfg.eval:
        evaluation = read_rows("data.eval", cfg.eval, cfg)
    elif cfg.eval_fraction > 0 and len(train) > 1:
        rng = random.Random(cfg.seed)
        rng.shuffle(train)
        n_eval = max(1, int(len(train) * cfg.eval_fraction))
        train, evaluation = train[n_eval:], train[:n_eval]
    else:
        evaluation = []
    return Rows(
        train=train,
        eval=evaluation,
        source=str(cfg.train) + (f" + {cfg.eval}" if cfg.eval else ""),
        has_completions=all("completion" in r for r in train),
        name=Path(cfg.train).stem,
        split_sources={"train": str(cfg.train), "eval": str(cfg.eval or cfg.train)},
    )


def read_rows(key: str, path: str, cfg: Any) -> list[dict[str, str]]:
    """Every row of one file, or a DataError naming `key`, the file and the line."""
    p = Path(path).expanduser()
    if not p.is_file():
        why = (
            "is a directory"
            if p.is_dir()
            else "is not a regular file (a FIFO, socket or device)"
            if p.exists()
            else "does not exist"
        )
        raise DataError(f"{key}: {p} {why}; give a .jsonl, .json or .txt file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{key}: {p} line {line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column "
            f"{column}); re-encode the file as UTF-8"
        ) from None
    if p.suffix in (".txt", ".text"):
        rows = [{"text": line} for line in text.splitlines() if line.strip()]
    else:
        rows = [_row(record, cfg, key, p, n) for n, record in _records(text, key, p)]
    if not rows:
        raise DataError(f"{key}: {p} is empty (no rows)")
    return rows


def _records(text: str, key: str, path: Path) -> list[tuple[int, Any]]:
    if text.lstrip().startswith("["):  # one JSON array
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{key}: {path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        except RecursionError:
            raise DataError(f"{key}: {path}: JSON nested too deeply to read") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{key}: {path} line {n}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line must be one JSON object"
            ) from None
        except RecursionError:
            raise DataError(f"{key}: {path} line {n}: JSON nested too deeply to read") from None
    return out


def _row(record: Any, cfg: Any, key: str, path: Path, line: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(
            f"{key}: {path} line {line}: expected a JSON object, got {type(record).__name__}"
        )

    def text(column: str) -> str:
        value = record[column]
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        kind = "null" if value is None else type(value).__name__
        raise DataError(
            f"{key}: {path} line {line}: {column!r} is {kind}, not text; every row needs a "
            "string there"
        )

    if cfg.prompt_column in record and cfg.completion_column in record:
        return {"prompt": text(cfg.prompt_column), "completion": text(cfg.completion_column)}
    if cfg.text_column not in record:
        raise DataError(
            f"{key}: {path} line {line}: no {cfg.text_column!r} column (nor "
            f"{cfg.prompt_column!r} + {cfg.completion_column!r}); it has "
            f"{', '.join(map(repr, record)) or 'no columns'}: set data.text_column, or "
            "data.prompt_column and data.completion_column"
        )
    value = record[cfg.text_column]
    row: dict[str, Any] = {
        # A list of words (token classification) stays a list.
        "text": [str(w) for w in value] if isinstance(value, list) else text(cfg.text_column)
    }
    if cfg.label_column in record:
        row["label"] = record[cfg.label_column]
    return row
