# ruff: noqa: E501  (table-driven: one case per line reads best)
"""The faults of issue 12's audit, each kept as a test: hostile numbers, names and files, two
processes on one run directory, signals at awkward moments, a bad job inside a sweep."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient

from tests.helpers import TINY, env, files_cfg, tunelab, wait_for
from tunelab import artifacts, checkpoints, cli, config, data, locks, manifests, preflight
from tunelab.data.cache import cached_entries
from tunelab.tasks import causal_lm

# ---------------------------------------------------------------------------------------------
# Numbers, names and paths: one line each, before anything starts.

CONFIG_CASES = [
    (["training.lr=nan"], "training.lr: nan is not a finite number"),
    (["training.lr=inf"], "training.lr: inf is not a finite number"),
    (["data=text_files", "data.train={file}", "data.eval_fraction=nan"], "data.eval_fraction: nan is not a finite number"),
    (["training.max_steps=99999999999999999999"], "training.max_steps: 99999999999999999999 is above the maximum 1000000000"),
    (["training.lr=1e6"], "training.lr: 1000000.0 is above the maximum 10.0"),
    (["seed=-1"], "seed: -1 is below the minimum 0"),
    (["model.arch.n_head=3"], "model.arch.n_head: 3 does not divide model.arch.n_embd=128"),
    (["model.arch.n_layer=0"], "model.arch.n_layer: 0 must be positive"),
    (["tracking.experiment=../../escaped"], "tracking.experiment: '../../escaped' is not a usable name"),
    (["tracking.experiment=''"], "tracking.experiment: '' is not a usable name"),
    (["tracking.uri=garbage://x"], "tracking.uri: 'garbage://x': unknown scheme 'garbage'"),
    (["resume={dir}"], "is not a tunelab checkpoint (no manifest.json)"),
    (["data=text_files", "data.train={dir}"], "is a directory, but not one written by Dataset.save_to_disk; give a .jsonl, .json, .csv, .parquet or .txt file"),
    (["data=text_files", "data.train={fifo}"], "is not a regular file (a FIFO, socket or device)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "expected"), CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES]
)
def test_values_no_run_can_mean_are_one_line_exit_2_and_nothing_created(
    tmp_path, capsys, overrides, expected
):
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "adir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    args = [
        o.format(file=tmp_path / "rows.jsonl", dir=tmp_path / "adir", fifo=tmp_path / "fifo")
        for o in overrides
    ]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        cli.main(
            ["train", f"output.root={out}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", *args]
        )
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("tunelab: config error: ") and expected in lines[0]
    ), lines
    assert not out.exists() and not (tmp_path / "m.db").exists()


def test_a_sqlite_store_on_a_read_only_filesystem_is_refused_at_once(small_disk, tmp_path):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        began = time.monotonic()
        cfg = config.compose(
            [f"tracking.uri=sqlite:///{small_disk / 'mlflow.db'}", f"output.root={tmp_path}"]
        )
        assert preflight.job_problems(cfg) == [
            f"tracking.uri: {small_disk} is on a read-only filesystem"
        ]
        assert time.monotonic() - began < 10  # not MLflow's minutes of retries
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["text", "prompt", "completion", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)
FILE_CONTENTS = st.one_of(
    st.binary(max_size=200),
    st.lists(JSON_VALUES, max_size=4).map(
        lambda rows: "\n".join(json.dumps(r) for r in rows).encode()
    ),
    st.lists(JSON_VALUES, max_size=4).map(lambda rows: json.dumps(rows).encode()),
    st.tuples(st.text(max_size=40), st.sampled_from(["utf-8", "utf-16", "latin-1", "cp1252"])).map(
        lambda t: t[0].encode(t[1], errors="replace")
    ),
)


@pytest.mark.slow  # a property test: 15 s of random files
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(FILE_CONTENTS, st.sampled_from([".jsonl", ".json", ".txt"]))
def test_any_file_content_is_rows_or_one_data_error(tmp_path_factory, content, suffix):
    """Random bytes, JSON shapes and encodings: rows that tokenize, or one DataError line."""
    from tunelab import model as models

    path = tmp_path_factory.mktemp("data") / f"train{suffix}"
    path.write_bytes(content)
    cfg = files_cfg(path)
    try:
        rows = data.load(cfg, path.parent / "cache")
    except data.DataError as exc:
        (line,) = exc.problems
        assert line.startswith("data.train: ") and "\n" not in line
        return
    assert len(rows.train)
    tagged = False  # rows whose text is a list of words, as token classification has them
    for split in (rows.train, rows.eval):  # the columns a row trains on hold strings
        for row in split:
            pair = row.get("prompt") is not None and row.get("completion") is not None
            for column in ("prompt", "completion") if pair else ("text",):
                value = row[column]
                words = isinstance(value, list) and all(isinstance(w, str) for w in value)
                tagged |= column == "text" and words
                assert isinstance(value, str) or (column == "text" and words), row
    tokenizer = models.train_tokenizer(rows.texts())
    if tagged:  # causal_lm refuses them in one line
        with pytest.raises(data.DataError, match=r"^data.text_column: 'text' holds lists"):
            causal_lm.prepare(rows, tokenizer, cfg)
        return
    prepared = causal_lm.prepare(rows, tokenizer, cfg)
    assert len(prepared.train) == len(rows.train)


def test_a_bad_data_file_leaves_no_run_directory_and_no_mlflow_run(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "12+34=46"}\n{"text": null}\n')
    tiny = [o for o in TINY if not o.startswith("data.") or o.startswith("data.max_length")]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", f"output.root={out}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
         *tiny, "data=text_files", f"data.train={path}"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"tunelab: config error: data.train: {path} line 2: 'text' is null, not text; every row needs a string there"
    )
    assert "Traceback" not in proc.stderr
    assert not list((out / "tunelab").glob("*"))  # no run directory
    read = cached_entries(out / ".cache" / "datasets")
    assert [e.kind for e in read] == ["json"]  # the file was read, nothing prepared from it
    assert not (tmp_path / "m.db").exists()


# ---------------------------------------------------------------------------------------------
# The store tools: one line, never a traceback.


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["runs", "--limit", "-5"], "argument --limit: -5 must be at least 1"),
        (["generate", "x", "12+34=", "--max-new-tokens", "-1"], "argument --max-new-tokens: -1 must be at least 1"),
        (["ui", "--port", "70000"], "argument --port: 70000 is not a port (1-65535)"),
        (["ui", "--port", "0"], "argument --port: 0 must be at least 1"),
    ],
)  # fmt: skip
def test_tool_arguments_out_of_range_are_refused(capsys, args, expected):
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    assert exited.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["file", "symlink", "dangling-symlink"])
def test_export_onto_something_that_is_not_an_empty_directory_is_refused(tmp_path, capsys, kind):
    target = tmp_path / "dst"
    if kind == "file":
        target.write_text("mine")
    elif kind == "symlink":
        (tmp_path / "real").mkdir()
        target.symlink_to(tmp_path / "real")
    else:
        target.symlink_to(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exited:
        cli.main(["export", "0" * 32, str(target), "--uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert exited.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"tunelab export: {target} exists and is not a directory; choose a new directory"
    assert target.is_symlink() or target.read_text() == "mine"


def test_a_model_uri_the_store_does_not_have_is_one_line(tiny_tracked, tmp_path, capsys):
    from tunelab import tracking

    ws, _, _ = tiny_tracked
    missing = "runs:/" + "0" * 32 + "/model"
    with pytest.raises(config.ConfigError) as caught:
        tracking.resolve_model(missing, ws.uri, tmp_path)
    (line,) = caught.value.problems
    assert line.startswith(f"model.name_or_path: {missing}: not found in the store {ws.uri}")
    with pytest.raises(SystemExit) as exited:
        cli.main(["export", missing, str(tmp_path / "x"), "--uri", ws.uri])
    assert exited.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "not found in the store" in line and not (tmp_path / "x").exists()


def test_export_refuses_files_the_manifest_does_not_list(tiny_tracked, tmp_path, capsys):
    """A crafted store copy (an unlisted pickle and a .py beside the listed files) is not
    exported as "verified"."""
    ws, _, run_id = tiny_tracked
    client = MlflowClient(tracking_uri=ws.uri)
    (model,) = [
        m for m in client.search_logged_models(experiment_ids=["1"]) if m.source_run_id == run_id
    ]
    location = Path(model.artifact_location.removeprefix("file://"))
    (location / "pytorch_model.bin").write_bytes(b"not really a pickle")
    (location / "evil.py").write_text("import os\n")
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main(["export", run_id, str(tmp_path / "exported"), "--uri", ws.uri])
        assert exited.value.code == 1
        err = capsys.readouterr().err
        assert "does not match its manifest" in err and "not listed in the manifest" in err
        assert not (tmp_path / "exported").exists()
    finally:
        (location / "pytorch_model.bin").unlink()
        (location / "evil.py").unlink()
    # Without them it exports, MLflow's own files (MLmodel, components/) left out.
    cli.main(["export", run_id, str(tmp_path / "clean"), "--uri", ws.uri])
    exported = {p.name for p in (tmp_path / "clean").iterdir()}
    assert "MLmodel" not in exported and "components" not in exported
    assert manifests.verify_manifest(tmp_path / "clean") == []


def test_a_manifest_naming_files_outside_its_directory_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.safetensors").write_bytes(b"x")
    manifests.write_manifest(tmp_path / "a", {})
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for name in ("../secret", "/etc/passwd", "sub/../../x"):
        manifest["files"] = {name: {"sha256": "0" * 64, "size": 1}}
        (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
        (problem,) = manifests.verify_manifest(tmp_path / "a")
        assert "outside the directory" in problem, name


def test_short_runs_log_system_metrics(tiny_tracked):
    ws, _, run_id = tiny_tracked
    run = MlflowClient(tracking_uri=ws.uri).get_run(run_id)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics


# ---------------------------------------------------------------------------------------------
# Locks: one process per run directory; parallel jobs share the model cache.


def test_a_lock_is_refused_while_held_and_freed_by_kill_9(tmp_path):
    lock = locks.Lock(tmp_path / "run" / locks.RUN_LOCK, "run directory X")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tunelab import locks; "
         "locks.Lock(sys.argv[1], 'x').acquire(); print('held', flush=True); time.sleep(60)", str(lock.path)],
        env=env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            locks.Busy,
            match=rf"run directory X is in use by another tunelab process \(pid {holder.pid}\)",
        ):
            lock.acquire()
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    lock.acquire()
    lock.release()


def test_commit_seals_only_a_complete_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    for name in (
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "scheduler.json",
        "rng_state.pth",
    ):
        (ckpt / name).write_text("{}")
    with pytest.raises(
        checkpoints.IncompleteCheckpoint, match="missing trainer_state.json, training_args.json"
    ):
        checkpoints.commit(ckpt, 4, 1.0, {})
    assert not (ckpt / "manifest.json").exists() and checkpoints.committed(tmp_path) == []


def test_parallel_jobs_fetch_a_model_uri_once_without_racing(tiny_tracked, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from tunelab import tracking

    ws, run_dir, run_id = tiny_tracked
    source, cache = f"runs:/{run_id}/model", tmp_path / ".cache" / "models"
    with ThreadPoolExecutor(3) as pool:
        found = list(pool.map(lambda _: tracking.resolve_model(source, ws.uri, cache), range(3)))
    assert len(set(found)) == 1
    assert manifests.verify_manifest(Path(found[0])) == []
    assert [
        p.name for p in (tmp_path / ".cache" / "models").iterdir() if not p.name.startswith(".")
    ] == [Path(found[0]).name]


LONG = [o for o in TINY if not o.startswith("training.max_steps")] + ["training.max_steps=400"]
CKPT = ["checkpoint=steps", "checkpoint.every=4", "checkpoint.keep=2"]
LONGER = ["training.max_steps=400", *CKPT]  # Workspace.popen puts them over TINY


@pytest.mark.slow
def test_a_second_process_on_the_same_run_directory_is_refused_at_once(workspace):
    workspace.ready_store()
    # Each commit held 1 s: the first still runs 9 s after its first checkpoint, time enough
    # for the second to start, however loaded the machine.
    first = workspace.popen(*LONGER, "training.max_steps=40", TUNELAB_TEST_COMMIT_DELAY="1")
    try:
        wait_for(lambda: workspace.committed(), first)
        began = time.monotonic()
        second = workspace.popen(*LONGER, "training.max_steps=40")
        out = second.communicate(timeout=120)[0]
        assert second.returncode == 1, out
        assert time.monotonic() - began < 60  # refused at once, not after training
        line = f"tunelab: run directory {workspace.run_dirs()[0]} is in use by another tunelab process (pid {first.pid})"
        assert line in out and "Traceback" not in out
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    (run,) = workspace.runs()
    assert run.info.status == "FINISHED"
    assert manifests.verify_manifest(workspace.run_dirs()[0] / "model") == []


# ---------------------------------------------------------------------------------------------
# Signals at awkward moments.


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "kill-9"])
def test_a_signal_while_the_run_is_created_leaves_no_orphan_and_nothing_running(workspace, how):
    workspace.ready_store()
    hold = {"TUNELAB_TEST_START_DELAY": "4"}  # seconds between the run and its record
    proc = workspace.popen(*LONGER, "training.max_steps=8", **hold)
    wait_for(lambda: workspace.runs(), proc)  # the MLflow run exists, its record not yet
    assert "mlflow_run_id" not in artifacts.read_run_record(workspace.run_dirs()[0])
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 128 + signal.SIGTERM, out
        (run,) = workspace.runs()
        assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["tunelab.error"]
    else:
        proc.kill()
        proc.wait()
    rerun = workspace.popen(*LONGER, "training.max_steps=8")
    assert rerun.wait(timeout=300) == 0, rerun.stdout.read()[-3000:]
    (run,) = workspace.runs()  # the same run, continued: no orphan beside a new one
    assert run.info.status == "FINISHED" and run.data.tags["tunelab.resumes"] == "1"


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["staged", "written", "synchronous"])
def test_a_second_sigterm_still_lets_the_checkpoint_in_flight_commit(workspace, phase):
    workspace.ready_store()
    # Held 2 s while its state is copied at the step boundary, while written in the background,
    # or (synchronous writes) before its manifest: a second SIGTERM then must not cut it.
    hold = "STAGE" if phase == "staged" else "COMMIT"
    extra = ["checkpoint.async_write=false"] if phase == "synchronous" else []
    proc = workspace.popen(*LONGER, *extra, **{f"TUNELAB_TEST_{hold}_DELAY": "2"})
    wait_for(lambda: workspace.committed(), proc)
    before = workspace.committed()
    proc.send_signal(signal.SIGTERM)
    root = workspace.run_dirs()[0] / "checkpoints"

    def in_flight() -> bool:  # checkpoint-N or .checkpoint-N.partial, N newer, not committed
        names = [re.fullmatch(r"\.?checkpoint-(\d+)(\.partial)?", p.name) for p in root.iterdir()]
        steps = [int(m[1]) for m in names if m]
        return any(step > max(before) and step not in workspace.committed() for step in steps)

    wait_for(in_flight, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    after = workspace.committed()
    assert max(after) > max(before), (before, after, out)
    assert not [p for p in root.iterdir() if p.name.endswith(".partial")]
    assert manifests.verify_manifest(root / f"checkpoint-{max(after)}") == []
    (run,) = workspace.runs()
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_a_second_sigterm_while_the_run_ends_still_marks_it_killed(workspace):
    workspace.ready_store()
    proc = workspace.popen(*LONGER, TUNELAB_TEST_FINISH_DELAY="3")  # before the status
    wait_for(lambda: workspace.committed(), proc)
    before = workspace.committed()
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: max(workspace.committed()) > max(before), proc)  # the stop checkpoint
    time.sleep(1)  # into the 3 s hold before the KILLED status is written
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out
    (run,) = workspace.runs()
    assert run.info.status == "KILLED", out  # not left RUNNING


@pytest.mark.slow
def test_a_third_signal_stops_without_waiting_and_the_rerun_resumes(workspace):
    workspace.ready_store()
    proc = workspace.popen(*LONGER, TUNELAB_TEST_COMMIT_DELAY="30")
    root = lambda: workspace.run_dirs()[0] / "checkpoints"  # noqa: E731
    wait_for(
        lambda: (
            workspace.run_dirs()
            and root().is_dir()
            and any(p.name.endswith(".partial") for p in root().iterdir())
        ),
        proc,
    )
    began = time.monotonic()
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
    out = proc.communicate(timeout=60)[0]
    assert time.monotonic() - began < 25, out  # did not wait out the 30 s write
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "stopping without waiting for the checkpoint in flight" in out
    assert workspace.committed() == []
    assert workspace.popen(*LONGER, "training.max_steps=8").wait(timeout=300) == 0
    assert not [p for p in root().iterdir() if p.name.endswith(".partial")]


# ---------------------------------------------------------------------------------------------
# Rolling back to an earlier checkpoint, and a bad job inside a sweep.


def test_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, caplog):
    from transformers import TrainerCallback

    from tunelab import runner

    # keep=1 with mode=max on eval_loss: checkpoint-4 (the worst loss) is kept as "best".
    # Synchronous writes, so each commit and its rotation are done when on_save is called.
    overrides = [*TINY, "training.max_steps=16", *CKPT, "checkpoint.keep=1", "checkpoint.mode=max",
                 "checkpoint.async_write=false", "tracking=none"]  # fmt: skip
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    runner.run(config.compose([*overrides, f"output.root={tmp_path}"]), run_dir, overrides)
    assert sorted(checkpoints.step_of(p) for p in checkpoints.committed(root)) == [4, 16]

    class Survivors(TrainerCallback):
        """After each save: is the checkpoint just written still there?"""

        def __init__(self) -> None:
            self.kept: dict[int, bool] = {}

        def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            steps = {checkpoints.step_of(p) for p in checkpoints.committed(root)}
            self.kept[state.global_step] = state.global_step in steps

    survivors = Survivors()
    again = [*overrides, f"resume={root / 'checkpoint-4'}"]
    with caplog.at_level("WARNING", logger="tunelab"):
        runner.run(
            config.compose([*again, f"output.root={tmp_path}"]),
            run_dir,
            again,
            callbacks=[survivors],
        )
    assert "set aside the 1 later checkpoint(s)" in caplog.text
    # Without setting checkpoint-16 aside, rotation (newest first) removed 8 and 12 at once.
    assert survivors.kept == {8: True, 12: True, 16: True}
    (aside,) = root.glob(".set-aside-*")
    assert [p.name for p in aside.iterdir()] == ["checkpoint-16"]
    assert sorted(checkpoints.step_of(p) for p in checkpoints.committed(root)) == [4, 16]
    assert manifests.read_manifest(run_dir / "model")["resumed_from"] == str(root / "checkpoint-4")


@pytest.mark.slow
def test_one_bad_job_fails_alone_and_the_sweep_ends_with_the_count(workspace):
    empty, ok = workspace.root / "empty.jsonl", workspace.root / "ok.jsonl"
    empty.write_text("")
    ok.write_text(
        "".join(
            json.dumps({"prompt": f"{a:02d}+{b:02d}=", "completion": f"{a + b:03d}"}) + "\n"
            for a in range(20)
            for b in range(10)
        )
    )
    tiny = [o for o in TINY if not o.startswith("data.") or o.startswith("data.max_length")]
    proc = tunelab("train", "-m", *workspace.base(), *tiny, "checkpoint=none", "data=text_files",
                   f"data.train={empty},{ok}", cwd=workspace.root, check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "tunelab: 1 job(s) of the sweep failed" in proc.stderr
    runs = workspace.runs()
    (parent,) = [r for r in runs if r.data.tags.get("tunelab.sweep") == "parent"]
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    assert parent.data.tags["tunelab.sweep_failed_jobs"] == "1"
    assert parent.data.tags["tunelab.best_run_id"] == child.info.run_id
    assert parent.data.tags["tunelab.pid"]  # stale-run repair can end it if the sweep is killed
    failed = [ln for ln in proc.stdout.splitlines() if "empty.jsonl" in ln and "FAILED" in ln]
    assert failed and "is empty (no rows)" in failed[0] and "no MLflow run" in failed[0]


def test_a_sweep_parent_whose_process_died_is_repaired(tmp_path):
    from tunelab.tracking.liveness import process_gone, repair_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("x")
    tags = {
        "tunelab.sweep": "parent",
        "tunelab.host": os.uname().nodename,
        "tunelab.pid": str(dead.pid),
        "tunelab.pid_started": "1.0",
    }
    run = client.create_run(exp, tags=tags)
    assert process_gone(tags)
    assert repair_stale(client, exp) == [run.info.run_id]
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def test_two_writers_of_one_lock_in_threads_take_turns(tmp_path):
    """`locks.waiting` serialises: the second holder starts only after the first ends."""
    order: list[str] = []

    def hold(name: str) -> None:
        with locks.waiting(tmp_path / ".lock", "x"):
            order.append(f"{name}+")
            time.sleep(0.2)
            order.append(f"{name}-")

    threads = [threading.Thread(target=hold, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])


def test_a_full_disk_with_synchronous_checkpoints_stops_cleanly(small_disk, tmp_path):
    """checkpoint.async_write=false: Trainer's own in-place write fills the disk; the run stops
    with CheckpointWriteFailed (one line in the CLI), the half-written checkpoint is removed and
    the older ones verify."""
    from tunelab import errors, runner

    overrides = [*LONG, *CKPT, "checkpoint.async_write=false", "tracking=none"]
    # The run directory on the small disk; the data cache (under output.root) elsewhere.
    cfg = config.compose([*overrides, f"output.root={tmp_path}"])
    with pytest.raises(errors.CheckpointWriteFailed, match="failed"):
        runner.run(cfg, small_disk / "run", overrides)
    root = small_disk / "run" / "checkpoints"
    kept = checkpoints.committed(root)
    assert len(kept) == 2 and all(manifests.verify_manifest(p) == [] for p in kept)
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in kept)
    assert not (small_disk / "run" / "model").exists()
