"""Causal language modelling: next-token prediction, loss on the completion only for
prompt/completion rows (exact match reported), on every token for text rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tunelab.data import DataError, Rows
from tunelab.metrics import IGNORE
from tunelab.tasks import Prepared

AUTO_CLASS = "AutoModelForCausalLM"
PIPELINE = "text-generation"


def model_kwargs(rows: Rows) -> dict[str, Any]:
    return {}


@dataclass
class Tokenized:
    """A split as a `datasets.Dataset` of input_ids/labels, and how many rows were cut."""

    dataset: Any
    truncated_rows: int = 0


def prepare(rows: Rows, tokenizer: Any, cfg: Any) -> Prepared:
    """Both splits of `rows` tokenized for `cfg.data` (max_length, truncate)."""
    train = tokenize(rows.train, tokenizer, cfg.max_length, cfg.truncate)
    evaluation = (
        tokenize(rows.eval, tokenizer, cfg.max_length, cfg.truncate, "eval") if rows.eval else None
    )
    truncated = train.truncated_rows + (evaluation.truncated_rows if evaluation else 0)
    return Prepared(train.dataset, evaluation.dataset if evaluation else None, truncated)


def tokenize(
    rows: list[dict[str, str]],
    tokenizer: Any,
    max_length: int,
    truncate: bool = True,
    split: str = "train",
) -> Tokenized:
    """A `datasets.Dataset` of input_ids/labels; loss only on completions where there are any.
    Rows longer than `max_length` tokens are cut (counted, with a warning) or, with
    `truncate=False`, refused."""
    import datasets

    eos = [tokenizer.eos_token_id]
    input_ids, labels = [], []
    too_long, longest = 0, 0
    for n, row in enumerate(rows, 1):
        if isinstance(row.get("text"), list):
            raise DataError(
                f"data.text_column: {split} row {n} holds a list, not text; a causal LM trains "
                "on text (lists of words are for model.task=token_classification)"
            )
        if "completion" in row:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
            ids, lab = prompt + answer, [IGNORE] * len(prompt) + answer
        else:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + eos
            lab = list(ids)
        if len(ids) > max_length:
            too_long, longest = too_long + 1, max(longest, len(ids))
        input_ids.append(ids[:max_length])
        labels.append(lab[:max_length])
    if too_long and not truncate:
        raise DataError(
            f"data.max_length: {too_long} of {len(rows)} {split} rows are longer than "
            f"{max_length} tokens (the longest: {longest}); raise data.max_length or set "
            "data.truncate=true to cut them"
        )
    if too_long:
        logging.getLogger("tunelab").warning(
            "%d of %d %s rows were longer than data.max_length=%d tokens and were truncated "
            "(the longest: %d)", too_long, len(rows), split, max_length, longest
        )  # fmt: skip
    dataset = datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})
    return Tokenized(dataset, too_long)


def collator(tokenizer: Any) -> Any:
    """Pads input_ids with the pad token and labels with -100."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, padding=True)


def preprocess_logits(logits: Any, labels: Any) -> Any:
    """Keep only the predicted token ids, so evaluation does not hold every logit in memory."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(rows: Rows) -> Any:
    """Token accuracy, plus exact match for prompt/completion rows.

    Under teacher forcing a row whose every answer token is the argmax is exactly the row that
    greedy decoding would reproduce, so this exact match equals greedy generation's, without
    generating.
    """
    import numpy as np

    has_completions = rows.has_completions

    def compute(eval_pred: Any) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        preds, labels = preds[:, :-1], labels[:, 1:]
        mask = labels != IGNORE
        hit = (preds == labels) & mask
        out = {"token_accuracy": float(hit.sum() / max(mask.sum(), 1))}
        if has_completions:
            rows_with_labels = mask.any(axis=1)
            exact = np.all(hit | ~mask, axis=1) & rows_with_labels
            out["exact_match"] = float(exact.sum() / max(rows_with_labels.sum(), 1))
        return out

    return compute
