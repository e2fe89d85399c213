"""Causal language modelling: next-token prediction. Loss on the completion only for
prompt/completion rows (exact match reported), on the assistant turns only for conversations
(`messages`, rendered with the tokenizer's chat template), on every token for text rows."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab import data
from tunelab.data import DataError, Rows
from tunelab.data.pieces import batches, pieces
from tunelab.metrics import IGNORE
from tunelab.tasks import Prepared

AUTO_CLASS = "AutoModelForCausalLM"
PIPELINE = "text-generation"
# The model's own loss: transformers' causal LMs divide by Trainer's global token count.
LOSS = None
# Bump when the tokenized columns change: older cache entries are then unused.
VERSION = 1

log = logging.getLogger("tunelab")


def model_kwargs(rows: Rows) -> dict[str, Any]:
    return {}


@dataclass
class Tokenized:
    """A split as a `datasets.Dataset` of input_ids/labels/length, and how many rows were cut
    (and the longest row's length before the cut)."""

    dataset: Any
    truncated_rows: int = 0
    longest: int = 0


def prepare(rows: Rows, tokenizer: Any, cfg: Any) -> Prepared:
    """Both splits of `rows` tokenized for `cfg.data` (max_length, truncate), from the cache
    under `rows.cache_dir` when the same data, tokenizer and settings were prepared before."""
    if rows.has_messages:
        require_chat_template(tokenizer)
    for split in (rows.train, rows.eval):
        if data.TEXT in split.column_names and _is_list(split.features[data.TEXT]):
            raise DataError(
                f"data.text_column: {data.TEXT!r} holds lists of words (token classification "
                "data); causal_lm trains on strings: set model.task=token_classification, or "
                "give text"
            )
    splits = {name: getattr(rows, name) for name in ("train", "eval") if len(getattr(rows, name))}
    key = {
        "data": rows.digest,
        "tokenizer": data.tokenizer_digest(tokenizer),
        "max_length": cfg.max_length,
        "truncate": cfg.truncate,
        "task": "causal_lm",
        "version": VERSION,
    }
    with data.cached(rows, "tokenized", **key) as entry:
        for name, split in splits.items():
            if entry.hit:
                seen = entry.meta[name]
                report(name, seen["rows"], seen["truncated"], seen["longest"], cfg.max_length)
                continue
            out = tokenize(
                split,
                tokenizer,
                cfg.max_length,
                cfg.truncate,
                name,
                cache_file=entry.building / f"{name}.arrow",
                num_proc=data.processes(len(split), rows.workers),
            )
            entry.meta[name] = {
                "files": [Path(f["filename"]).name for f in out.dataset.cache_files],
                "rows": len(split),
                "truncated": out.truncated_rows,
                "longest": out.longest,
            }
    opened = {name: _open(entry.path, entry.meta[name]["files"]) for name in splits}
    truncated = sum(entry.meta[name]["truncated"] for name in splits)
    return Prepared(opened["train"], opened.get("eval"), truncated)


def _is_list(feature: Any) -> bool:
    import datasets

    return isinstance(feature, (datasets.List, datasets.LargeList, list))


def _open(path: Path, files: list[str]) -> Any:
    import datasets

    parts = [datasets.Dataset.from_file(str(path / f)) for f in files]
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return dataset.remove_columns(["full_length"])


def require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise DataError(
            f"data: the rows hold conversations ('messages'), but the tokenizer of {name} has "
            "no chat template to render them; use a model whose tokenizer has one (the "
            "from-scratch tokenizer does), or prompt/completion rows"
        )


def tokenize(
    dataset: Any,
    tokenizer: Any,
    max_length: int,
    truncate: bool = True,
    split: str = "train",
    cache_file: Path | None = None,
    num_proc: int = 1,
) -> Tokenized:
    """`dataset` (rows with canonical columns) as input_ids/labels/length, by a batched map;
    loss only on completions and assistant turns where there are any. Rows longer than
    `max_length` tokens are cut (counted, with a warning) or, with `truncate=False`, refused.
    Written to `cache_file` (with `num_proc` > 1, one file per process), else kept in memory."""
    import datasets
    import pyarrow.compute as pc

    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "full_length": datasets.Value("int32"),
        }
    )
    where = {"cache_file_name": str(cache_file)} if cache_file else {"keep_in_memory": True}
    with data.quiet_datasets(), _single_threaded_tokenizer(num_proc > 1):
        out = dataset.with_format("arrow").map(
            _Encoder(tokenizer, max_length),
            batched=True,
            batch_size=1000,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=dataset.column_names,
            features=features,
            load_from_cache_file=False,
            new_fingerprint=data.cache_key(
                dataset._fingerprint, data.tokenizer_digest(tokenizer), max_length, split
            ),
            **where,
        )
    out = out.with_format(None)
    full = out.data.column("full_length")
    too_long = int(pc.sum(pc.greater(full, max_length)).as_py() or 0)
    longest = int(pc.max(full).as_py() or 0)
    report(split, len(dataset), too_long, longest, max_length, truncate)
    if cache_file is None:
        out = out.remove_columns(["full_length"])
    return Tokenized(out, too_long, longest)


def report(
    split: str, rows: int, too_long: int, longest: int, max_length: int, truncate: bool = True
) -> None:
    """Warn about rows cut at `max_length`, or refuse them without `truncate`."""
    if too_long and not truncate:
        raise DataError(
            f"data.max_length: {too_long} of {rows} {split} rows are longer than "
            f"{max_length} tokens (the longest: {longest}); raise data.max_length or set "
            "data.truncate=true to cut them"
        )
    if too_long:
        log.warning(
            "%d of %d %s rows were longer than data.max_length=%d tokens and were truncated "
            "(the longest: %d)", too_long, rows, split, max_length, longest
        )  # fmt: skip


@contextlib.contextmanager
def _single_threaded_tokenizer(forking: bool) -> Iterator[None]:
    """Worker processes each tokenize on one thread (and tokenizers warns of nothing)."""
    if not forking:
        yield
        return
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


class _Encoder:
    """The batched map: an Arrow batch of rows in, an Arrow batch of token ids out. Ids are
    assembled and cut with numpy, not per token in Python."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.eos = tokenizer.eos_token_id
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # a copy without the padding or truncation tokenizer.json may set
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        self.backend = backend

    def __call__(self, batch: Any) -> Any:
        import numpy as np
        import pyarrow as pa

        n = batch.num_rows
        pc_rows, msg_rows, text_rows = data.row_kinds(batch)
        segments: list[_Segment] = []
        if pc_rows.any():
            idx = np.flatnonzero(pc_rows)
            segments.append(self._segment(n, idx, batch.column(data.PROMPT), labelled=False))
            segments.append(self._segment(n, idx, batch.column(data.COMPLETION)))
        if text_rows.any():
            segments.append(self._segment(n, np.flatnonzero(text_rows), batch.column(data.TEXT)))
        if msg_rows.any():
            segments.append(self._conversations(n, np.flatnonzero(msg_rows), batch))
        ends = (pc_rows | text_rows).astype(np.int64)  # conversations end as the template says
        eos = np.full(int(ends.sum()), self.eos, np.int32)
        segments.append(_Segment(eos, eos, ends))

        ids, labels, lengths, full = _concatenate(segments, n)
        kept = np.minimum(lengths, self.max_length)
        starts = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=starts[1:])
        position = np.arange(int(starts[-1])) - np.repeat(starts[:-1], lengths)
        keep = position < self.max_length
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(kept, out=offsets[1:])
        return pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[keep])),
                "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels[keep])),
                "length": pa.array(kept.astype(np.int32)),
                "full_length": pa.array(full.astype(np.int32)),
            }
        )

    def _encode(self, texts: list[str]) -> tuple[Any, Any, Any]:
        """Token ids of `texts`, no special tokens added: flat int32 ids of at most max_length
        per text, and per text how many of them and how many tokens it has in all. Texts are cut
        into pieces (tunelab.data.pieces) and given to the tokenizer in batches of bounded size:
        a long text's first pieces give its ids, the rest are only counted, so memory is
        bounded by the batch, never a whole long text's tokens (a 50 MB row took 8-16 GB)."""
        import numpy as np

        kept: list[list[int]] = []
        counts = np.zeros(len(texts), np.int64)
        full = np.zeros(len(texts), np.int64)
        cut = ((row, piece) for row, text in enumerate(texts) for piece in pieces(text))
        for group in batches(cut):
            encodings = self._encodings([piece for _, piece in group])
            for (row, _), encoded in zip(group, encodings, strict=True):
                room = self.max_length - int(counts[row])
                if room > 0:
                    ids = encoded.ids if self.backend is not None else encoded
                    kept.append(ids[:room])
                    counts[row] += min(room, len(ids))
                full[row] += len(encoded)
        total = int(counts.sum())
        return np.fromiter(itertools.chain.from_iterable(kept), np.int32, total), counts, full

    def _encodings(self, texts: list[str]) -> list[Any]:
        """The tokenizers `Encoding` of each text (its length is its number of tokens), or
        with a slow tokenizer the list of its ids."""
        if self.backend is not None:
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return list(encode(texts, add_special_tokens=False))
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def _segment(self, n: int, idx: Any, column: Any, labelled: bool = True) -> _Segment:
        import numpy as np

        flat, counts, lengths = self._encode(column.take(idx).to_pylist())
        per_row, full = np.zeros(n, np.int64), np.zeros(n, np.int64)
        per_row[idx], full[idx] = counts, lengths
        labels = flat if labelled else np.full(len(flat), IGNORE, np.int32)
        return _Segment(flat, labels, per_row, full)

    def _conversations(self, n: int, idx: Any, batch: Any) -> _Segment:
        import numpy as np

        conversations = batch.column(data.MESSAGES).take(idx).to_pylist()
        ids, labels = [], []
        per_row, full = np.zeros(n, np.int64), np.zeros(n, np.int64)
        for i, turns in zip(idx, conversations, strict=True):
            row_ids, row_labels, full[i] = self.conversation(turns)
            ids.append(row_ids)
            labels.append(row_labels)
            per_row[i] = len(row_ids)
        return _Segment(
            np.concatenate(ids).astype(np.int32),
            np.concatenate(labels).astype(np.int32),
            per_row,
            full,
        )

    def conversation(self, turns: list[dict[str, Any]]) -> tuple[Any, Any, int]:
        """Token ids of one conversation rendered with the chat template (at most max_length),
        their labels: the ids of the assistant turns (as the template renders them, end-of-turn
        included), -100 elsewhere; and how many tokens the whole conversation has. Each
        assistant turn's characters are found by rendering the conversation up to it (with the
        generation prompt) and through it. Tokenized in pieces, as `_encode` does."""
        import numpy as np

        turns = [{"role": t["role"], "content": t["content"]} for t in turns]
        full = self._render(turns, False)
        spans = []
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before, through = self._render(turns[:i], True), self._render(turns[: i + 1], False)
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError(
                    "data: the chat template does not render a conversation's turns as "
                    "prefixes of the whole (it rewrites earlier turns), so the assistant turns "
                    "cannot be found; use prompt/completion rows with this model"
                )
            spans.append((len(before), len(through)))
        ids: list[int] = []
        starts: list[int] = []
        total, offset = 0, 0
        for piece in pieces(full):
            if len(ids) < self.max_length:
                encoded = self.tokenizer(
                    piece, add_special_tokens=False, return_offsets_mapping=True
                )
                room = self.max_length - len(ids)
                ids += encoded["input_ids"][:room]
                starts += [offset + s for s, _ in encoded["offset_mapping"][:room]]
                total += len(encoded["input_ids"])
            else:
                total += len(self._encodings([piece])[0])
            offset += len(piece)
        at = np.asarray(starts, np.int64)
        assistant = np.zeros(len(ids), bool)
        for a, b in spans:
            assistant |= (at >= a) & (at < b)
        row = np.asarray(ids, np.int64)
        return row, np.where(assistant, row, IGNORE), total

    def _render(self, turns: list[dict[str, Any]], generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        if not turns and not generation_prompt:
            return ""
        try:
            text = self.tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=generation_prompt
            )
        except TemplateError as exc:
            raise DataError(
                f"data: the chat template cannot render a conversation: {exc}"
            ) from None
        return str(text)


@dataclass
class _Segment:
    """One piece of each row (a prompt, a completion, an end token): flat ids and labels (at
    most max_length per row), how many of them each row has (0 for rows without this piece),
    and how many tokens each row's piece has in all (`per_row` where it was not cut)."""

    ids: Any
    labels: Any
    per_row: Any
    full: Any = None

    def __post_init__(self) -> None:
        if self.full is None:
            self.full = self.per_row


def _concatenate(segments: list[_Segment], n: int) -> tuple[Any, Any, Any, Any]:
    """Each row's pieces one after another: flat ids, flat labels, each row's length in them
    (at least its first max_length tokens) and each row's length in all."""
    import numpy as np

    lengths = np.stack([s.per_row for s in segments])  # segment x row
    full = np.stack([s.full for s in segments]).sum(axis=0)
    row_lengths = lengths.sum(axis=0)
    row_start = np.zeros(n + 1, np.int64)
    np.cumsum(row_lengths, out=row_start[1:])
    before = np.cumsum(lengths, axis=0) - lengths  # where each piece starts within its row
    ids = np.empty(int(row_start[-1]), np.int32)
    labels = np.empty_like(ids)
    for j, segment in enumerate(segments):
        count = segment.per_row
        total = int(count.sum())
        if not total:
            continue
        piece_start = np.cumsum(count) - count  # in the segment's flat ids
        within = np.arange(total) - np.repeat(piece_start, count)
        destination = np.repeat(row_start[:-1] + before[j], count) + within
        ids[destination] = segment.ids
        labels[destination] = segment.labels
    return ids, labels, row_lengths, full


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
