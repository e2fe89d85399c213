"""DDP through a real torchrun with 2 processes (gloo on CPU): one run directory, one MLflow
run, one artifact; async checkpoints holding every rank's RNG state; kill -9 of the process
group and SIGTERM, then the identical command, ending bit-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import (
    Workspace,
    committed_steps,
    env,
    free_port,
    new_workspace,
    runs_of,
    tiny,
    wait_for,
)
from tunelab import artifacts

pytestmark = pytest.mark.slow

# 30 steps of the tiny model, a checkpoint every 5 (asynchronous, the default).
COMMAND = [
    "training.max_steps=30",
    "training.eval_every=10",
    "training.log_every=5",
    "checkpoint=steps",
    "checkpoint.every=5",
    "checkpoint.keep=2",
]
# Each commit takes at least this long: a kill or a signal sent on seeing checkpoint N lands
# before the run can pass step N + 5 (the next checkpoint waits for the commit).
SLOW_COMMITS = {"TUNELAB_TEST_COMMIT_DELAY": "0.8"}


def torchrun(
    ws: Workspace, *overrides: str, launcher: str = "torchrun", **extra_env: str
) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 -m tunelab train ...` (or, with
    launcher="tunelab", `tunelab launch --standalone --nproc_per_node=2 train ...`) in its own
    process group (so the test can kill the whole group, as a scheduler would)."""
    launch = {
        "torchrun": [
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "tunelab",
        ],
        "tunelab": ["tunelab", "launch", "--standalone", "--nproc_per_node=2"],
    }[launcher]
    return subprocess.Popen(
        [sys.executable, "-m", *launch, "train", *ws.base(), *tiny(*COMMAND, *overrides)],
        cwd=ws.root,
        env=env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_everything(proc: subprocess.Popen) -> None:
    """kill -9 of torchrun and every worker at once, as a scheduler or the OOM killer would
    (torchrun starts each worker in a session of its own: killing its group is not enough)."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.kill()
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


def finish(proc: subprocess.Popen, code: int = 0) -> str:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == code, out[-4000:]
    return out


def the_run_dir(ws: Workspace) -> Path:
    (run_dir,) = ws.run_dirs()  # one directory, however many ranks
    return run_dir


def weights_digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "model" / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, empty_store) -> tuple[Workspace, str]:
    """An uninterrupted 2-process run, and what it printed. Launched with `accelerate launch
    --multi_gpu` (it starts torchrun's workers; without GPUs they train with gloo on the CPU),
    so the runs below, launched with torchrun, also show that both launchers train alike."""
    ws = new_workspace(tmp_path_factory.mktemp("straight"), empty_store)
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.Popen(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
         "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}",
         "-m", "tunelab", "train", *ws.base(), *tiny(*COMMAND)],  # fmt: skip
        cwd=ws.root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return ws, finish(proc)


def test_two_processes_make_one_run_one_directory_one_artifact(straight):
    ws, out = straight
    run_dir = the_run_dir(ws)
    assert artifacts.verify_manifest(run_dir / "model") == []
    assert artifacts.read_manifest(run_dir / "model")["step"] == 30
    # Only rank 0 speaks: one summary, no second rank's "not uploaded".
    assert out.count("tunelab: run finished") == 1, out[-3000:]
    assert "not uploaded" not in out and "Traceback" not in out
    client, (run,) = runs_of(ws)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["parallel.world_size"] == "2"
    batch = int(params["training.batch_size"])
    assert params["parallel.global_batch_size"] == str(2 * batch)
    assert params["parallel.backend"] == "gloo"
    assert artifacts.read_manifest(run_dir / "model")["mlflow_run_id"] == run.info.run_id
    # Every rank's RNG state is in each (asynchronously written) checkpoint, under its manifest.
    for step in committed_steps(run_dir / "checkpoints"):
        checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
        assert artifacts.verify_manifest(checkpoint) == []
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}


def test_sigterm_then_kill_9_of_the_group_then_the_same_command_ends_bit_identical(
    straight, tmp_path, empty_store
):
    ws = new_workspace(tmp_path / "ws", empty_store)
    # 1. SIGTERM to the launcher (`tunelab launch`, torchrun's agent in tunelab's process):
    # every rank checkpoints at the same step and stops; KILLED; one line, no traceback.
    proc = torchrun(ws, launcher="tunelab", **SLOW_COMMITS)
    wait_for(lambda: max(committed_steps(ws.checkpoints()) or [0]) >= 5, proc)
    seen = max(committed_steps(ws.checkpoints()))
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    stopped_at = max(committed_steps(ws.checkpoints()))
    assert seen < stopped_at < 30, out[-3000:]
    assert out.count("run the same command again to resume") == 1, out[-3000:]
    client, (run,) = runs_of(ws)
    assert run.info.status == "KILLED"

    # 2. The same run launched by torchrun resumes; kill -9 of every process after a commit.
    proc = torchrun(ws, **SLOW_COMMITS)
    wait_for(lambda: max(committed_steps(ws.checkpoints())) > stopped_at, proc)
    kill_everything(proc)
    killed_at = max(committed_steps(ws.checkpoints()))
    assert killed_at < 30

    # 3. Once more: it finishes in the same MLflow run, bit-identical to the straight run.
    out = finish(torchrun(ws))
    assert f"checkpoint-{killed_at}" in out
    client, (again,) = runs_of(ws)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert int(again.data.tags["tunelab.resumes"]) == 2
    assert weights_digest(the_run_dir(ws)) == weights_digest(the_run_dir(straight[0]))


def test_a_rank_that_dies_takes_the_other_down_with_one_line(tmp_path, empty_store):
    ws = new_workspace(tmp_path / "ws", empty_store)
    proc = torchrun(ws, launcher="tunelab", **SLOW_COMMITS)
    wait_for(lambda: max(committed_steps(ws.checkpoints()) or [0]) >= 5, proc)
    workers = [p for p in psutil.Process(proc.pid).children() if "tunelab" in " ".join(p.cmdline())]
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    rank1.kill()
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out[-4000:]
    lines = [line for line in out.splitlines() if "another process of this run stopped" in line]
    assert len(lines) == 1, out[-4000:]
    assert lines[0].startswith("tunelab: rank 0:"), lines
    # The launcher names the rank that died, in one line of its own; no traceback of torchrun's.
    said = f"tunelab launch: rank 1 (pid {rank1.pid}) was killed by SIGKILL"
    assert out.count(said) == 1 and "Traceback" not in out, out[-4000:]
    client, (run,) = runs_of(ws)
    assert run.info.status in ("FAILED", "KILLED")
    # What was committed resumes.
    steps = committed_steps(ws.checkpoints())
    out = finish(torchrun(ws))
    assert f"checkpoint-{max(steps)}" in out


def test_a_checkpoint_of_two_processes_resumes_in_one_with_a_warning(straight, tmp_path):
    import shutil

    source = the_run_dir(straight[0]) / "checkpoints"
    step = min(committed_steps(source))
    checkpoint = tmp_path / "from-two" / f"checkpoint-{step}"
    shutil.copytree(source / f"checkpoint-{step}", checkpoint)
    ws = new_workspace(tmp_path / "one", None)
    result = ws.train(*COMMAND, f"resume={checkpoint}")
    said = result.stdout + result.stderr
    assert "was written by 2 process(es) and is resumed by 1" in said, said[-3000:]
    manifest = artifacts.read_manifest(the_run_dir(ws) / "model")
    assert manifest["step"] == 30 and manifest["resumed_from"] == str(checkpoint)
