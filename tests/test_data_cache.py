"""The data cache serves the files' current rows: keyed by their content (never by size and
mtime), and every entry checked before it is reused: a damaged one is removed with one warning
and built again, giving the rows a fresh build gives."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from tunelab import config, data, runner
from tunelab import model as models
from tunelab.data import cache as data_cache
from tunelab.tasks import causal_lm, token_classification

TEXTS = [f"row {i}: the {'quick' if i % 2 else 'lazy'} fox" for i in range(30)]


def _cfg(path: Path, *extra: str):
    return config.compose(
        ["data=text_files", f"data.train={path}", "data.eval_fraction=0.2",
         "data.max_length=16", "model.tokenizer_vocab_size=300", *extra]
    )  # fmt: skip


def _rewrite_keeping_size_and_mtime(path: Path, text: str) -> None:
    """As `cp -p` or `rsync -t` replace a file: new bytes, the old size and mtime."""
    before = path.stat()
    assert len(text.encode()) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert path.stat().st_mtime_ns == before.st_mtime_ns


# ---------------------------------------------------------------------------------------------
# Keyed by content


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_file_replaced_with_the_same_size_and_mtime_is_read_again(tmp_path, fmt):
    path = tmp_path / f"rows.{fmt}"
    texts = ["alpha", "omega", "gamma"]

    def text(labels: list[str]) -> str:
        pairs = zip(texts, labels, strict=True)
        if fmt == "csv":
            return "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in pairs)
        return "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in pairs)

    path.write_text(text(["pos", "neg", "pos"]))
    cfg = _cfg(path, "data.eval_fraction=0").data
    cache = tmp_path / "cache"
    first = data.load(cfg, cache)
    assert first.train["label"][:] == ["pos", "neg", "pos"]
    _rewrite_keeping_size_and_mtime(path, text(["neg", "pos", "neg"]))  # labels swapped
    again = data.load(cfg, cache)
    assert again.train["label"][:] == ["neg", "pos", "neg"]  # the file's rows, not the cache's
    assert again.digest != first.digest
    assert again.digest == data.load(cfg, tmp_path / "fresh").digest  # the digest is of them


def test_prepared_tokens_follow_a_file_replaced_with_the_same_size_and_mtime(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = _cfg(path, "data.eval_fraction=0", "data.max_length=64")
    cache = tmp_path / "cache"
    tok = models.train_tokenizer(["the quick lazy fox row 0123456789:"])
    causal_lm.prepare(data.load(cfg.data, cache), tok, cfg.data)
    swapped = [t.replace("quick", "QUICK") for t in TEXTS]
    _rewrite_keeping_size_and_mtime(path, "".join(json.dumps({"text": t}) + "\n" for t in swapped))
    prepared = causal_lm.prepare(data.load(cfg.data, cache), tok, cfg.data)
    assert [tok.decode(ids[:-1]) for ids in prepared.train["input_ids"][:]] == swapped


# ---------------------------------------------------------------------------------------------
# Damaged entries: found, removed with one warning, built again


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip(path: Path) -> None:
    """Bytes flipped in the middle of the file: same size, other content."""
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 8] = bytes(b ^ 0xFF for b in raw[middle : middle + 8])
    path.write_bytes(bytes(raw))


def _break_json(path: Path) -> None:
    path.write_text(path.read_text()[:-7])


DAMAGE = {"truncated": _truncate, "flipped": _flip, "broken JSON": _break_json}


def _prepare(cfg, cache: Path) -> dict:
    """What a run trains on, prepared from `cache`: the rows, the from-scratch tokenizer, the
    tokenized splits."""
    rows = data.load(cfg.data, cache)
    tok = models.load_tokenizer(cfg.model, rows)
    prepared = causal_lm.prepare(rows, tok, cfg.data)
    return {
        "rows": [*rows.train, *rows.eval],
        "tokenizer": tok.backend_tokenizer.to_str(),
        "train": prepared.train["input_ids"][:],
        "eval": prepared.eval["input_ids"][:],
    }


def _one_file(cache: Path, pattern: str) -> Path:
    found = [p for p in cache.glob(pattern) if not p.parent.name.startswith(".")]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    ("where", "damage"),
    [
        ("tunelab/tokenized/*/train.arrow", "truncated"),
        ("tunelab/tokenized/*/train.arrow", "flipped"),
        ("tunelab/tokenized/*/meta.json", "broken JSON"),
        ("tunelab/tokenized/*/meta.json", "flipped"),
        ("tunelab/tokenizers/*/tokenizer.json", "broken JSON"),
        ("tunelab/tokenizers/*/tokenizer.json", "flipped"),
        ("tunelab/tokenizers/*/meta.json", "broken JSON"),
        ("json/*/*/*/json-train.arrow", "truncated"),
        ("json/*/*/*/json-train.arrow", "flipped"),
        ("json/*/*/*/dataset_info.json", "broken JSON"),
        ("json/*/*/*/dataset_info.json", "flipped"),
    ],
)
def test_a_damaged_entry_is_rebuilt_with_one_warning(tmp_path, caplog, where, damage):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = _cfg(path)
    fresh = _prepare(cfg, tmp_path / "fresh")
    cache = tmp_path / "cache"
    _prepare(cfg, cache)
    victim = _one_file(cache, where)
    DAMAGE[damage](victim)
    with caplog.at_level(logging.INFO, logger="tunelab"):
        again = _prepare(cfg, cache)
    assert again == fresh
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    entry = victim.parent
    assert len(warnings) == 1 and f"{entry} " in warnings[0] and "damaged" in warnings[0], warnings
    assert victim.name in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunelab"):
        assert _prepare(cfg, cache) == fresh  # and the rebuilt entry is reused quietly
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [p for p in cache.rglob(".*") if p.is_dir()]  # nothing set aside is left


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_map_cache_beside_the_rows_is_made_again(tmp_path, caplog, damage):
    """A classifier's tokenized columns, which `datasets` caches beside the rows' Arrow files."""
    path = tmp_path / "tags.jsonl"
    words = [{"text": t.split(), "label": ["B" if w == "fox" else "O" for w in t.split()]}
             for t in TEXTS]  # fmt: skip
    path.write_text("".join(json.dumps(w) + "\n" for w in words))
    cfg = _cfg(path, "data.eval_fraction=0").data
    cache = tmp_path / "cache"
    tok = models.train_tokenizer(["row 0123456789: the quick lazy fox"])

    def labels() -> list:
        return token_classification.prepare(data.load(cfg, cache), tok, cfg).train["labels"][:]

    fresh = labels()
    assert labels() == fresh  # reused, and recorded
    victim = _one_file(cache, "json/*/*/*/cache-*.arrow")
    DAMAGE[damage](victim)
    with caplog.at_level(logging.INFO, logger="tunelab"):
        assert labels() == fresh
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(victim) in warnings[0] and "damaged" in warnings[0]


def test_a_run_trains_after_its_tokenized_rows_were_damaged(tmp_path, caplog):
    """Flipped token ids trained into an IndexError; a truncated file failed every rerun."""
    from tests.helpers import TINY

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    tiny = [o for o in TINY if not o.startswith("data.")]
    overrides = [*tiny, "training.max_steps=2", "checkpoint=none", "tracking=none",
                 f"output.root={tmp_path / 'out'}", "data=text_files", f"data.train={path}",
                 "data.max_length=16"]  # fmt: skip
    runner.run(config.compose(overrides), tmp_path / "run1", overrides)
    cache = tmp_path / "out" / ".cache" / "datasets"
    victim = _one_file(cache, "tunelab/tokenized/*/train.arrow")
    _flip(victim)
    with caplog.at_level(logging.INFO, logger="tunelab"):
        result = runner.run(config.compose(overrides), tmp_path / "run2", overrides)
    assert (result.artifact_dir / "manifest.json").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [w for w in warnings if "damaged" in w] == [
        w for w in warnings if str(victim.parent) in w
    ]
    assert len([w for w in warnings if "damaged" in w]) == 1


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_rows_read_through_the_scanner_are_read_again(tmp_path, caplog, damage):
    """Rows `datasets` cannot give one Arrow type are written by tunelab's scanner into an entry
    of `datasets`' generator builder: checked the same way."""
    path = tmp_path / "mixed.jsonl"  # pyarrow cannot give the column x one type
    path.write_text("".join(f'{{"text": "{t}", "x": {i if i % 2 else json.dumps(t)}}}\n'
                            for i, t in enumerate(TEXTS)))  # fmt: skip
    cfg = _cfg(path, "data.eval_fraction=0").data
    cache = tmp_path / "cache"
    fresh = data.load(cfg, cache).train[:]
    victim = _one_file(cache, "generator/*/*/generator-train.arrow")
    assert victim.parent in {e.path for e in data_cache.cached_entries(cache)}  # pruned too
    DAMAGE[damage](victim)
    with caplog.at_level(logging.INFO, logger="tunelab"):
        assert data.load(cfg, cache).train[:] == fresh
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"{victim.parent} are damaged" in warnings[0], warnings
