"""Crash-safe checkpoints and resume, with real processes, real kill -9 and real signals."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import (
    Workspace,
    committed_steps,
    new_workspace,
    run_cli,
    runs_of,
    tiny,
    wait_for,
)
from tunelab import artifacts, checkpoints, errors, files, manifests
from tunelab.checkpoints import snapshots

# 60 steps, a checkpoint every 4, the newest 2 kept (plus the best by eval_loss).
LONGER = ["training.max_steps=60", "checkpoint=steps", "checkpoint.every=4", "checkpoint.keep=2"]
# Testing hook: each checkpoint commit takes at least this long, and training waits for one
# commit before starting the next, so a run cannot pass step N + `every` within that time of
# checkpoint N appearing, however fast the machine is: a signal or a kill sent on seeing a
# checkpoint lands before the run ends.
SLOW_COMMITS = {"TUNELAB_TEST_COMMIT_DELAY": "0.4"}


def writing_a_checkpoint(ws: Workspace) -> bool:
    """A checkpoint directory exists whose manifest is not written yet."""
    root = ws.checkpoints()
    return root.is_dir() and any(
        p.name.startswith(("checkpoint-", ".checkpoint-")) and not (p / "manifest.json").exists()
        for p in root.iterdir()
    )


def assert_clean_finish(ws: Workspace, keep: int = 2) -> dict:
    run_dir = ws.run_dir()
    manifest = manifests.read_manifest(run_dir / "model")
    assert manifest["step"] == 60
    assert manifests.verify_manifest(run_dir / "model") == []
    root = run_dir / "checkpoints"
    names = [p.name for p in root.iterdir() if not p.name.startswith(".corrupt")]
    assert all((root / n / "manifest.json").is_file() for n in names), names  # none incomplete
    assert not [n for n in names if n.startswith(".deleting")]
    assert len(names) <= keep + 1  # newest `keep`, plus the best by eval_loss
    assert committed_steps(root)[-1] == 60
    return manifest


@pytest.mark.slow
def test_kill_9_at_any_moment_then_rerun_finishes_as_one_run(workspace):
    rng = random.Random(7)
    resumed_from = []
    # Kill while a checkpoint is half-written, then at a random moment after a commit.
    plans = ["during-write", "random"]
    for plan in plans:
        proc = workspace.popen(*LONGER, **SLOW_COMMITS)
        before = committed_steps(workspace.checkpoints())
        wait_for(lambda b=before: committed_steps(workspace.checkpoints()) != b, proc=proc)
        if plan == "during-write":
            wait_for(lambda: writing_a_checkpoint(workspace), proc=proc)
        else:
            time.sleep(rng.uniform(0.0, 0.8))
        proc.kill()
        proc.wait()
        steps = committed_steps(workspace.checkpoints())
        assert steps, "a commit happened before the kill"
        assert max(steps) < 60, "killed before the run could end"
        resumed_from.append(max(steps))
        # Every complete checkpoint left behind verifies against its manifest.
        for step in steps:
            assert manifests.verify_manifest(workspace.checkpoints() / f"checkpoint-{step}") == []

    # The same command, once more (in this process), resumes and finishes.
    result = workspace.train(*LONGER)
    newest = workspace.checkpoints() / f"checkpoint-{resumed_from[-1]}"
    assert f"resuming from {newest}" in result.stdout + result.stderr, result.stdout
    assert_clean_finish(workspace)
    client, (run,) = runs_of(workspace)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["tunelab.resumes"]) == len(plans)
    # Metrics continue at the right steps: every logged step is within the run's 60 steps.
    loss_steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert loss_steps == set(range(2, 61, 2))


@pytest.mark.slow
def test_resumed_run_ends_like_an_uninterrupted_one(workspace, tmp_path, empty_store):
    straight = new_workspace(tmp_path / "straight", empty_store)
    straight.train(*LONGER)

    proc = workspace.popen(*LONGER, **SLOW_COMMITS)
    wait_for(lambda: max(committed_steps(workspace.checkpoints()) or [0]) >= 28, proc=proc)
    proc.kill()
    proc.wait()
    newest = max(committed_steps(workspace.checkpoints()))
    assert newest < 60
    resumed = workspace.train(*LONGER)
    assert f"resuming from {workspace.checkpoints() / f'checkpoint-{newest}'}" in resumed.stdout

    a = assert_clean_finish(straight)["metrics"]
    b = assert_clean_finish(workspace)["metrics"]
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    assert b["eval_token_accuracy"] == pytest.approx(a["eval_token_accuracy"], abs=1e-6)


def test_sigterm_checkpoints_marks_killed_and_the_same_command_resumes(workspace):
    # A checkpoint every 10 steps, each commit held 1 s: the run cannot reach its end within
    # 3 s of checkpoint 20 appearing, so SIGTERM lands before it.
    command = [*LONGER, "checkpoint.every=10"]
    proc = workspace.popen(*command, TUNELAB_TEST_COMMIT_DELAY="1")
    wait_for(lambda: max(committed_steps(workspace.checkpoints()) or [0]) >= 20, proc=proc)
    seen = max(committed_steps(workspace.checkpoints()))
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "run the same command again to resume" in out
    steps = committed_steps(workspace.checkpoints())
    stopped_at = max(steps)
    assert seen < stopped_at < 60, steps  # written at the step boundary after the signal
    client, (run,) = runs_of(workspace)
    assert run.info.status == "KILLED"
    assert "SIGTERM" in run.data.tags["tunelab.error"]
    assert not (workspace.run_dir() / "model").exists()

    result = workspace.train(*command)
    assert f"checkpoint-{stopped_at}" in result.stdout
    client, (again,) = runs_of(workspace)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["tunelab.resumed_from"].endswith(f"checkpoint-{stopped_at}")
    assert "tunelab.error" not in again.data.tags  # the first attempt's no longer describes it
    assert manifests.read_manifest(workspace.run_dir() / "model")["step"] == 60


def test_corrupted_checkpoints_are_skipped_for_an_older_valid_one(workspace):
    short = ["checkpoint=steps", "training.max_steps=12", "checkpoint.every=4", "checkpoint.keep=3"]
    workspace.train(*short)
    run_dir = workspace.run_dir()
    root = run_dir / "checkpoints"
    assert committed_steps(root) == [4, 8, 12]
    # Truncated weights in the newest, an edited optimizer file in the next.
    weights = root / "checkpoint-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    optimizer = root / "checkpoint-8" / "optimizer.safetensors"
    blob = bytearray(optimizer.read_bytes())
    blob[-10] ^= 0xFF
    optimizer.write_bytes(bytes(blob))
    shutil.rmtree(run_dir / "model")  # not finished any more: the next run must resume

    result = workspace.train(*short)
    log = result.stdout + result.stderr
    assert "checkpoint-12 does not match its manifest" in log
    assert "checkpoint-8 does not match its manifest" in log
    assert f"resuming from {root / 'checkpoint-4'}" in log
    corrupt = sorted(p.name.rsplit("-", 1)[0] for p in (root / ".corrupt").iterdir())
    assert corrupt == ["checkpoint-12", "checkpoint-8"]
    assert manifests.read_manifest(run_dir / "model")["step"] == 12


@pytest.mark.slow
def test_keep_best_survives_rotation_across_a_resume(workspace):
    # mode=max on eval_loss makes the *worst* loss "best": the first checkpoint, long since
    # out of the newest-`keep` window, so only keep_best can explain it being there.
    best = [*LONGER, "checkpoint.keep=1", "checkpoint.mode=max"]
    # Slow commits: seen at step >= 24, the run cannot reach step 60 for another 2 s or more.
    proc = workspace.popen(*best, **SLOW_COMMITS)
    wait_for(lambda: max(committed_steps(workspace.checkpoints()) or [0]) >= 24, proc=proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C takes the same path as SIGTERM
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    stopped = committed_steps(workspace.checkpoints())
    assert stopped[0] == 4 and len(stopped) == 2 and stopped[-1] < 60, stopped
    workspace.train(*best)
    assert committed_steps(workspace.checkpoints()) == [4, 60]
    root = workspace.checkpoints()
    first = manifests.read_manifest(root / "checkpoint-4")["metrics"]["eval_loss"]
    last = manifests.read_manifest(root / "checkpoint-60")["metrics"]["eval_loss"]
    assert first > last


def test_checkpoints_hold_no_full_pickle_and_load_for_inference(workspace):
    workspace.train("checkpoint=steps", "checkpoint.every=4", "checkpoint.keep=2")
    root = workspace.checkpoints()
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for step in (4, 8):
        ckpt = root / f"checkpoint-{step}"
        names = {p.name for p in ckpt.iterdir()}
        assert "training_args.bin" not in names and "training_args.json" in names
        assert {
            "model.safetensors",
            "optimizer.safetensors",
            "scheduler.json",
            "rng_state.pth",
        } <= names
        assert not names & {"optimizer.pt", "scheduler.pt"}
        assert {"trainer_state.json", "manifest.json", "tokenizer.json"} <= names
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert manifest["step"] == step and "eval_loss" in manifest["metrics"]
        args = json.loads((ckpt / "training_args.json").read_text())
        assert args["save_steps"] == 4
        # Loaded for inference with the checkpoint's own weights (none left at random init).
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        stored = load_file(ckpt / "model.safetensors")
        loaded = model.state_dict()
        assert stored and all(torch.equal(loaded[k], v) for k, v in stored.items())
        assert torch.equal(loaded["lm_head.weight"], stored["transformer.wte.weight"])
        assert AutoTokenizer.from_pretrained(ckpt).eos_token == "<|endoftext|>"


def _fake_checkpoint(root: Path, step: int, loss: float | None, commit: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(64))
    if commit:
        # Only the weights: rotation is about directories, not their contents.
        checkpoints.commit(
            path, step, 1.0, {} if loss is None else {"eval_loss": loss}, required=()
        )
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
    _, runs = runs_of(workspace)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def test_resume_from_a_checkpoint_path(workspace):
    workspace.train("checkpoint=steps", "checkpoint.every=4", "checkpoint.keep=1")
    (first,) = workspace.run_dirs()
    ckpt = first / "checkpoints" / "checkpoint-8"
    workspace.train("checkpoint=none", "training.max_steps=12", f"resume={ckpt}")
    second = [d for d in workspace.run_dirs() if d != first][0]
    manifest = manifests.read_manifest(second / "model")
    assert manifest["step"] == 12 and manifest["resumed_from"] == str(ckpt)
    client, _ = runs_of(workspace)
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.data.tags["tunelab.resumed_from"] == str(ckpt)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == {10, 12}


def test_a_directory_made_by_another_config_is_not_resumed(workspace):
    workspace.train("checkpoint=none")
    (run_dir,) = workspace.run_dirs()
    (run_dir / "model").rename(run_dir / "model-old")  # unfinished again
    record = artifacts.read_run_record(run_dir)
    artifacts.write_run_record(run_dir, {**record, "fingerprint": "0" * 64})  # conf edited
    result = workspace.train("checkpoint=none", check=False)
    assert result.returncode == 2
    assert "holds a run of a different config" in result.stderr
    assert not (run_dir / "model").exists()


def _train_in_process(root: Path, *overrides: str) -> Path:
    from tunelab import config, runner

    every = ["checkpoint=steps", "checkpoint.every=4", "checkpoint.keep=3", "tracking=none"]
    overrides = (*tiny("training.max_steps=12"), *every, *overrides)
    cfg = config.compose([*overrides, f"output.root={root}"])
    runner.run(cfg, root / "run", list(overrides))
    return root / "run" / "checkpoints"


def test_background_checkpoints_hold_the_state_of_their_step(tmp_path, monkeypatch):
    """Written in the background while training goes on (each write held back 0.3 s, so several
    steps change the weights meanwhile), a checkpoint still holds exactly its own step's state:
    the same tensors as Trainer's synchronous write, and it resumes."""
    import torch
    from safetensors.torch import load_file

    sync = _train_in_process(tmp_path / "sync", "checkpoint.async_write=false")
    monkeypatch.setenv("TUNELAB_TEST_COMMIT_DELAY", "0.3")
    background = _train_in_process(tmp_path / "async")
    assert committed_steps(background) == committed_steps(sync) == [4, 8, 12]
    assert not list(background.glob(".*")), "no .partial directory left behind"
    for step in (4, 8, 12):
        a, b = sync / f"checkpoint-{step}", background / f"checkpoint-{step}"
        assert manifests.verify_manifest(b) == []
        renamed = {"optimizer.pt": "optimizer.safetensors", "scheduler.pt": "scheduler.json"}
        assert sorted(renamed.get(p.name, p.name) for p in a.iterdir()) == sorted(
            p.name for p in b.iterdir()
        )
        sched_a = torch.load(a / "scheduler.pt", weights_only=True)
        assert snapshots.load_scheduler(b) == sched_a
        weights_a, weights_b = (
            load_file(a / "model.safetensors"),
            load_file(b / "model.safetensors"),
        )
        assert weights_a.keys() == weights_b.keys()
        for key in weights_a:
            assert torch.equal(weights_a[key], weights_b[key]), (step, key)
        # Trainer's synchronous write pickles the optimizer; the background one writes safetensors.
        opt_a = torch.load(a / "optimizer.pt", weights_only=True)
        opt_b = snapshots.load_optimizer(b)
        assert opt_a["param_groups"] == opt_b["param_groups"]
        for index, state in opt_a["state"].items():
            for name, value in state.items():
                assert torch.equal(value, opt_b["state"][index][name]), (step, index, name)
        assert json.loads((b / "trainer_state.json").read_text())["global_step"] == step
        for name in ("config.json", "generation_config.json", "tokenizer.json"):
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text())
        assert manifests.read_manifest(b)["metrics"]["eval_loss"] == pytest.approx(
            manifests.read_manifest(a)["metrics"]["eval_loss"], rel=1e-6
        )


def test_a_failed_background_write_stops_the_run_and_keeps_older_checkpoints(tmp_path):
    """The writer thread's error surfaces in the training loop (not lost in a thread), and the
    checkpoint it was writing never looks complete."""
    writer = snapshots.BackgroundWriter()
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2, 0.5)

    def fail() -> None:
        partial = checkpoints.partial_dir(root, 4)
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    writer.start(fail, "checkpoint-4")
    with pytest.raises(errors.CheckpointWriteFailed, match="No space left on device"):
        writer.wait()
    writer.wait()  # reported once
    assert committed_steps(root) == [2]
    checkpoints.clean_incomplete(root)
    assert [p.name for p in root.iterdir()] == ["checkpoint-2"]


@pytest.mark.parametrize("how", ["direct", "buffered"])
def test_a_staged_file_is_plain_safetensors_and_its_checksum_matches(tmp_path, how, monkeypatch):
    """The optimizer and weights files are written from a staged image (O_DIRECT where the
    system offers it, buffered where not): safetensors reads them back exactly, and the
    checksum taken from memory is the file's."""
    import torch
    from safetensors import safe_open

    if how == "buffered":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)  # as on macOS
    tensors = {
        "a": torch.randn(3, 1000),
        "b.half": torch.randn(7).to(torch.bfloat16),
        "c.step": torch.tensor(5.0),
        "d.ids": torch.arange(13, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
    }
    snap = snapshots.Snapshot()
    sizes = []
    # A longer header fits the room left for it, then one outgrows it (new staged memory).
    for round_, pad in enumerate([0, 100, 20000]):
        meta = {"round": str(round_), "pad": "x" * pad}
        staged = snap.stage("f", tensors, meta)
        sizes.append(staged.data_start)
        path = tmp_path / f"f{round_}.safetensors"
        digest = staged.write(path)
        assert digest == files.file_digest(path, "xxh3_128")
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == meta
            assert sorted(f.keys()) == sorted(tensors)
            for key, value in tensors.items():
                assert torch.equal(f.get_tensor(key), value), key
        tensors = {k: v + 1 if v.dtype != torch.bool else ~v for k, v in tensors.items()}
    assert sizes[0] == sizes[1] < sizes[2]


def test_a_full_disk_during_a_checkpoint_stops_the_run_cleanly(workspace, small_disk):
    args = [f"output.root={small_disk}", f"tracking.uri={workspace.uri}", *tiny(*LONGER)]
    result = run_cli("train", *args, cwd=workspace.root, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("tunelab:")]  # noqa: E741
    assert "No space left on device" in line and "Older checkpoints are intact" in line
    (run_dir,) = (small_disk / "tunelab").iterdir()
    root = run_dir / "checkpoints"
    kept = checkpoints.committed(root)
    # The data cache (under output.root) shares the 1 MiB disk: one or two checkpoints fit.
    assert 1 <= len(kept) <= 2
    assert all(manifests.verify_manifest(p) == [] for p in kept)
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # partial removed
    assert not (run_dir / "model").exists()
    _, (run,) = runs_of(workspace)
    assert run.info.status == "FAILED"
    assert "No space left on device" in run.data.tags["tunelab.error"]


@pytest.mark.slow
def test_a_run_killed_after_its_last_checkpoint_resumes_to_the_same_model(workspace):
    """Killed between the commit of the checkpoint at max_steps and the artifact: the same
    command takes no further step (Trainer would take one more, as 8 steps are not a whole
    number of 16-batch epochs) and writes the model the first process would have written.
    Its output holds tunelab's lines only: no warnings of transformers' about the resume."""
    command = ["checkpoint=steps", "checkpoint.every=4"]
    workspace.train(*command)
    model = workspace.run_dir() / "model"
    digest = files.sha256_file(model / "model.safetensors")
    shutil.rmtree(model)  # as if killed right after checkpoint-8 was committed

    proc = workspace.popen(*command)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert f"resuming from {workspace.checkpoints() / 'checkpoint-8'}" in out
    assert manifests.read_manifest(model)["step"] == 8
    assert committed_steps(workspace.checkpoints()) == [4, 8]
    assert files.sha256_file(model / "model.safetensors") == digest
    for noise in ("missing keys", "loss_type", "Writing model shards", "Traceback"):
        assert noise not in out, out
