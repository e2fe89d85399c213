"""Where a split's rows are: the files, glob, save_to_disk directories or hub id that
data.train / data.eval name, the configured column names, and the error a bad source or row is.
Pure Python: the config checks use it before anything heavy is imported."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

# Canonical column names: the loader renames data.text_column etc. to these.
TEXT, PROMPT, COMPLETION, MESSAGES, LABEL = "text", "prompt", "completion", "messages", "label"
# File suffix -> the `datasets` builder that reads it.
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
           ".txt": "text", ".text": "text"}  # fmt: skip
FORMAT_NAMES = ".jsonl, .json, .csv, .parquet or .txt"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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


def first_line(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__  # the root cause says the most
    text = (str(cause).strip() if cause else "") or str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
