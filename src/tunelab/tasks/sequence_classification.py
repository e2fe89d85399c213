"""Sequence classification: one label per text (single-label), or one number (regression).

Labels come from the data's `label` column (`data.label_column`): strings or integers become
classes in a stable order (sorted), written into the model config as `id2label` / `label2id`,
so `pipeline("text-classification", model=DIR)` answers with the names. Labels that are all
numbers with a fractional part make a regression (`num_labels=1`, mean squared error).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from tunelab.data import DataError, pieces
from tunelab.tasks import Prepared, count_cut, head_loss

AUTO_CLASS = "AutoModelForSequenceClassification"
PIPELINE = "text-classification"
# Divided by the labelled items of the whole step: right under any number of processes.
LOSS = head_loss

log = logging.getLogger("tunelab")


def dataset(split: Any) -> Any:
    """Rows as a `datasets.Dataset` (generated rows arrive as a list of dicts)."""
    import datasets
    import pyarrow as pa

    if isinstance(split, datasets.Dataset):
        return split
    try:
        return datasets.Dataset.from_list(split)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        first = str(exc).splitlines()[0]
        raise DataError(f"data: a column mixes kinds of values ({first})") from None


def labelled(split: Any, what: str = "label") -> Any:
    """`split` as a `datasets.Dataset` that has a label column, else one line saying which
    columns it has (`what`: how the task calls a label)."""
    column = dataset(split)
    if "label" not in column.column_names:
        raise DataError(
            f"data.label_column: the rows have no {what} column; they have "
            f"{', '.join(column.column_names)}: set data.label_column"
        )
    return column


def labels(rows: Any) -> list[Any]:
    """The classes in the training rows, in a stable order (sorted); [] for a regression.
    Labels must all be strings or all numbers: a file that writes one class both ways (1 and
    "1") is refused, since which rows belong together cannot be known. A column of numbers is
    read as one type, so 1 and 1.0 are one class (whole numbers are classes)."""
    column = labelled(rows.train)
    _refuse_mixed_kinds(column, "train")
    _refuse_missing(column, "train")
    values = _label_values(column)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numbers:
        if any(isinstance(v, float) and v % 1 for v in values):
            return []
        return sorted({int(v) for v in values})
    if all(isinstance(v, str) for v in values):
        return sorted(values)
    kinds = sorted({type(v).__name__ for v in values})
    raise DataError(
        f"data.label_column: labels mix kinds ({', '.join(kinds)}); use all strings or all numbers"
    )


def _refuse_mixed_kinds(column: Any, split: str) -> None:
    """`datasets` keeps a JSON column that mixes strings and numbers as JSON text, in which 1 and
    "1" can no longer be told apart: refuse it rather than guess."""
    import datasets

    if isinstance(column.features.get("label"), datasets.Json):
        raise DataError(
            f'data.{split}: the labels mix strings and numbers (such as 1 and "1"), so rows '
            "of one class could be split or merged; write every label the same way (all "
            "strings, or all numbers)"
        )


def _refuse_missing(column: Any, split: str) -> None:
    """Every row of a split needs a label: one line counting those without, quoting the first."""
    import pyarrow.compute as pc

    labels = column.select_columns(["label"]).with_format("arrow")[:]["label"]  # this split's
    missing = pc.is_null(labels)
    count = int(pc.sum(missing).as_py() or 0)
    if count:
        text = str(column[int(pc.index(missing, True).as_py())]["text"])
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise DataError(
            f"data.{split}: {count} of {len(column)} rows have no label (null or missing), such "
            f"as the row {shown!r}; give every row a label (data.label_column), or drop them"
        )


def _norm(value: Any) -> Any:
    return int(value) if isinstance(value, float) and not value % 1 else value


def _label_values(split: Any) -> list[Any]:
    column = labelled(split)
    try:
        found = column.unique("label")
    except Exception:  # a column of mixed kinds (Arrow keeps it as JSON): read it in Python
        found = list({json.dumps(v, sort_keys=True): v for v in column["label"]}.values())
    return [v for v in found if v is not None]


def model_kwargs(rows: Any) -> dict[str, Any]:
    names = labels(rows)
    if not names:
        return {"num_labels": 1, "problem_type": "regression"}
    return {
        "num_labels": len(names),
        "id2label": {i: str(n) for i, n in enumerate(names)},
        "label2id": {str(n): i for i, n in enumerate(names)},
        "problem_type": "single_label_classification",
    }


def prepare(rows: Any, tokenizer: Any, cfg: Any) -> Prepared:
    """Texts tokenized (cut at `max_length`, counted, or refused with `truncate=false`) and
    labels as class ids (or floats for a regression)."""
    names = labels(rows)
    ids = {n: i for i, n in enumerate(names)}
    splits: list[Any] = []
    truncated = 0
    for split_name, split in (("train", rows.train), ("eval", rows.eval)):
        if not split:
            splits.append(None)
            continue
        column = labelled(split)
        _refuse_mixed_kinds(column, split_name)
        _refuse_missing(column, split_name)
        if names:
            unknown = sorted(str(v) for v in {_norm(v) for v in _label_values(column)} - set(names))
            if unknown:
                raise DataError(
                    f"data.{split_name}: labels {', '.join(unknown[:5])} are not among the "
                    f"training labels ({', '.join(map(str, names[:20]))})"
                )

        def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            # One token past max_length tells a row that is cut; its first max_length ids are
            # those of the whole row (the end token is cut with it, as before).
            texts = [_head(tokenizer, t, cfg.max_length) for t in batch["text"]]
            enc = tokenizer(texts, truncation=True, max_length=cfg.max_length + 1)
            enc["too_long"] = [len(x) > cfg.max_length for x in enc["input_ids"]]
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in enc:
                    enc[key] = [x[: cfg.max_length] for x in enc[key]]
            enc["labels"] = [ids[_norm(v)] if names else float(v) for v in batch["label"]]
            return enc

        encoded = column.map(encode, batched=True, remove_columns=column.column_names)
        truncated += count_cut(encoded, split_name, cfg)
        splits.append(encoded.remove_columns("too_long"))
    return Prepared(splits[0], splits[1], truncated)


def _head(tokenizer: Any, text: str, limit: int) -> str:
    """The start of `text` that holds more than `limit` tokens (cut where data.pieces cuts, so
    it tokenizes as the whole text begins), or all of it: a tokenizer holds ~100 bytes per
    character it is given, so a 50 MB row is never given whole."""
    if len(text) <= 2 * pieces.PIECE:
        return text
    end = count = 0
    for piece in pieces.pieces(text):
        end += len(piece)
        count += len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if count > limit:
            return text[:end]
    return text


def collator(tokenizer: Any) -> Any:
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def preprocess_logits(logits: Any, labels: Any) -> Any:
    """The predicted class (or the regression value): evaluation keeps one number per row."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits[..., 0] if logits.shape[-1] == 1 else logits.argmax(dim=-1)


def compute_metrics(rows: Any) -> Any:
    """Accuracy and macro F1 for classes; RMSE for a regression."""
    import numpy as np

    n_classes = len(labels(rows))

    def compute(eval_pred: Any) -> dict[str, float]:
        preds, gold = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
        if not n_classes:
            return {"rmse": float(np.sqrt(np.mean((preds - gold) ** 2)))}
        return {"accuracy": float(np.mean(preds == gold)), "f1": macro_f1(preds, gold)}

    return compute


def macro_f1(preds: Any, gold: Any) -> float:
    """F1 averaged over the classes that occur in the predictions or the gold labels."""
    import numpy as np

    scores = []
    for c in np.union1d(preds, gold):
        tp = float(np.sum((preds == c) & (gold == c)))
        fp = float(np.sum((preds == c) & (gold != c)))
        fn = float(np.sum((preds != c) & (gold == c)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores)) if scores else 0.0
