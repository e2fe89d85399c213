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

This module tells the story (`load`); `sources` resolves data.train / data.eval and holds the
error type, `arrow` reads through `datasets` and checks the columns, `scan` is the line scanner,
`prepared` builds and holds tunelab's prepared data, `builder_entries` checks and holds
`datasets`' own entries, `cache` is the cache on disk (keys, entries in use, pruning),
`integrity` checks entries on reuse, `pieces` cuts long texts so no tokenizer holds a whole
long row.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data import pieces
from tunelab.data.arrow import quiet_datasets, read, row_kinds, training_texts
from tunelab.data.cache import Limits, cache_key
from tunelab.data.prepared import CacheEntry, Holding, cached, tokenizer_digest
from tunelab.data.sources import (
    COMPLETION,
    FORMAT_NAMES,
    FORMATS,
    LABEL,
    MESSAGES,
    PROMPT,
    TEXT,
    Columns,
    DataError,
    Source,
    entries,
    resolve,
    spec_problems,
)

__all__ = [
    "COMPLETION", "FORMATS", "FORMAT_NAMES", "LABEL", "MESSAGES", "PROMPT", "TEXT", "CacheEntry",
    "Columns", "DataError", "Holding", "Limits", "Rows", "Source", "addition", "cached", "entries",
    "cache_key", "from_files", "load", "processes", "quiet_datasets", "resolve", "row_kinds",
    "spec_problems", "tokenizer_digest", "training_texts",
]  # fmt: skip

# Bump when what a digest covers, or how rows are read, changes: older cache entries are unused.
DATA_VERSION = 1


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
    holding: Holding | None = None  # the cache entries these rows use, held while they live

    def split_digest(self, split: str) -> str:
        return self.split_digests.get(split) or cache_key(self.digest, split)

    def texts(self, batch_size: int = 1000) -> Iterator[list[str]]:
        """Training texts in batches, for training a tokenizer from scratch: read from the Arrow
        columns batch by batch, never all at once, long texts in pieces (a tokenizer's trainer
        holds ~100 bytes per character of a text it is given; cut at white space, the pieces
        count the same words)."""
        for batch in self.train.with_format("arrow").iter(batch_size=batch_size):
            cut = ((0, piece) for text in training_texts(batch) for piece in pieces.pieces(text))
            for group in pieces.batches(cut):
                yield [piece for _, piece in group]


def load(cfg: Any, cache_dir: str | Path | None = None, workers: int = 0) -> Rows:
    """Rows for `cfg.data` (an addition task generated in code, or files). `cache_dir`:
    where `datasets` keeps the loaded Arrow files and tunelab its prepared data
    (`<output.root>/.cache/datasets`); `workers`: processes for batched maps (0: the cores)."""
    cache = Path(cache_dir).expanduser().absolute() if cache_dir else None
    holding = Holding(cache, Limits.of(cfg)) if cache else None
    if cfg.type == "addition":
        rows = addition(cfg.digits, cfg.train_size, cfg.eval_size, cfg.seed)
    else:
        rows = from_files(cfg, cache, holding)
    rows.cache_dir, rows.workers, rows.holding = cache, workers, holding
    return rows


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


# Files


def from_files(cfg: Any, cache_dir: Path | None = None, holding: Holding | None = None) -> Rows:
    """Rows from data.train (and data.eval, else a held-out `eval_fraction` of train). The
    cache entries they are read into are held by `holding`, and the cache pruned when the run
    added one."""
    columns = Columns.of(cfg)
    with quiet_datasets():
        train = read(resolve("data.train", cfg.train), columns, cache_dir, holding)
        evaluation = (
            read(resolve("data.eval", cfg.eval), columns, cache_dir, holding) if cfg.eval else None
        )
    if holding is not None and holding.added_entry:
        holding.prune()
    options = {
        "version": DATA_VERSION,
        "columns": list(columns.renames()),
        "split": None if evaluation else [cfg.eval_fraction, cfg.seed],
    }
    digest = cache_key(train.digest, evaluation.digest if evaluation else "", options)
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


def processes(n_rows: int, workers: int = 0) -> int:
    """Processes for a batched map over `n_rows`: `workers` (training.num_workers), else the
    cores (at most 8); 1 for small data, where starting processes costs more than it saves."""
    if n_rows < 20_000:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(workers or cores, 8, n_rows // 10_000))
