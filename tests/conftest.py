"""Shared fixtures: a tiny, real training run through the real CLI, against a real sqlite store."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A model of ~40k parameters on 2-digit addition: a run is a few seconds of real training.
TINY = [
    "model.arch.n_embd=32",
    "model.arch.n_layer=2",
    "model.arch.n_head=2",
    "model.arch.n_positions=16",
    "data.digits=2",
    "data.train_size=256",
    "data.eval_size=32",
    "data.max_length=16",
    "training.max_steps=8",
    "training.eval_every=4",
    "training.log_every=2",
    "training.batch_size=16",
    "training.eval_batch_size=32",
    "training.warmup_steps=0",
    "training.progress_bar=false",
]


def env() -> dict[str, str]:
    e = dict(os.environ)
    # Child processes run in temporary directories: put this checkout's sources first, by
    # absolute path, so they run the code under test (not whatever the venv's install points at).
    e["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), *filter(None, e.get("PYTHONPATH", "").split(os.pathsep))]
    )
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # Tiny runs last seconds: sample system metrics every second so they show up.
    e.update(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def tunelab(*args: str, cwd: Path, check: bool = True, timeout: float = 600):
    """Run `python -m tunelab ARGS` in a fresh process; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"tunelab {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


@dataclass
class Workspace:
    root: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def base(self) -> list[str]:
        return [f"output.root={self.root / 'outputs'}", f"tracking.uri={self.uri}"]

    def train(self, *overrides: str, check: bool = True):
        return tunelab("train", *self.base(), *TINY, *overrides, cwd=self.root, check=check)

    def run_dirs(self, experiment: str = "tunelab") -> list[Path]:
        parent = self.root / "outputs" / experiment
        return sorted(p for p in parent.iterdir() if p.is_dir()) if parent.exists() else []


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One tiny run through the CLI, shared by the tests that inspect its results."""
    ws = Workspace(tmp_path_factory.mktemp("trained"))
    proc = ws.train("checkpoint=none")
    (run_dir,) = ws.run_dirs()
    return ws, run_dir, proc


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for two checkpoints of the tiny model, not three. Needs mount rights
    (root with CAP_SYS_ADMIN, as on the project's machines); skipped otherwise."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()})")
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], check=True)
