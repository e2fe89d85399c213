"""The run's data: rows (generated or read from files), tokenized datasets, and the task metrics.

A row is either `{"text": ...}` (trained on all tokens) or `{"prompt": ..., "completion": ...}`
(trained on the completion only; exact match is reported). Rows become `datasets.Dataset`s of
`input_ids` / `labels`, with -100 on the tokens that carry no loss.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE = -100


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
        return [r.get("text") or r["prompt"] + r["completion"] for r in self.train]


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


def from_files(cfg: Any) -> Rows:
    """Rows from .jsonl/.json or .txt files, read with the `datasets` library."""
    import datasets

    def read(path: str) -> list[dict[str, str]]:
        p = Path(path).expanduser()
        builder = "text" if p.suffix in (".txt", ".text") else "json"
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        return [_row(r, cfg) for r in ds]

    train = read(cfg.train)
    if cfg.eval:
        evaluation = read(cfg.eval)
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


def _row(record: dict[str, Any], cfg: Any) -> dict[str, str]:
    if cfg.prompt_column in record and cfg.completion_column in record:
        prompt, completion = record[cfg.prompt_column], record[cfg.completion_column]
        return {"prompt": str(prompt), "completion": str(completion)}
    return {"text": str(record[cfg.text_column])}


def tokenize(rows: list[dict[str, str]], tokenizer: Any, max_length: int) -> Any:
    """A `datasets.Dataset` of input_ids/labels; loss only on completions where there are any."""
    import datasets

    eos = [tokenizer.eos_token_id]
    input_ids, labels = [], []
    for row in rows:
        if "completion" in row:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
            ids, lab = prompt + answer, [IGNORE] * len(prompt) + answer
        else:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + eos
            lab = list(ids)
        input_ids.append(ids[:max_length])
        labels.append(lab[:max_length])
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def collator(tokenizer: Any) -> Any:
    """Pads input_ids with the pad token and labels with -100."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, padding=True)


def argmax_logits(logits: Any, labels: Any) -> Any:
    """Keep only the predicted token ids, so evaluation does not hold every logit in memory."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def metrics_fn(has_completions: bool) -> Any:
    """compute_metrics for Trainer: token accuracy, plus exact match for prompt/completion rows.

    Under teacher forcing a row whose every answer token is the argmax is exactly the row that
    greedy decoding would reproduce, so this exact match equals greedy generation's, without
    generating.
    """
    import numpy as np

    def compute(eval_pred: Any) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        preds, labels = preds[:, :-1], labels[:, 1:]
        mask = labels != IGNORE
        hit = (preds == labels) & mask
        out = {"token_accuracy": float(hit.sum() / max(mask.sum(), 1))}
        if has_completions:
            rows = mask.any(axis=1)
            exact = np.all(hit | ~mask, axis=1) & rows
            out["exact_match"] = float(exact.sum() / max(rows.sum(), 1))
        return out

    return compute
