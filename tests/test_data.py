# ruff: noqa: E501  (table-driven: one case per line reads best)
"""Data through `datasets`: every format gives the same rows, prepared data is cached and never
raced, conversations train on the assistant's tokens only, bad files are one line."""

from __future__ import annotations

import csv
import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY, env, run_cli
from tunelab import config, data, locks, preflight, runner
from tunelab import model as models
from tunelab.data import cache as data_cache
from tunelab.tasks import causal_lm

ROWS = [
    {"prompt": "12+34=", "completion": "046"},
    {"prompt": "NA", "completion": "0357"},  # what CSV readers turn into missing values or 357
    {"prompt": 'say "hi", then\ttab', "completion": "ü ∑ 😀"},
    {"prompt": "", "completion": "x"},
]
TEXTS = ["the first line", "NA", "0357", 'a "quoted", comma', "ü ∑ 😀"]


def _cfg(train: object, *extra: str):
    spec = "[" + ",".join(map(str, train)) + "]" if isinstance(train, list) else train
    return config.compose(
        ["data=text_files", f"data.train={spec}", "data.eval_fraction=0", *extra]
    ).data


def _write(path: Path, rows: list[dict], fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "txt":
        path.write_text("".join(r["text"] + "\n\n" for r in rows))  # blank lines are skipped
    return path


def _rows(rows: data.Rows) -> list[dict]:
    return [{k: v for k, v in r.items() if v is not None} for r in rows.train]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_format_loads_the_same_rows(tmp_path, fmt):
    path = _write(tmp_path / f"rows.{fmt}", ROWS, fmt)
    rows = data.load(_cfg(path), tmp_path / "cache")
    assert _rows(rows) == ROWS and rows.has_completions and len(rows.eval) == 0
    texts = [{"text": t} for t in TEXTS]
    path = _write(tmp_path / f"texts.{fmt}", texts, fmt)
    assert _rows(data.load(_cfg(path), tmp_path / "cache")) == texts


def test_text_files_several_files_a_glob_and_a_save_to_disk_directory_load_the_same_rows(tmp_path):
    import datasets

    texts = [{"text": t} for t in TEXTS]
    one = data.load(_cfg(_write(tmp_path / "all.txt", texts, "txt")), tmp_path / "cache")
    assert _rows(one) == texts
    shards = tmp_path / "shards"
    shards.mkdir()
    parts = [_write(shards / f"{i}.jsonl", texts[i * 2 : i * 2 + 2], "jsonl") for i in range(3)]
    listed = data.load(_cfg(parts), tmp_path / "cache")
    globbed = data.load(_cfg(f"'{shards}/*.jsonl'"), tmp_path / "cache")
    datasets.Dataset.from_list(texts).save_to_disk(tmp_path / "saved")
    saved = data.load(_cfg(tmp_path / "saved"), tmp_path / "cache")
    assert _rows(listed) == _rows(globbed) == _rows(saved) == texts
    assert listed.digest == globbed.digest != saved.digest  # same bytes, same digest
    assert one.split_sources["train"] == str(tmp_path / "all.txt")


def test_columns_are_renamed_to_canonical_names_and_the_rest_is_kept(tmp_path):
    rows = [
        {"body": "w1 w2", "tags": ["B", "I"], "text": "not this one", "words": ["w1", "w2"]},
        {"body": "w3", "tags": ["O"], "text": "nor this", "words": ["w3"]},
    ]
    path = _write(tmp_path / "rows.jsonl", rows, "jsonl")
    loaded = data.load(
        _cfg(path, "data.text_column=body", "data.label_column=tags"), tmp_path / "c"
    )
    assert loaded.columns == ("text", "label", "words")
    assert loaded.train["text"][:] == ["w1 w2", "w3"] and loaded.train["label"][:] == [
        ["B", "I"],
        ["O"],
    ]
    # Token classification rows: text as a list of words, labels as a list of tags.
    loaded = data.load(
        _cfg(path, "data.text_column=words", "data.label_column=tags"), tmp_path / "c"
    )
    assert loaded.train["text"][:] == [["w1", "w2"], ["w3"]] and loaded.train["label"][:] == [
        ["B", "I"],
        ["O"],
    ]
    with pytest.raises(data.DataError, match=r"^data.text_column: 'text' holds lists of words"):
        causal_lm.prepare(loaded, models.train_tokenizer(loaded.texts()), _cfg(path))


def test_a_column_of_numbers_and_strings_is_read_through_the_scanner(tmp_path):
    path = tmp_path / "mixed.jsonl"  # pyarrow cannot give this column one type
    path.write_text('{"text": "a", "x": 1}\n{"text": 5, "x": "b"}\n{"text": 2.5}\n')
    assert data.load(_cfg(path), tmp_path / "cache").train["text"][:] == ["a", "5", "2.5"]


def test_the_held_out_split_is_seeded_and_disjoint(tmp_path):
    path = _write(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(200)], "jsonl")
    cfg = config.compose(["data=text_files", f"data.train={path}", "data.eval_fraction=0.1"]).data
    a, b = data.load(cfg, tmp_path / "cache"), data.load(cfg, tmp_path / "cache")
    train, held_out = a.train["text"][:], a.eval["text"][:]
    assert len(held_out) == 20 and not set(train) & set(held_out) and len(train) == 180
    assert held_out == b.eval["text"][:] and a.digest == b.digest
    other = config.compose(["data=text_files", f"data.train={path}", "data.seed=7"]).data
    assert data.load(other, tmp_path / "cache").digest != a.digest


def test_the_default_addition_rows_are_unchanged():
    """Same rows, same split, same digest as before data went through `datasets` (so the same
    tokens and the same results for the default run)."""
    rows = data.addition(3, 20000, 500, 1234)
    assert rows.digest == "3d6268389154ad590f5fb919d5a46c2aa2ef7a9302f851167c613c43f785a372"
    assert (
        rows.split_digest("eval")
        == "d08f00514e7dd069c498c6f1655534bc2465ad2ff740c2180e539a800055f11e"
    )
    assert len(rows.train) == 20000 and len(rows.eval) == 500


# ---------------------------------------------------------------------------------------------
# Conversations


CONVERSATIONS = [
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
]


def test_conversations_train_on_the_assistant_turns_only(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS], "jsonl")
    cfg = _cfg(path, "data.max_length=256")
    rows = data.load(cfg, tmp_path / "cache")
    assert rows.has_messages and not rows.has_completions
    tok = models.train_tokenizer(rows.texts())  # the from-scratch tokenizer has a template
    prepared = causal_lm.prepare(rows, tok, cfg)
    eos = tok.eos_token
    for conversation, row in zip(CONVERSATIONS, prepared.train, strict=True):
        ids, labels = row["input_ids"], row["labels"]
        assert tok.decode(ids) == tok.apply_chat_template(conversation, tokenize=False)
        trained = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
        assistant = "".join(t["content"] + eos for t in conversation if t["role"] == "assistant")
        assert trained == assistant
        assert all(lab in (-100, i) for i, lab in zip(ids, labels, strict=True))
    # The template's own mask (its {% generation %} marks) agrees.
    mask = tok.apply_chat_template(
        CONVERSATIONS[1], return_dict=True, return_assistant_tokens_mask=True
    )["assistant_masks"]
    assert [lab != -100 for lab in prepared.train[1]["labels"]] == [bool(m) for m in mask]


def test_conversations_need_a_chat_template(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS], "jsonl")
    rows = data.load(_cfg(path), tmp_path / "cache")
    tok = models.train_tokenizer(rows.texts())
    tok.chat_template = None  # as many pretrained base models ship
    with pytest.raises(data.DataError) as caught:
        causal_lm.prepare(rows, tok, _cfg(path))
    (line,) = caught.value.problems
    assert line.startswith("data: the rows hold conversations ('messages'), but the tokenizer")


# ---------------------------------------------------------------------------------------------
# Bad files: one line naming the file and the line (one table: formats, encodings, shapes, and
# the hostile rows of the audits: nulls, lists, JSON nested 100,000 deep)


BAD = [
    ("null-line.jsonl", b'{"text": "a"}\nnull\n', "line 2: expected a JSON object, got NoneType"),  # crashes pyarrow 25
    ("null-first.jsonl", b'null\n{"text": "a"}\n', "line 1: expected a JSON object, got NoneType"),
    ("null-in-array.json", b'[{"text": "a"}, null]', "line 2: expected a JSON object, got NoneType"),
    ("strings.json", b'["a", "b"]', "line 1: expected a JSON object, got str"),
    ("no-assistant.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: 'messages' has no assistant turn"),
    ("bad-turn.jsonl", b'{"messages": [{"role": "assistant", "content": "a"}]}\n{"messages": [{"role": "user"}]}\n', "line 2: 'messages' turn 1: 'content' is missing, not text"),
    ("half-pair.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": null}\n', "line 2: 'completion' is null, not text"),
    ("ragged.csv", b"text,label\na,1\nb,2,3\n", "line 3:"),
    ("first-ragged.csv", b"text,label\na,1,3\n", "line 2: 3 fields, but the header has 2"),
    ("latin1.csv", b"text\ncaf\xe9\n", "line 2: not UTF-8 (byte 0xe9 at column 4)"),
    ("latin1.txt", b"ok\ncaf\xe9\n", "line 2: not UTF-8 (byte 0xe9 at column 4)"),
    ("data.xml", b"<rows/>", "unknown format '.xml'"),
    ("empty.jsonl", b"", "is empty (no rows)"),
    ("blank.txt", b"\n\n", "is empty (no rows)"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c",,}\n', "line 3: not valid JSON"),
    ("latin1.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', "line 2: not UTF-8 (byte 0xe9 at column 14)"),
    ("columns.jsonl", b'{"body": "a"}\n', "line 1: no 'text' column (nor 'prompt' + 'completion'); it has 'body'"),
    ("list.jsonl", b'{"text": "a"}\n[1, 2]\n', "line 2: expected a JSON object, got list"),
    ("array.json", b'[{"text": "a"},\n {"text": }]', "line 2: not valid JSON"),
    ("null.jsonl", b'{"text": "a"}\n{"text": null}\n', "line 2: 'text' is null, not text"),
    ("list-value.jsonl", b'{"prompt": "a", "completion": ["b"]}\n', "line 1: 'completion' is list, not text"),
    ("deep.jsonl", b'{"text": ' + b"[" * 100_000 + b"}\n", "line 1: JSON nested too deeply to read"),
    ("deep.json", b"[" * 100_000, "JSON nested too deeply to read"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "expected"), BAD, ids=[c[0] for c in BAD])
def test_bad_files_are_one_line_naming_the_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(data.DataError) as caught:
        data.load(_cfg(path), tmp_path / "cache")
    (line,) = caught.value.problems
    assert line.startswith(f"data.train: {path}") and expected in line, line


def test_bad_sources_are_named_before_anything_is_read(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "b.csv").write_text("text\nb\n")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])}).save_to_disk(
        tmp_path / "dd"
    )
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cases = [
        (f"'{tmp_path}/*.nothing'", f"data.train: '{tmp_path}/*.nothing' matches no file"),
        (
            f"[{tmp_path / 'a.jsonl'},{tmp_path / 'b.csv'}]",
            "mixes formats (.csv, .jsonl); give files of one format",
        ),
        (
            str(tmp_path / "dd"),
            f"data.train: {tmp_path / 'dd'} holds a DatasetDict (splits: train); give one split's directory, e.g. {tmp_path / 'dd' / 'train'}",
        ),
        (
            "someorg/somedata",
            "data.train: 'someorg/somedata' is not a file here and looks like a Hugging Face hub dataset id, but the hub is offline",
        ),
        (
            str(tmp_path / "null.parquet"),
            f"data.train: {tmp_path / 'null.parquet'} row 2: 'text' is null, not text",
        ),
    ]
    for spec, expected in cases:
        cfg = config.compose(["data=text_files", f"data.train={spec}"])
        with pytest.raises(data.DataError) as caught:
            data.load(cfg.data, tmp_path / "cache")
        (line,) = caught.value.problems
        assert expected in line, (spec, line)
        if "parquet" not in spec:  # the config check says the same, before any run starts
            found = preflight.job_problems(cfg)
            assert any(expected in p for p in found), found


# ---------------------------------------------------------------------------------------------
# The cache: reused by the next run, never prepared twice at once


def _tiny(root: Path, train: Path, *extra: str) -> list[str]:
    tiny = [o for o in TINY if not o.startswith("data.") or o.startswith("data.max_length")]
    return [*tiny, "training.max_steps=2", "checkpoint=none", "tracking=none",
            f"output.root={root / 'out'}", "data=text_files", f"data.train={train}",
            "model.tokenizer_vocab_size=300", *extra]  # fmt: skip


def _entries(root: Path) -> list[str]:
    cache = root / "out" / ".cache" / "datasets" / "tunelab"
    return sorted(str(p.relative_to(cache)) for p in cache.glob("*/*"))


def test_a_second_run_reuses_the_prepared_data(tmp_path, caplog):
    train = _write(tmp_path / "train.jsonl", ROWS * 10, "jsonl")
    first = _tiny(tmp_path, train)
    with caplog.at_level(logging.INFO, logger="tunelab"):
        runner.run(config.compose(first), tmp_path / "run1", first)
        assert "reusing the cached" not in caplog.text
        built = _entries(tmp_path)
        assert [e.split("/")[0] for e in built if not e.endswith(".lock")] == [
            "tokenized",
            "tokenizers",
        ]
        caplog.clear()
        second = _tiny(tmp_path, train, "training.lr=1e-4")  # a sweep's next job
        runner.run(config.compose(second), tmp_path / "run2", second)
    assert "reusing the cached tokenizers" in caplog.text
    assert "reusing the cached tokenized" in caplog.text
    assert _entries(tmp_path) == built  # nothing prepared again
    manifest = json.loads((tmp_path / "run2" / "model" / "manifest.json").read_text())
    assert manifest["data_digest"] == data.load(config.compose(first).data, tmp_path).digest


def test_threads_preparing_the_same_data_build_it_once(tmp_path, monkeypatch):
    train = _write(tmp_path / "train.jsonl", ROWS * 10, "jsonl")
    cfg = config.compose(_tiny(tmp_path, train))
    calls: list[str] = []
    tokenize = causal_lm.tokenize

    def slow(*args, **kwargs):  # a build long enough for the others to arrive meanwhile
        calls.append(kwargs.get("split") or args[4])
        threading.Event().wait(0.5)
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(causal_lm, "tokenize", slow)
    tok = models.train_tokenizer(["some text"])
    rows = data.load(cfg.data, tmp_path / "out" / ".cache" / "datasets")
    barrier, results, errors = threading.Barrier(4), [], []

    def prepare():
        try:
            barrier.wait()
            results.append(causal_lm.prepare(rows, tok, cfg.data))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert sorted(calls) == ["eval", "train"]  # one build; the other three waited and reused it
    assert all(r.train["input_ids"][:] == results[0].train["input_ids"][:] for r in results)
    assert (
        len(
            [
                e
                for e in _entries(tmp_path)
                if e.startswith("tokenized/") and not e.endswith(".lock")
            ]
        )
        == 1
    )


CHILD = """
import json, sys, time
from pathlib import Path
from tunelab import config, data
from tunelab import model as models
from tunelab.tasks import causal_lm
me, other, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
calls = []
tokenize = causal_lm.tokenize
def slow(*args, **kwargs):
    calls.append(1)
    time.sleep(0.5)
    return tokenize(*args, **kwargs)
causal_lm.tokenize = slow
cfg = config.compose(overrides)
rows = data.load(cfg.data, Path(cfg.output.root) / ".cache" / "datasets")
Path(me).touch()
while not Path(other).exists():  # start preparing together
    time.sleep(0.01)
tokenizer = models.load_tokenizer(cfg.model, rows)
prepared = causal_lm.prepare(rows, tokenizer, cfg.data)
print(json.dumps({"builds": len(calls), "tokens": prepared.train_tokens}))
"""


def test_processes_preparing_the_same_data_build_it_once(tmp_path):
    train = _write(tmp_path / "train.jsonl", ROWS * 10, "jsonl")
    overrides = _tiny(tmp_path, train)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(tmp_path / f"ready{i}"),
                str(tmp_path / f"ready{1 - i}"),
                *overrides,
            ],
            cwd=REPO,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["builds"] for r in results) == [0, 2]  # train + eval, by one process
    assert results[0]["tokens"] == results[1]["tokens"] > 0
    entries = [e for e in _entries(tmp_path) if not e.endswith(".lock")]
    assert [e.split("/")[0] for e in entries] == ["tokenized", "tokenizers"]
    assert not list(
        (tmp_path / "out" / ".cache" / "datasets" / "tunelab").glob("*/.*")
    )  # no leftovers


# ---------------------------------------------------------------------------------------------
# Pruning: the least recently used entries go, never one a process holds

DAY = 86400.0


def _prepare_into(cache: Path, path: Path) -> set[Path]:
    """`path` read and tokenized into `cache` as a run prepares it; returns the entries this
    added (the Arrow files `datasets` read it into, the tokenized splits), no longer held."""
    before = {e.path for e in data_cache.cached_entries(cache)}
    cfg = _cfg(path, "data.max_length=16")
    rows = data.load(cfg, cache)
    prepared = causal_lm.prepare(rows, models.train_tokenizer(["some text"]), cfg)
    assert rows.holding is not None and len(rows.holding.held) == 2
    del rows, prepared
    gc.collect()  # the rows are gone: their entries are no longer held
    return {e.path for e in data_cache.cached_entries(cache)} - before


def _age(paths: set[Path], days: float) -> None:
    then = time.time() - days * DAY
    for path in paths:
        os.utime(path, (then, then))


HOLDER = """
import sys
from tunelab import config, data
from tunelab import model as models
from tunelab.tasks import causal_lm
path, cache = sys.argv[1:]
cfg = config.compose(["data=text_files", f"data.train={path}", "data.eval_fraction=0",
                      "data.max_length=16"]).data
rows = data.load(cfg, cache)
prepared = causal_lm.prepare(rows, models.train_tokenizer(["some text"]), cfg)
print("holding", flush=True)
sys.stdin.read()  # until the test closes stdin
"""


def test_pruning_removes_least_recently_used_entries_never_one_in_use(tmp_path):
    cache = tmp_path / "cache"
    files = {
        name: _write(
            tmp_path / f"{name}.jsonl", [{"text": f"{name} {i}"} for i in range(40)], "jsonl"
        )
        for name in ("a", "b", "c")
    }
    owned = {name: _prepare_into(cache, path) for name, path in files.items()}
    for name in owned:
        assert sorted(p.relative_to(cache).parts[0] for p in owned[name]) == ["json", "tunelab"]
    size = {e.path: e.size for e in data_cache.cached_entries(cache)}
    for name, days in (("a", 40), ("b", 10), ("c", 1)):
        _age(owned[name], days)

    # By size: the least recently used go until the rest fit.
    fits = sum(size[p] for p in owned["b"] | owned["c"])
    removed = data_cache.prune(cache, data.Limits(max_bytes=fits))
    assert {e.path for e in removed} == owned["a"]
    assert not any(p.exists() for p in owned["a"])

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(files["b"]), str(cache)],
                              env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding", holder.communicate()
        _age(owned["b"], 10)  # the holder used them just now: old again, and still held
        assert all(data_cache.in_use(cache, p) for p in owned["b"])
        # By age: b is unused for 10 days, but another process holds it.
        assert data_cache.prune(cache, data.Limits(max_age_s=5 * DAY)) == []
        # Everything: what is not held goes.
        removed = data_cache.prune(cache, data.Limits(max_bytes=0))
        assert {e.path for e in removed} == owned["c"]
        assert all(p.is_dir() for p in owned["b"])
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=120) == 0
    assert not any(data_cache.in_use(cache, p) for p in owned["b"])  # the kernel let go
    removed = data_cache.prune(cache, data.Limits(max_age_s=5 * DAY))
    assert {e.path for e in removed} == owned["b"]
    # Their lock files went with them (tunelab's and datasets'): no file is left at all.
    assert data_cache.cached_entries(cache) == []
    assert [p for p in cache.rglob("*") if not p.is_dir()] == []
    assert len(_prepare_into(cache, files["a"])) == 2  # built again when needed


def test_a_run_that_adds_to_the_cache_prunes_it_to_its_limits(tmp_path, caplog):
    cache = tmp_path / "out" / ".cache" / "datasets"
    runs = {}
    for name in ("old", "new", "newest"):
        rows = [{"prompt": f"{name} {i}+", "completion": str(i)} for i in range(60)]
        runs[name] = _write(tmp_path / f"{name}.jsonl", rows, "jsonl")
    first = _tiny(tmp_path, runs["old"])
    runner.run(config.compose(first), tmp_path / "run1", first)
    old = {e.path for e in data_cache.cached_entries(cache)}
    assert sorted(e.kind for e in data_cache.cached_entries(cache)) == [
        "json",
        "tokenized",
        "tokenizers",
    ]
    _age(old, 40)  # unused for longer than the default 30 days

    with caplog.at_level(logging.INFO, logger="tunelab"):
        second = _tiny(tmp_path, runs["new"])
        runner.run(config.compose(second), tmp_path / "run2", second)
    assert not any(p.exists() for p in old)
    assert caplog.text.count("data: pruned the cached") == 3
    new = {e.path for e in data_cache.cached_entries(cache)}
    assert len(new) == 3

    # At most 0 GB: every entry not in use goes, the run's own ones stay while it runs.
    gc.collect()  # the second run's rows are gone: its entries are no longer held
    third = _tiny(tmp_path, runs["newest"], "data.cache_max_gb=0")
    assert config.run_name(third) == config.run_name(third[:-1])  # the limits name no run
    result = runner.run(config.compose(third), tmp_path / "run3", third)
    assert (result.artifact_dir / "manifest.json").is_file()
    kept = data_cache.cached_entries(cache)
    assert len(kept) == 3 and not {e.path for e in kept} & new


def test_tunelab_cache_lists_and_prunes(tmp_path):
    cache = tmp_path / "out" / ".cache" / "datasets"
    path = _write(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(40)], "jsonl")
    owned = _prepare_into(cache, path)
    root = ["--root", str(tmp_path / "out")]
    listed = run_cli("cache", *root, cwd=tmp_path, light=True).stdout.splitlines()
    assert (
        listed[0].startswith(f"{cache}: 2 entries, ")
        and "(at most 20 GB, 30 days unused)" in listed[0]
    )
    assert sorted(line.split()[4] for line in listed[1:]) == ["json", "tokenized"]
    pruned = run_cli("cache", "prune", "--max-gb", "0", *root, cwd=tmp_path, light=True).stdout
    assert pruned.count("pruned") == 2 and f"{cache}: 0 entries, 0 B" in pruned
    assert not any(p.exists() for p in owned)
    bad = run_cli("cache", "prune", "--max-gb", "-1", *root, cwd=tmp_path, check=False, light=True)
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().splitlines()[-1]
        == "tunelab cache: error: argument --max-gb: -1 must be a finite number, at least 0"
    )


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("data.cache_max_gb=-1", "data.cache_max_gb: -1 is below the minimum 0.0"),
        ("data.cache_max_age_days=x", "data.cache_max_age_days: expected float or null, got 'x'"),
        ("data.cache_max_gb=inf", "data.cache_max_gb: inf is not a finite number"),
    ],
)
def test_bad_cache_limits_are_config_errors(override, problem):
    assert config.problems(config.compose([override])) == [problem]


def test_a_lock_file_deleted_while_waited_for_is_not_shared(tmp_path):
    """Pruning deletes an entry's lock files while holding them: a process that waited on the
    deleted file must lock the path's new one, not hold a lock nobody else can see."""
    path = tmp_path / "entry.lock"
    first = locks.Lock(path, "x").acquire()
    got: list = []
    waiter = threading.Thread(
        target=lambda: got.append(locks.Lock(path, "x").acquire(wait=True, shared=True))
    )
    waiter.start()
    time.sleep(0.5)  # it waits on first's file
    path.unlink()
    second = locks.Lock(path, "x").acquire()  # the path's new file
    first.release()
    waiter.join(1)
    assert not got  # woke on the deleted file, moved to the new one, waits there
    second.release()
    waiter.join(10)
    assert got
    got[0].release()


def test_train_tokens_come_from_the_length_column(tmp_path):
    path = _write(tmp_path / "rows.jsonl", ROWS, "jsonl")
    rows = data.load(_cfg(path), tmp_path / "cache")
    tok = models.train_tokenizer(rows.texts())
    prepared = causal_lm.prepare(rows, tok, _cfg(path))
    ids = prepared.train["input_ids"][:]
    assert prepared.train_tokens == sum(map(len, ids)) == sum(prepared.train["length"][:])
    for row, ids_ in zip(ROWS, ids, strict=True):  # prompt, completion, end of text
        assert tok.decode(ids_) == row["prompt"] + row["completion"] + tok.eos_token


# ---------------------------------------------------------------------------------------------
# One long row: memory bounded by a small multiple of the row, not ~100 bytes per character

MEASURED = """
import resource, subprocess, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a regression fails, not the machine
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
print(proc.stderr[-3000:], file=sys.stderr)
"""


def _long_row_file(path: Path, kind: str, mb: int = 50) -> Path:
    """A JSON Lines file whose first row is about `mb` MB (text, a conversation, or words with
    their tags), then 40 short rows."""
    import itertools

    vocabulary = ["alpha", "beta", "gamma", "delta", "the", "quick", "fox", "lazy", "dog"]
    short = [list(itertools.islice(itertools.cycle(vocabulary), i, i + 30)) for i in range(40)]
    with open(path, "w") as f:
        if kind in ("text", "messages", "labelled"):
            n = mb * 1_000_000 // 5
            text = " ".join(itertools.islice(itertools.cycle(vocabulary), n))
            rows: list = [text, *(" ".join(w) for w in short)]
            if kind == "messages":  # the long text is an assistant's turn
                rows = [[{"role": "user", "content": "go"}, {"role": "assistant", "content": t}]
                        for t in rows]  # fmt: skip
            if kind == "labelled":  # a classifier's row
                f.writelines(json.dumps({"text": row, "label": "ab"[i % 2]}) + "\n"
                             for i, row in enumerate(rows))  # fmt: skip
            else:
                f.writelines(json.dumps({kind: row}) + "\n" for row in rows)
        else:
            n = mb * 1_000_000 // 13
            words = list(itertools.islice(itertools.cycle(vocabulary), n))
            f.write(json.dumps({"text": words, "label": ["O"] * n}) + "\n")
            f.writelines(json.dumps({"text": w, "label": ["B" if x == "fox" else "O" for x in w]})
                         + "\n" for w in short)  # fmt: skip
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "task"),
    [("text", "causal_lm"), ("messages", "causal_lm"), ("words", "token_classification"),
     ("labelled", "sequence_classification")],
)  # fmt: skip
def test_one_50_mb_row_trains_in_bounded_memory(tmp_path, kind, task):
    """A 50 MB text row peaked at ~18 GB (its tokens, offsets and alignments in the tokenizer,
    whole, while training the tokenizer and while encoding), a 20 MB assistant's turn at 9 GB,
    a 50 MB row of words at 5.2 GB."""
    path = _long_row_file(tmp_path / "long.jsonl", kind)
    assert path.stat().st_size > 45_000_000
    # Bytes only (no merges): a token per character, the most tokens a row can have.
    tiny = [o for o in _tiny(tmp_path, path) if not o.startswith("model.tokenizer_vocab_size")]
    run = [sys.executable, "-m", "tunelab", "train", *tiny, f"model.task={task}",
           "model.tokenizer_vocab_size=0", "data.max_length=16"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", MEASURED, *run], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    code, peak = map(int, proc.stdout.split())
    assert code == 0, proc.stderr
    assert peak < 3e9, f"peak RSS {peak / 1e9:.1f} GB"
    (log,) = (tmp_path / "out").glob("*/*/train.log")
    assert (log.parent / "model" / "manifest.json").is_file()  # a finished run
    if kind == "text":  # counted in pieces, exactly: a token per character, and the end token
        chars = len(json.loads(path.open().readline())["text"])
        assert f"(the longest: {chars + 1})" in log.read_text()
