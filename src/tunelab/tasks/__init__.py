"""Tasks: one module per `model.task`, each owning what differs between tasks: the Auto class
that loads the model, how rows become tensors, the collator, and the metrics computation.

A task module defines `AUTO_CLASS`, `PIPELINE` (the transformers pipeline that serves it),
`prepare(rows, tokenizer, data_cfg) -> Prepared`, `model_kwargs(rows) -> dict` (what
`from_pretrained` needs from the data: labels), `collator(tokenizer)`, `compute_metrics(rows)`,
`preprocess_logits(logits, labels)` and `LOSS` (Trainer's `compute_loss_func`, or None for the
model's own loss). Metric names and directions are tunelab.metrics'.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tunelab import metrics
from tunelab.errors import DataError

log = logging.getLogger("tunelab")


@dataclass
class Prepared:
    """The run's tokenized splits (`eval` None without an eval set)."""

    train: Any
    eval: Any | None
    truncated_rows: int

    @property
    def train_tokens(self) -> int:
        """Tokens in the training split: from its `length` column where it has one, else
        from input_ids, a batch at a time (never every id in a Python list)."""
        import pyarrow.compute as pc

        if "length" in self.train.column_names:
            lengths = self.train.select_columns(["length"]).with_format("arrow")[:]["length"]
            return int(pc.sum(lengths).as_py() or 0)
        ids = self.train.select_columns(["input_ids"]).with_format("arrow")
        return sum(
            int(pc.sum(pc.list_value_length(batch["input_ids"])).as_py() or 0)
            for batch in ids.iter(batch_size=10_000)
        )


def head_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """A classification head's loss (cross-entropy; squared error for a one-output regression)
    summed over the labelled items and divided by `num_items_in_batch`: Trainer's count of
    labelled items over the whole step (every accumulated micro-batch, every process).

    Why tunelab computes it: Trainer multiplies a loss by the number of processes whenever the
    model's forward takes `**kwargs` (`average_tokens_across_devices`), assuming the model
    divided by that global count; transformers' classification heads take `**kwargs` but
    average over their own micro-batch, so under N processes their loss, gradients and grad
    norm came out N times too large (transformers #35078, #37474). Divided by the global count,
    N processes report and apply what one process with the same global batch does."""
    import torch
    import torch.nn.functional as F

    logits = (outputs["logits"] if isinstance(outputs, dict) else outputs[0]).float()
    if logits.shape[-1] == 1 and labels.is_floating_point():  # a regression
        total = F.mse_loss(logits.view(-1), labels.view(-1).float(), reduction="sum")
        mine = labels.numel()
    else:
        flat = labels.view(-1).long()
        total = F.cross_entropy(
            logits.view(-1, logits.shape[-1]), flat, ignore_index=metrics.IGNORE, reduction="sum"
        )
        mine = (flat != metrics.IGNORE).sum()
    if num_items_in_batch is None:  # no count from Trainer: this micro-batch's own mean
        return total / max(int(mine), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def count_cut(encoded: Any, split: str, cfg: Any) -> int:
    """How many rows of the tokenized split `encoded` (its `too_long` column) were longer than
    `cfg.max_length`: refused with `cfg.truncate` false, else reported; the column is dropped."""
    cut = int(sum(encoded["too_long"]))
    if cut and not cfg.truncate:
        raise DataError(
            f"data.max_length: {cut} of {len(encoded)} {split} rows are longer than "
            f"{cfg.max_length} tokens; raise data.max_length or set data.truncate=true"
        )
    if cut:
        log.warning("%d %s rows were cut at data.max_length=%d tokens", cut, split, cfg.max_length)
    return cut


def get(task: str) -> ModuleType:
    """The module of `task` (one of tunelab.metrics.TASKS)."""
    if task not in metrics.TASKS:
        raise ValueError(f"model.task: {task!r} is not one of {', '.join(metrics.TASKS)}")
    return importlib.import_module(f"tunelab.tasks.{task}")
