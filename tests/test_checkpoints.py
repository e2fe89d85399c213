"""Crash-safe checkpoints and resume, with real processes, real kill -9 and real signals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import TINY, env
from tunelab import artifacts, checkpoints

LONGER = [o for o in TINY if not o.startswith("training.max_steps")] + ["training.max_steps=60"]
CKPT = ["checkpoint=steps", "checkpoint.every=4", "checkpoint.keep=2"]


def popen(ws, *overrides: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "tunelab", "train", *ws.base(), *LONGER, *CKPT, *overrides]
    return subprocess.Popen(
        args,
        cwd=ws.root,
        env={**env(), **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_dir_of(ws) -> Path:
    (run_dir,) = ws.run_dirs()
    return run_dir


def wait_for(predicate, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.01)
    raise AssertionError("timed out waiting")


def ckpt_root(ws) -> Path:
    dirs = ws.run_dirs()
    return dirs[0] / "checkpoints" if dirs else ws.root / "nowhere"


def writing_a_checkpoint(ws) -> bool:
    """A checkpoint directory exists whose manifest is not written yet."""
    root = ckpt_root(ws)
    return root.is_dir() and any(
        p.name.startswith("checkpoint-") and not (p / "manifest.json").exists()
        for p in root.iterdir()
    )


def committed_steps(ws) -> list[int]:
    return sorted(checkpoints.step_of(p) for p in checkpoints.committed(ckpt_root(ws)))


def the_run(ws):
    client = MlflowClient(tracking_uri=ws.uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "tunelab"]
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def assert_clean_finish(ws, keep: int = 2) -> dict:
    run_dir = run_dir_of(ws)
    manifest = artifacts.read_manifest(run_dir / "model")
    assert manifest["step"] == 60
    assert artifacts.verify_manifest(run_dir / "model") == []
    root = run_dir / "checkpoints"
    names = [p.name for p in root.iterdir() if not p.name.startswith(".corrupt")]
    assert all((root / n / "manifest.json").is_file() for n in names), names  # none incomplete
    assert not [n for n in names if n.startswith(".deleting")]
    assert len(names) <= keep + 1  # newest `keep`, plus the best by eval_loss
    assert sorted(committed_steps(ws))[-1] == 60
    return manifest


@pytest.mark.slow
def test_kill_9_at_any_moment_then_rerun_finishes_as_one_run(workspace):
    rng = random.Random(7)
    delay = {"TUNELAB_TEST_COMMIT_DELAY": "0.4"}
    resumed_from = []
    # Kill while a checkpoint is half-written (twice), then at random moments after a commit.
    plans = ["during-write", "random", "during-write", "random"]
    for plan in plans:
        proc = popen(workspace, extra_env=delay)
        before = committed_steps(workspace)
        if plan == "during-write":
            wait_for(lambda b=before: committed_steps(workspace) != b, proc=proc)
            wait_for(lambda: writing_a_checkpoint(workspace), proc=proc)
        else:
            wait_for(lambda b=before: committed_steps(workspace) != b, proc=proc)
            time.sleep(rng.uniform(0.0, 0.8))
        proc.kill()
        proc.wait()
        steps = committed_steps(workspace)
        assert steps, "a commit happened before the kill"
        resumed_from.append(max(steps))
        # Every complete checkpoint left behind verifies against its manifest.
        for step in steps:
            assert artifacts.verify_manifest(ckpt_root(workspace) / f"checkpoint-{step}") == []

    out = popen(workspace).communicate(timeout=300)[0]
    assert f"resuming from {ckpt_root(workspace) / f'checkpoint-{resumed_from[-1]}'}" in out, out
    assert_clean_finish(workspace)
    client, run = the_run(workspace)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["tunelab.resumes"]) == len(plans)
    # Metrics continue at the right steps: every logged step is within the run's 60 steps.
    loss_steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert loss_steps == set(range(2, 61, 2))


@pytest.mark.slow
def test_resumed_run_ends_like_an_uninterrupted_one(workspace, tmp_path):
    from tests.conftest import Workspace

    straight = Workspace(tmp_path / "straight")
    straight.root.mkdir()
    assert popen(straight).wait(timeout=300) == 0

    proc = popen(workspace)
    wait_for(lambda: 28 in committed_steps(workspace), proc=proc)
    proc.kill()
    proc.wait()
    newest = max(committed_steps(workspace))
    resumed = popen(workspace)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert f"resuming from {ckpt_root(workspace) / f'checkpoint-{newest}'}" in out

    a = assert_clean_finish(straight)["metrics"]
    b = assert_clean_finish(workspace)["metrics"]
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    assert b["eval_token_accuracy"] == pytest.approx(a["eval_token_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_sigterm_checkpoints_marks_killed_and_the_same_command_resumes(workspace):
    proc = popen(workspace, "checkpoint.every=20")
    wait_for(lambda: 20 in committed_steps(workspace), proc=proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "run the same command again to resume" in out
    steps = committed_steps(workspace)
    stopped_at = max(steps)
    assert 20 < stopped_at < 60, steps  # written at the step boundary after the signal
    client, run = the_run(workspace)
    assert run.info.status == "KILLED"
    assert "SIGTERM" in run.data.tags["tunelab.error"]
    assert not (run_dir_of(workspace) / "model").exists()

    out = popen(workspace, "checkpoint.every=20").communicate(timeout=300)[0]
    assert f"checkpoint-{stopped_at}" in out
    client, again = the_run(workspace)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["tunelab.resumed_from"].endswith(f"checkpoint-{stopped_at}")
    assert artifacts.read_manifest(run_dir_of(workspace) / "model")["step"] == 60


@pytest.mark.slow
def test_corrupted_checkpoints_are_skipped_for_an_older_valid_one(workspace):
    short = ["training.max_steps=12", "checkpoint.every=4", "checkpoint.keep=3"]
    workspace.train(*CKPT, *short)
    run_dir = run_dir_of(workspace)
    root = run_dir / "checkpoints"
    assert committed_steps(workspace) == [4, 8, 12]
    # Truncated weights in the newest, an edited optimizer file in the next.
    weights = root / "checkpoint-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    optimizer = root / "checkpoint-8" / "optimizer.pt"
    blob = bytearray(optimizer.read_bytes())
    blob[-10] ^= 0xFF
    optimizer.write_bytes(bytes(blob))
    import shutil

    shutil.rmtree(run_dir / "model")  # not finished any more: the next run must resume

    proc = workspace.train(*CKPT, *short)
    log = proc.stdout + proc.stderr
    assert "checkpoint-12 does not match its manifest" in log
    assert "checkpoint-8 does not match its manifest" in log
    assert f"resuming from {root / 'checkpoint-4'}" in log
    corrupt = sorted(p.name.rsplit("-", 1)[0] for p in (root / ".corrupt").iterdir())
    assert corrupt == ["checkpoint-12", "checkpoint-8"]
    assert artifacts.read_manifest(run_dir / "model")["step"] == 12


@pytest.mark.slow
def test_keep_best_survives_rotation_across_a_resume(workspace):
    # mode=max on eval_loss makes the *worst* loss "best": the first checkpoint, long since
    # out of the newest-`keep` window, so only keep_best can explain it being there.
    best = ["checkpoint.every=4", "checkpoint.keep=1", "checkpoint.mode=max"]
    proc = popen(workspace, *best)
    wait_for(lambda: max(committed_steps(workspace) or [0]) >= 24, proc=proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C takes the same path as SIGTERM
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    assert committed_steps(workspace)[0] == 4
    assert popen(workspace, *best).wait(timeout=300) == 0
    assert committed_steps(workspace) == [4, 60]
    first = artifacts.read_manifest(ckpt_root(workspace) / "checkpoint-4")["metrics"]["eval_loss"]
    last = artifacts.read_manifest(ckpt_root(workspace) / "checkpoint-60")["metrics"]["eval_loss"]
    assert first > last


def test_checkpoints_hold_no_full_pickle_and_load_for_inference(workspace):
    workspace.train("checkpoint=steps", "checkpoint.every=4", "checkpoint.keep=2")
    root = ckpt_root(workspace)
    for step in (4, 8):
        ckpt = root / f"checkpoint-{step}"
        names = {p.name for p in ckpt.iterdir()}
        assert "training_args.bin" not in names and "training_args.json" in names
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= names
        assert {"trainer_state.json", "manifest.json", "tokenizer.json"} <= names
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert manifest["step"] == step and "eval_loss" in manifest["metrics"]
        args = json.loads((ckpt / "training_args.json").read_text())
        assert args["save_steps"] == 4
        from transformers import AutoModelForCausalLM, AutoTokenizer

        AutoModelForCausalLM.from_pretrained(ckpt)
        AutoTokenizer.from_pretrained(ckpt)


def _fake_checkpoint(root: Path, step: int, loss: float | None, commit: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(64))
    if commit:
        checkpoints.commit(path, step, 1.0, {} if loss is None else {"eval_loss": loss})
    return path


def test_rotation_keeps_newest_and_best_and_touches_nothing_else(tmp_path):
    root = tmp_path / "checkpoints"
    for step, loss in [(2, 0.9), (4, 0.1), (6, 0.5), (8, 0.7)]:
        _fake_checkpoint(root, step, loss)
    (root / "notes").mkdir()
    other_run = tmp_path / "other" / "checkpoint-2"
    other_run.mkdir(parents=True)
    removed = checkpoints.rotate(root, keep=2, metric="eval_loss", mode=None)
    assert sorted(p.name for p in removed) == ["checkpoint-2"]
    assert [checkpoints.step_of(p) for p in checkpoints.committed(root)] == [8, 6, 4]
    assert (root / "notes").is_dir() and other_run.is_dir()
    removed = checkpoints.rotate(root, keep=1, metric=None, mode=None)
    assert removed == [root / "checkpoint-6", root / "checkpoint-4"]


def test_incomplete_checkpoints_are_never_counted_and_are_cleaned(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2, 0.5)
    _fake_checkpoint(root, 4, 0.4)
    _fake_checkpoint(root, 6, None, commit=False)  # killed before its manifest
    # Rotation right after a crash must not count the incomplete one as kept.
    assert checkpoints.rotate(root, keep=2, metric=None, mode=None) == []
    with caplog.at_level("WARNING", logger="tunelab"):
        assert checkpoints.resume_point("auto", root) == root / "checkpoint-4"
    assert "checkpoint-6" in caplog.text and not (root / "checkpoint-6").exists()


def test_resume_never_starts_afresh_in_a_new_directory(workspace):
    workspace.train("checkpoint=none")
    workspace.train("checkpoint=none", "resume=never")
    first, second = workspace.run_dirs()
    assert second.name.startswith(first.name + "@")
    assert (first / "model").is_dir() and (second / "model").is_dir()
    client = MlflowClient(tracking_uri=workspace.uri)
    runs = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def test_resume_from_a_checkpoint_path(workspace, tmp_path):
    workspace.train("checkpoint=steps", "checkpoint.every=4", "checkpoint.keep=1")
    (first,) = workspace.run_dirs()
    ckpt = first / "checkpoints" / "checkpoint-8"
    workspace.train("checkpoint=none", "training.max_steps=12", f"resume={ckpt}")
    second = [d for d in workspace.run_dirs() if d != first][0]
    manifest = artifacts.read_manifest(second / "model")
    assert manifest["step"] == 12 and manifest["resumed_from"] == str(ckpt)
    client = MlflowClient(tracking_uri=workspace.uri)
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.data.tags["tunelab.resumed_from"] == str(ckpt)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == {10, 12}


def test_a_directory_made_by_another_config_is_not_resumed(workspace):
    workspace.train("checkpoint=none")
    (run_dir,) = workspace.run_dirs()
    (run_dir / "model").rename(run_dir / "model-old")  # unfinished again
    record = artifacts.read_run_record(run_dir)
    artifacts.write_run_record(run_dir, {**record, "fingerprint": "0" * 64})  # conf edited
    proc = workspace.train("checkpoint=none", check=False)
    assert proc.returncode == 2
    assert "holds a run of a different config" in proc.stderr
    assert not (run_dir / "model").exists()
