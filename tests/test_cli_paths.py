"""Paths a user takes through the CLI that nothing else covers end to end: each file format and
a conversation trained through `tunelab train`, `checkpoint=epoch`, a classifier trained and
asked by run id, and `tunelab ui` started, answering and stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.helpers import TINY, TINY_MODEL, env, free_port, run_cli, runs_of, wait_for
from tunelab import checkpoints, manifests

MODEL = TINY_MODEL
SUMS = [(a, b) for a in range(20) for b in range(10)]


def write(path: Path, fmt: str) -> Path:
    """Prompt/completion sums as a file of `fmt` (jsonl, csv, parquet), plain text rows as txt,
    conversations as jsonl with `messages`."""
    if fmt == "csv":
        lines = ["prompt,completion", *(f"{a:02d}+{b:02d}=,{a + b:03d}" for a, b in SUMS)]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = {"prompt": [f"{a:02d}+{b:02d}=" for a, b in SUMS],
                 "completion": [f"{a + b:03d}" for a, b in SUMS]}  # fmt: skip
        pq.write_table(pa.table(table), path)
    elif fmt == "txt":
        path.write_text("".join(f"{a:02d}+{b:02d}={a + b:03d}\n" for a, b in SUMS))
    elif fmt == "messages":
        rows = [
            {"messages": [{"role": "user", "content": f"{a}+{b}"},
                          {"role": "assistant", "content": str(a + b)}]}
            for a, b in SUMS
        ]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("fmt", "suffix", "metric"),
    [("csv", "csv", "eval_exact_match"), ("parquet", "parquet", "eval_exact_match"),
     ("txt", "txt", "eval_token_accuracy"), ("messages", "jsonl", "eval_token_accuracy")],
)  # fmt: skip
def test_each_file_format_trains_through_the_cli(workspace, fmt, suffix, metric):
    path = write(workspace.root / f"train.{suffix}", fmt)
    run_cli("train", *workspace.base(), *MODEL, "data=text_files", f"data.train={path}",
            "checkpoint=none", cwd=workspace.root)  # fmt: skip
    _, (run,) = runs_of(workspace)
    assert run.info.status == "FINISHED" and metric in run.data.metrics
    (run_dir,) = workspace.run_dirs()
    manifest = manifests.read_manifest(run_dir / "model")
    assert manifest["step"] == 8 and str(path) in manifest["data_source"]


def test_checkpoint_epoch_writes_one_a_epoch_and_keeps_the_newest(workspace):
    # 256 rows of 16: 16 steps an epoch; 3 epochs; keep 2.
    run_cli("train", *workspace.base(), *TINY, "training.max_steps=-1", "training.epochs=3",
            "checkpoint=epoch", "checkpoint.keep=2", cwd=workspace.root)  # fmt: skip
    (run_dir,) = workspace.run_dirs()
    kept = checkpoints.committed(run_dir / "checkpoints")
    assert sorted(checkpoints.step_of(p) for p in kept) == [32, 48]
    assert manifests.read_manifest(run_dir / "model")["step"] == 48


def test_a_classifier_trains_through_the_cli_and_answers_by_run_id(workspace):
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {i}", "label": ["neg", "pos"][i % 2]}
            for i in range(64)]  # fmt: skip
    path = workspace.root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_cli("train", *workspace.base(), *MODEL, "model.task=sequence_classification",
            "data=text_files", f"data.train={path}", "checkpoint=none", "training.lr=0.01",
            cwd=workspace.root)  # fmt: skip
    _, (run,) = runs_of(workspace)
    assert "eval_accuracy" in run.data.metrics and "eval_f1" in run.data.metrics
    out = run_cli("predict", run.info.run_id, "good film", "bad film", "--uri", workspace.uri,
                  cwd=workspace.root).stdout.strip().splitlines()  # fmt: skip
    assert [line.split("\t")[0] for line in out] == ["good film", "bad film"]
    assert all(line.split("\t")[1].split()[0] in ("neg", "pos") for line in out), out
    # `tunelab runs` shows a classifier's own metrics, its objective among them.
    listed = run_cli("runs", "--uri", workspace.uri, cwd=workspace.root).stdout.splitlines()
    header = listed[0]
    assert "  eval_accuracy  eval_f1  eval_loss  " in header, header
    assert "eval_exact_match" not in header
    f1 = listed[1][header.index("eval_f1") :].split()[0]
    assert float(f1) == pytest.approx(run.data.metrics["eval_f1"], abs=1e-4), listed
    # Its report: per class, the mistakes, the pictures; the accuracy they imply is the one
    # Trainer's metrics reported.
    import csv

    from mlflow.artifacts import download_artifacts

    report = Path(download_artifacts(run_id=run.info.run_id, artifact_path="report",
                                     dst_path=str(workspace.root / "report"),
                                     tracking_uri=workspace.uri))  # fmt: skip
    assert {"confusion_matrix.png", "per_class.png", "loss.png"} <= {p.name for p in
                                                                      report.iterdir()}  # fmt: skip
    classes = list(csv.DictReader((report / "per_class.csv").open()))
    assert [c["label"] for c in classes] == ["neg", "pos"]
    total = sum(int(c["support"]) for c in classes)
    assert total == int(run.data.params["data.eval_examples"])
    wrong = list(csv.DictReader((report / "misclassified.csv").open()))
    assert all(w["true"] != w["predicted"] and "film" in w["text"] for w in wrong), wrong
    accuracy = (total - len(wrong)) / total
    assert accuracy == pytest.approx(run.data.metrics["eval_accuracy"], abs=1e-6)
    # Registered, it answers by its alias as by its run id.
    run_cli("register", run.info.run_id, "films", "--uri", workspace.uri, cwd=workspace.root)
    by_alias = run_cli("predict", "models:/films@champion", "good film", "bad film", "--uri",
                       workspace.uri, cwd=workspace.root).stdout.strip().splitlines()  # fmt: skip
    assert by_alias == out


@pytest.mark.slow  # a real MLflow server process
def test_tunelab_ui_starts_answers_and_stops(workspace):
    run_cli("train", *workspace.base(), *TINY, "checkpoint=none", cwd=workspace.root)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "ui", "--port", str(port), "--uri", workspace.uri],
        cwd=workspace.root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return urllib.request.urlopen(f"{base}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(answers, proc, timeout=120)
        search = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search", method="POST",
            data=json.dumps({"experiment_ids": ["1"]}).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        found = json.loads(urllib.request.urlopen(search, timeout=10).read())
        assert len(found["runs"]) == 1  # the store `tunelab train` wrote
        # A viewer for one person: tunelab, MLflow's launcher and one uvicorn worker.
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) <= 3, [" ".join(p.cmdline())[:120] for p in tree]
    finally:
        began = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in its terminal: its whole process group
        out = proc.communicate(timeout=60)[0]
        stopped_in = time.monotonic() - began
    assert proc.returncode == 0 and not answers(), out[-2000:]
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert stopped_in < 3, stopped_in  # about 1.5 s on an idle machine
    assert f"tunelab: MLflow UI for {workspace.uri} at {base}" in out
    assert out.rstrip().endswith("tunelab: MLflow UI stopped"), out[-2000:]
    quiet = ("Traceback", "Warning", "INFO", "GET /")
    assert not [line for line in out.splitlines() if any(q in line for q in quiet)], out
