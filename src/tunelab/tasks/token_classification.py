"""Token classification (tagging): one tag per word, aligned to the word's first sub-token.

A row's `text` (`data.text_column`) is a list of words, or a string split on white space; its
`label` (`data.label_column`) is the list of their tags, one per word, strings (IOB2 such as
`B-PER`, `I-PER`, `O` for entity-level metrics) or integers. The tags found in the training rows,
sorted, become `id2label` / `label2id`. Sub-tokens after a word's first, and special tokens,
carry no loss (-100). Metrics: entity-level precision, recall and F1 (seqeval) and tag accuracy.
"""

from __future__ import annotations

import itertools
import logging
import re
from typing import Any

from tunelab.data import DataError
from tunelab.metrics import IGNORE
from tunelab.tasks import Prepared, count_cut, head_loss
from tunelab.tasks.sequence_classification import labelled

AUTO_CLASS = "AutoModelForTokenClassification"
PIPELINE = "token-classification"
# Divided by the labelled items of the whole step: right under any number of processes.
LOSS = head_loss

log = logging.getLogger("tunelab")


def _words(text: Any) -> list[str]:
    return text.split() if isinstance(text, str) else [str(w) for w in text]


def _first_words(text: Any, n: int) -> list[str]:
    """The first words of a row, enough for `n` tokens (every word that is not blank gives one
    at least; a few more, as a normalizer may empty one): the tokenizer never gets a whole long
    row, whose encoding would take ~100 bytes per character before the cut at max_length."""
    if isinstance(text, str):  # as str.split() splits it, without copying the rest
        return [m.group() for m in itertools.islice(re.finditer(r"\S+", text), n + 8)]
    words, filled = [], 0
    for word in text:
        words.append(str(word))
        filled += bool(words[-1].strip())
        if filled >= n + 8:
            break
    return words


def tags(rows: Any) -> list[Any]:
    """The tags of the training rows, sorted."""
    found = _checked_tags(labelled(rows.train, "tag"), "train")
    if {type(t) for t in found} - {str, int}:
        raise DataError("data.label_column: tags must be strings or integers")
    return sorted(found, key=str)


def _checked_tags(column: Any, split: str) -> set[Any]:
    """The tags of a split's rows, each row checked first: a list of one tag (not null) per
    word, or one line naming the row."""
    found: set[Any] = set()
    for n, (text, row_tags) in enumerate(zip(column["text"], column["label"], strict=True), 1):
        words = len(_words(text)) if text is not None else 0
        if not isinstance(row_tags, list) or len(row_tags) != words:
            given = f"{len(row_tags)} tags" if isinstance(row_tags, list) else "no list of tags"
            raise DataError(
                f"data.{split}: row {n}: {words} words but {given}; give one tag per word"
            )
        if None in row_tags:
            raise DataError(
                f"data.{split}: row {n}: tag {row_tags.index(None) + 1} of {words} is null; give "
                "every word a tag"
            )
        found.update(row_tags)
    return found


def model_kwargs(rows: Any) -> dict[str, Any]:
    names = tags(rows)
    return {
        "num_labels": len(names),
        "id2label": {i: str(n) for i, n in enumerate(names)},
        "label2id": {str(n): i for i, n in enumerate(names)},
    }


def prepare(rows: Any, tokenizer: Any, cfg: Any) -> Prepared:
    names = tags(rows)
    ids = {n: i for i, n in enumerate(names)}
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "model.name_or_path: token classification needs a fast tokenizer (tokenizer.json)"
        )
    splits: list[Any] = []
    truncated = 0
    for split_name, split in (("train", rows.train), ("eval", rows.eval)):
        if not split:
            splits.append(None)
            continue
        column = labelled(split, "tag")
        if split_name != "train":  # the training rows were checked by tags()
            _checked_tags(column, split_name)

        def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            words = [_first_words(t, cfg.max_length) for t in batch["text"]]
            enc = tokenizer(
                words, is_split_into_words=True, truncation=True, max_length=cfg.max_length
            )
            out_labels, cut = [], []
            for i, row_tags in enumerate(batch["label"]):
                previous, aligned = None, []
                for word in enc.word_ids(i):
                    if word is None or word == previous:
                        aligned.append(IGNORE)
                    else:
                        tag = row_tags[word]
                        if tag not in ids:
                            raise DataError(
                                f"data: tag {tag!r} is not among the training tags "
                                f"({', '.join(map(str, names[:20]))})"
                            )
                        aligned.append(ids[tag])
                    previous = word
                seen = {w for w in enc.word_ids(i) if w is not None}
                cut.append(len(seen) < len(row_tags))
                out_labels.append(aligned)
            enc["labels"] = out_labels
            enc["too_long"] = cut
            return dict(enc)

        encoded = column.map(encode, batched=True, remove_columns=column.column_names)
        truncated += count_cut(encoded, split_name, cfg)
        splits.append(encoded.remove_columns("too_long"))
    return Prepared(splits[0], splits[1], truncated)


def collator(tokenizer: Any) -> Any:
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE)


def preprocess_logits(logits: Any, labels: Any) -> Any:
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(rows: Any) -> Any:
    """Entity-level precision, recall and F1 (seqeval, on IOB tags) and tag accuracy."""
    import numpy as np

    names = [str(n) for n in tags(rows)]

    def compute(eval_pred: Any) -> dict[str, float]:
        from seqeval.metrics import f1_score, precision_score, recall_score

        preds, gold = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
        mask = gold != IGNORE
        true_tags = [
            [names[g] for g, m in zip(row, keep, strict=True) if m]
            for row, keep in zip(gold, mask, strict=True)
        ]
        pred_tags = [
            [names[p] for p, m in zip(row, keep, strict=True) if m]
            for row, keep in zip(preds, mask, strict=True)
        ]
        return {
            "accuracy": float(np.sum((preds == gold) & mask) / max(mask.sum(), 1)),
            "precision": float(precision_score(true_tags, pred_tags, zero_division=0)),
            "recall": float(recall_score(true_tags, pred_tags, zero_division=0)),
            "f1": float(f1_score(true_tags, pred_tags, zero_division=0)),
        }

    return compute
