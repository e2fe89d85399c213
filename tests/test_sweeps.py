"""Sweeps from the command line: a parent MLflow run, one child per job, failures contained,
and the identical -m command resuming the same sweep."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.helpers import env, run_cli, runs_of, tiny, tunelab


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# Tests that count on this machine having no CUDA device (a job asking for one fails).
NO_CUDA = pytest.mark.skipif(_has_cuda(), reason="needs a machine without a CUDA device")

SHARED = ["checkpoint=none"]


def sweep_args(ws, *overrides: str) -> list[str]:
    return ["train", "-m", *ws.base(), *tiny(*SHARED, *overrides)]


def sweep(ws, *overrides: str, check: bool = True):
    """`tunelab train -m` in this process (Hydra's basic launcher runs the jobs in it)."""
    return run_cli(*sweep_args(ws, *overrides), cwd=ws.root, check=check)


def sweep_in_a_process(ws, *overrides: str, check: bool = True):
    """`tunelab train -m` in a real process, for launchers that start workers of their own."""
    return tunelab(*sweep_args(ws, *overrides), cwd=ws.root, check=check)


def sweep_dir(ws):
    (found,) = (ws.root / "outputs" / "tunelab" / "sweeps").iterdir()
    return found


def parents_and_children(ws):
    client, runs = runs_of(ws)
    parents = [r for r in runs if r.data.tags.get("tunelab.sweep") == "parent"]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, kids


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
    ids=["basic", "joblib-2-workers"],
)
def test_grid_sweep_has_one_parent_and_a_child_per_job(workspace, launcher):
    run = sweep_in_a_process if launcher else sweep
    proc = run(workspace, "training.lr=1e-3,3e-3", "seed=1,2", *launcher)
    client, (parent,), kids = parents_and_children(workspace)
    assert len(kids) == 4
    assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parent.info.run_id}
    # Each child is named by what sets it apart, as a person reads it (its directory by the
    # same keys, spelled safe for any filesystem).
    assert sorted(k.info.run_name for k in kids) == [
        "lr=0.001 seed=1", "lr=0.001 seed=2", "lr=0.003 seed=1", "lr=0.003 seed=2",
    ]  # fmt: skip
    assert {(k.data.params["training.lr"], k.data.params["seed"]) for k in kids} == {
        ("0.001", "1"), ("0.001", "2"), ("0.003", "1"), ("0.003", "2"),
    }  # fmt: skip
    assert all(k.data.tags["tunelab.objective"] == "eval_exact_match" for k in kids)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tunelab.sweep_jobs"] == "4"
    assert "training.lr=1e-3,3e-3" in parent.data.tags["tunelab.sweep_overrides"]
    best = client.get_run(parent.data.tags["tunelab.best_run_id"])
    top = max(k.data.metrics["eval_exact_match"] for k in kids)
    assert best.data.metrics["eval_exact_match"] == top
    assert parent.data.metrics["best_eval_exact_match"] == top
    # Job directories are named after what sets each job apart, inside the sweep's directory.
    jobs = sorted(p.name for p in sweep_dir(workspace).iterdir() if p.is_dir())
    assert jobs == sorted(
        f"seed-{k.data.params['seed']}+training.lr-{k.data.params['training.lr']}" for k in kids
    )
    assert "sweep finished, best first" in proc.stdout
    # `tunelab runs --sweep` lists the jobs side by side, best first.
    out = run_cli("runs", "--sweep", parent.info.run_id, "--uri", workspace.uri, cwd=workspace.root)
    lines = [ln for ln in out.stdout.splitlines() if "lr=" in ln]
    assert len(lines) == 4 and best.info.run_name in lines[0]
    # A job is not a sweep: one line naming its sweep, exit 1.
    job = run_cli("runs", "--sweep", best.info.run_id, "--uri", workspace.uri,
                  cwd=workspace.root, check=False)  # fmt: skip
    assert job.returncode == 1 and job.stdout == "", job.stderr
    assert job.stderr.strip() == (
        f"tunelab runs: run {best.info.run_id} is not a sweep's parent run; it is a job of the "
        f"sweep {parent.info.run_id}: tunelab runs --sweep {parent.info.run_id}"
    )


@pytest.mark.slow
def test_submitit_local_launcher_runs_jobs_as_child_runs(workspace):
    sweep_in_a_process(
        workspace, "seed=1,2", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"
    )
    _, (parent,), kids = parents_and_children(workspace)
    assert sorted(k.info.run_name for k in kids) == ["seed=1", "seed=2"]
    assert {k.info.status for k in kids} == {"FINISHED"} and parent.info.status == "FINISHED"
    # Each job ran in a process of its own, not in the sweep's.
    pids = {k.data.tags["tunelab.pid"] for k in kids}
    assert len(pids) == 2 and parent.data.tags["tunelab.pid"] not in pids


@NO_CUDA
def test_a_failed_job_is_failed_in_mlflow_and_the_others_go_on(workspace):
    # No CUDA device here: that job fails after its MLflow run began; the sweep exits 1 at the end.
    proc = sweep(workspace, "training.device=cpu,cuda", "seed=1", check=False)
    assert proc.returncode == 1
    _, (parent,), kids = parents_and_children(workspace)
    status = {k.info.run_name: k.info.status for k in kids}
    assert status == {"device=cpu": "FINISHED", "device=cuda": "FAILED"}
    assert parent.data.tags["tunelab.sweep_failed_jobs"] == "1"
    failed_line = [ln for ln in proc.stdout.splitlines() if "device=cuda  ->" in ln]
    assert failed_line and "FAILED" in failed_line[0] and "no CUDA device" in failed_line[0]


@pytest.mark.slow
def test_an_interrupted_sweep_reruns_without_redoing_finished_jobs(workspace):
    command = sweep_args(workspace, "training.max_steps=200", "checkpoint=steps",
                         "checkpoint.every=20", "seed=1,2,3")  # fmt: skip
    # Slow commits (at least 0.4 s each, one at a time): a job cannot get from its first
    # checkpoint to its end (step 200) in less than 3 s, so the kill lands inside the second job.
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", *command], cwd=workspace.root,
                            env=env(TUNELAB_TEST_COMMIT_DELAY="0.4"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    first = None
    while time.monotonic() < deadline and first is None:
        assert proc.poll() is None, "the sweep ended before it was killed"
        time.sleep(0.1)
        found = list((workspace.root / "outputs").glob("*/sweeps/*/seed-1/model/manifest.json"))
        # A *committed* checkpoint of the second job (its manifest is written last). Not rglob:
        # it would walk into the data cache while its entries are renamed.
        pattern = "*/sweeps/*/seed-2/checkpoints/checkpoint-*/manifest.json"
        second_ckpts = list((workspace.root / "outputs").glob(pattern))
        if found and second_ckpts:
            first = found[0]
    assert first is not None, "the first job finished and the second started"
    proc.kill()
    proc.wait()
    stamp = first.stat().st_mtime_ns
    record = json.loads((sweep_dir(workspace) / "sweep.json").read_text())
    assert not list((workspace.root / "outputs").glob("*/sweeps/*/seed-2/model/manifest.json"))

    rerun = run_cli(*command, cwd=workspace.root)
    assert first.stat().st_mtime_ns == stamp  # the finished job was not trained again
    assert "already finished" in rerun.stdout
    assert "resuming from" in rerun.stderr + rerun.stdout
    client, parents, kids = parents_and_children(workspace)
    assert [p.info.run_id for p in parents] == [record["parent_run_id"]]
    assert sorted(k.info.run_name for k in kids) == ["seed=1", "seed=2", "seed=3"]
    assert {k.info.status for k in kids} == {"FINISHED"}
    assert parents[0].info.status == "FINISHED"


@pytest.mark.slow
def test_optuna_search_trials_are_child_runs_and_the_study_resumes(workspace):
    search = ["hparams_search=addition_optuna", "hydra.sweeper.n_trials=3"]
    first = sweep(workspace, *search)
    assert "Launching" in first.stdout  # Hydra says when it launches jobs (see the rerun below)
    client, (parent,), kids = parents_and_children(workspace)
    assert len(kids) == 3 and {k.info.status for k in kids} == {"FINISHED"}
    lrs = [float(k.data.params["training.lr"]) for k in kids]
    assert len(set(lrs)) == 3 and all(3e-4 <= lr <= 1e-2 for lr in lrs)
    # The command line's batch size (the tiny model's 16) wins over the preset's choice.
    assert {k.data.params["training.batch_size"] for k in kids} == {"16"}
    best = client.get_run(parent.data.tags["tunelab.best_run_id"])
    assert best.data.metrics["eval_exact_match"] == max(
        k.data.metrics["eval_exact_match"] for k in kids
    )
    assert (sweep_dir(workspace) / "optuna.db").is_file()
    # The same command again: the study already has its 3 trials; nothing new is trained.
    again = sweep(workspace, *search)
    _, parents, kids_after = parents_and_children(workspace)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert len(kids_after) == 3 and "Launching" not in again.stdout


@pytest.mark.slow
def test_sequential_jobs_release_their_memory(workspace):
    """20 tiny jobs in a row in one process (Hydra's basic launcher): memory stays flat."""
    import re

    seeds = ",".join(str(s) for s in range(20))
    # A 0.8M-parameter model: a job that kept its weights, gradients and Adam state alive would
    # hold ~13 MiB, so a leak shows within a few jobs.
    bigger = ["model.arch.n_embd=128", "model.arch.n_layer=4", "model.arch.n_head=4"]
    # In a process of its own: the memory of this one would tell nothing about the sweep's.
    sweep_in_a_process(workspace, f"seed={seeds}", "tracking=none", "training.max_steps=4", *bigger)
    rss = {}
    for log in sweep_dir(workspace).glob("seed-*/train.log"):
        found = re.search(r"job (\d+) released: process RSS ([\d.]+) MiB", log.read_text())
        assert found, log
        rss[int(found.group(1))] = float(found.group(2))
    assert sorted(rss) == list(range(20))
    # After a few jobs warm the allocator and caches, 15 more jobs add less than 60 MiB
    # (15 leaked jobs would add ~200 MiB).
    growth = rss[19] - rss[4]
    assert growth < 60, rss


@pytest.mark.parametrize(
    ("overrides", "conf", "expected"),
    [
        ([], {}, "maximize"),  # the addition task's objective is exact match
        (["sweep.objective=eval_loss"], {}, "minimize"),
        (["sweep.objective=eval_token_accuracy"], {}, "maximize"),
        (["sweep.direction=min"], {}, "minimize"),
        (["sweep.objective=eval_loss"], {"direction": "maximize"}, "maximize"),  # set: obeyed
        (["data=text_files", "data.train=x.jsonl", "sweep.objective=eval_loss"], {}, "minimize"),
    ],
)
def test_the_optuna_study_direction_follows_the_objective(overrides, conf, expected):
    from hydra_plugins.tunelab_optuna import OptunaSweeper
    from tunelab import config

    sweeper = OptunaSweeper(**conf)
    sweeper.config = config.compose(overrides)
    assert sweeper.direction() == expected


def test_an_optuna_sweep_over_files_without_an_objective_asks_for_a_direction():
    from hydra_plugins.tunelab_optuna import OptunaSweeper
    from tunelab import config

    sweeper = OptunaSweeper()
    sweeper.config = config.compose(["data=text_files", "data.train=x.jsonl"])
    with pytest.raises(ValueError, match="hydra.sweeper.direction: set it"):
        sweeper.direction()


@pytest.mark.slow
def test_a_store_lost_mid_sweep_ends_it_non_zero_saying_so(tmp_path):
    """The tracking server goes away while the first job starts: jobs fail, the parent cannot
    be ended. Hydra makes the end-of-sweep error a warning (exit 0); tunelab counts the
    failures and says the outcome was not recorded: exit 1, no traceback."""
    import urllib.request

    import psutil

    from tests.helpers import Background, free_port, new_workspace, wait_for

    port = free_port()
    server = Background(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        tmp_path,
    )  # fmt: skip

    def healthy() -> bool:
        try:
            return (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            )
        except OSError:
            return False

    try:
        wait_for(healthy, server.proc, timeout=120)
        ws = new_workspace(tmp_path / "ws", None)
        args = ["train", "-m", f"output.root={ws.root / 'outputs'}",
                f"tracking.uri=http://127.0.0.1:{port}", *tiny(*SHARED, "seed=1,2")]  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "tunelab", *args], cwd=ws.root, text=True,
            env=env(TUNELAB_TEST_START_DELAY="3", MLFLOW_HTTP_REQUEST_MAX_RETRIES="1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        sweeps = ws.root / "outputs" / "tunelab" / "sweeps"
        wait_for(lambda: any(sweeps.glob("*/*/train.log")), proc)  # the first job started
        for p in [*psutil.Process(server.proc.pid).children(recursive=True), server.proc]:
            p.kill()  # its workers too: they would go on serving
        server.proc.wait()
        out, err = proc.communicate(timeout=300)
    finally:
        server.stop()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "job(s) of the sweep failed (see above)" in err, err[-3000:]
    assert "the sweep's outcome could not be recorded in its tracking store" in err, err[-3000:]
