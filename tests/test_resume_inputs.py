"""A resume trains on what its run started from, or not at all: data or a base model replaced
since the run started is refused in one line (issue 18, silent mixing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.helpers import TINY_MODEL, Workspace, run_cli
from tunelab import artifacts

MODEL = TINY_MODEL
STEPS = ["training.max_steps=8", "checkpoint=steps", "checkpoint.every=4", "checkpoint.keep=2"]


def rows(path: Path, words: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": f"{w} {i} {w}"}) + "\n" for i in range(64)
                            for w in words))  # fmt: skip
    return path


def train(ws: Workspace, *overrides: str, check: bool = True):
    return run_cli("train", *ws.base(), *MODEL, *STEPS, *overrides, cwd=ws.root, check=check)


def killed_before_its_artifact(ws: Workspace) -> Path:
    """The workspace's one run, its artifact removed: as if killed after its last checkpoint."""
    (run_dir,) = ws.run_dirs()
    shutil.rmtree(run_dir / "model")
    return run_dir


def test_a_resume_refuses_data_replaced_since_the_run_started(workspace):
    data = rows(workspace.root / "train.jsonl", ["alpha", "beta"])
    command = ["data=text_files", f"data.train={data}", "data.eval_fraction=0"]
    train(workspace, *command)
    run_dir = killed_before_its_artifact(workspace)
    record = artifacts.read_run_record(run_dir)
    assert record["data_digest"] and record["base_digest"] is None  # built from config
    rows(data, ["gamma", "delta"])  # the same path, new rows
    result = train(workspace, *command, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert "the data changed since this run started" in line and "resume=never" in line, line
    assert record["data_digest"][:16] in line
    assert not (run_dir / "model").exists()
    # Restored, it resumes; resume=never starts afresh on the new rows.
    rows(data, ["alpha", "beta"])
    train(workspace, *command)
    rows(data, ["gamma", "delta"])
    train(workspace, *command, "resume=never")


def test_a_resume_refuses_a_base_model_replaced_since_the_run_started(trained, workspace):
    """LoRA on a base directory whose weights are replaced after the first checkpoints."""
    _, trained_dir, _ = trained
    base = workspace.root / "base"
    shutil.copytree(trained_dir / "model", base)
    for f in base.iterdir():
        f.chmod(0o644)
    command = ["model=hf", f"model.name_or_path={base}", "peft=lora", "data.digits=2",
               "data.train_size=256", "data.eval_size=32", "data.max_length=16",
               "training.progress_bar=false"]  # fmt: skip
    run_cli("train", *workspace.base(), *STEPS, *command, cwd=workspace.root)
    killed_before_its_artifact(workspace)
    weights = base / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    save_file({k: v + 0.01 for k, v in state.items()}, weights, metadata={"format": "pt"})
    result = run_cli("train", *workspace.base(), *STEPS, *command, cwd=workspace.root, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert "the base model's weights changed since this run started" in line, line
