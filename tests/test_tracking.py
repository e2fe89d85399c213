"""MLflow as the place runs are browsed and loaded back: a real `mlflow server` on 127.0.0.1,
its REST API, downloads through it, and the store tools (`runs`, `export`, `generate`)."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from tests.helpers import Workspace, free_port, new_workspace, run_cli, runs_of, tiny, tunelab
from tests.test_train import EXPECTED_FILES, PROMPT, continuation
from tunelab import artifacts, files, manifests


def rest(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def train_remote(ws: Workspace, url: str, *overrides: str, check: bool = True):
    """`tunelab train` of the tiny model, in this process, tracked on the server at `url`."""
    return run_cli(
        "train", f"output.root={ws.root / 'outputs'}", f"tracking.uri={url}",
        *tiny("checkpoint=none", *overrides), cwd=ws.root, check=check,
    )  # fmt: skip


@pytest.fixture(scope="module")
def remote_run(mlflow_server, tmp_path_factory):
    url = mlflow_server
    ws = new_workspace(tmp_path_factory.mktemp("remote"), store=None)
    train_remote(ws, url, "tracking.experiment=remote")
    exp = rest(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=remote")
    exp_id = exp["experiment"]["experiment_id"]
    (run,) = rest(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
    return url, ws, exp_id, run


@pytest.mark.slow  # a real mlflow server
def test_server_holds_params_tags_metrics_datasets_and_the_logged_model(remote_run):
    url, ws, exp_id, run = remote_run
    info, data = run["info"], run["data"]
    assert info["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in data["params"]}
    assert params["training.max_steps"] == "8" and params["tracking.uri"] == url
    assert int(params["model.parameters"]) > 10_000 and params["data.train_examples"] == "256"
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert "training.max_steps=8" in tags["tunelab.overrides"]
    assert tags["mlflow.runName"] == info["run_name"] and tags["mlflow.note.content"]
    assert "torch" in tags["tunelab.versions"] and tags["tunelab.host"]
    history = rest(
        url, f"/api/2.0/mlflow/metrics/get-history?run_id={info['run_id']}&metric_key=loss"
    )["metrics"]
    assert [m["step"] for m in history] == [2, 4, 6, 8]
    names = {d["dataset"]["name"] for d in run["inputs"]["dataset_inputs"]}
    assert names == {"addition-2digit-train", "addition-2digit-eval"}
    models = rest(url, "/api/2.0/mlflow/logged-models/search", {"experiment_ids": [exp_id]})
    (model,) = models["models"]
    assert model["info"]["name"] == "model"
    assert model["info"]["source_run_id"] == info["run_id"]
    assert model["info"]["status"] == "LOGGED_MODEL_READY"
    assert {m["key"] for m in model["data"]["metrics"]} >= {"eval_loss", "eval_exact_match"}


@pytest.mark.slow  # needs the real server
def test_export_through_the_server_loads_with_plain_transformers(remote_run, tmp_path):
    url, ws, _, run = remote_run
    run_id = run["info"]["run_id"]
    dst = tmp_path / "exported"
    run_cli("export", run_id, str(dst), "--uri", url, cwd=tmp_path)
    assert manifests.verify_manifest(dst) == []
    (local,) = ws.run_dirs("remote")
    assert files.sha256_file(dst / "model.safetensors") == files.sha256_file(
        local / "model" / "model.safetensors"
    )
    for name in EXPECTED_FILES:  # the files that reload with plain transformers, byte for byte
        assert (dst / name).read_bytes() == (local / "model" / name).read_bytes(), name
    # `generate` prints the prompt, then the stored weights' greedy continuation.
    out = run_cli("generate", run_id, PROMPT, "--uri", url, cwd=tmp_path).stdout
    assert out == PROMPT + continuation(dst, PROMPT, 16) + "\n"
    # A second export into a non-empty directory refuses, in one line (a real process).
    again = tunelab("export", run_id, str(dst), "--uri", url, cwd=tmp_path, check=False)
    assert again.returncode == 1 and "not empty" in again.stderr and "Traceback" not in again.stderr
    assert again.stderr.strip().count("\n") == 0, again.stderr


@pytest.mark.slow  # needs the real server
def test_a_second_run_finetunes_from_the_first_ones_mlflow_uri(remote_run, tmp_path):
    url, _, _, run = remote_run
    source = f"runs:/{run['info']['run_id']}/model"
    ws = Workspace(tmp_path)
    without_arch = [o for o in tiny() if not o.startswith("model.")]
    run_cli(
        "train", f"output.root={tmp_path / 'outputs'}", f"tracking.uri={url}", *without_arch,
        "checkpoint=none", "tracking.experiment=remote-ft", "model=hf",
        f"model.name_or_path={source}", cwd=tmp_path,
    )  # fmt: skip
    (run_dir,) = ws.run_dirs("remote-ft")
    manifest = manifests.read_manifest(run_dir / "model")
    assert manifest["base_model"] == source and manifest["step"] == 8
    cache = tmp_path / "outputs" / ".cache" / "models"
    cached = [p for p in cache.iterdir() if not p.name.startswith(".")]  # less the lock file
    assert len(cached) == 1 and manifests.verify_manifest(cached[0]) == []


def test_unreachable_tracking_fails_fast_before_training(workspace):
    dead = f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    result = run_cli(
        "train", f"output.root={workspace.root / 'outputs'}", f"tracking.uri={dead}", *tiny(),
        cwd=workspace.root, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - began
    assert result.returncode == 1
    assert f"tracking server {dead} cannot be reached" in result.stderr
    assert "tracking.required=false" in result.stderr and "Traceback" not in result.stderr
    assert elapsed < 60  # seconds, not MLflow's minutes of HTTP retries
    assert not list((workspace.root / "outputs").rglob("model.safetensors"))


def test_required_false_trains_offline_and_the_same_command_uploads_later(mlflow_server, workspace):
    url = mlflow_server
    dead = f"http://127.0.0.1:{free_port()}"
    first = train_remote(workspace, dead, "tracking.required=false", "tracking.experiment=later")
    assert "not uploaded" in first.stdout
    (run_dir,) = workspace.run_dirs("later")
    assert manifests.verify_manifest(run_dir / "model") == []
    # The store is back: the same command (now reaching it) uploads the finished artifact.
    second = train_remote(workspace, url, "tracking.required=false", "tracking.experiment=later")
    assert "already finished" in second.stdout
    client, (run,) = runs_of(url, "later")
    assert run.info.status == "FINISHED" and run.data.params["training.max_steps"] == "8"
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.source_run_id == run.info.run_id
    assert artifacts.read_run_record(run_dir)["mlflow_run_id"] == run.info.run_id


def test_a_killed_run_is_not_left_running(workspace):
    # Far more steps than it can take before the kill, however fast the machine.
    proc = workspace.popen("training.max_steps=100000", "checkpoint=none")
    deadline = time.monotonic() + 120
    run = None
    while run is None and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
        dirs = workspace.run_dirs()
        run_id = artifacts.read_run_record(dirs[0]).get("mlflow_run_id") if dirs else None
        if run_id:
            client = MlflowClient(tracking_uri=workspace.uri)
            if client.get_metric_history(run_id, "loss"):
                run = client.get_run(run_id)
    assert run is not None and run.info.status == "RUNNING"
    proc.kill()  # kill -9: nothing in the process can report
    proc.wait()
    out = run_cli("runs", "--uri", workspace.uri, cwd=workspace.root).stdout
    assert "KILLED" in out and run.info.run_id[:12] in out
    after = MlflowClient(tracking_uri=workspace.uri).get_run(run.info.run_id)
    assert after.info.status == "KILLED"
    assert "ended without reporting" in after.data.tags["tunelab.error"]


@pytest.mark.parametrize(
    ("policy", "stored"),
    [("all", [2, 4, 6, 8]), ("last", [8]), ("best", [4])],
)
def test_log_checkpoints_mirrors_the_policy_into_the_store(workspace, policy, stored):
    # Checkpoints at 2, 4, 6, 8; evaluations at 4 and 8. mode=max on eval_loss makes step 4 the
    # "best" (the loss falls), which only `best` should keep in the store.
    workspace.train(
        "checkpoint=steps", "checkpoint.every=2", "checkpoint.keep=2", "checkpoint.mode=max",
        f"tracking.log_checkpoints={policy}",
    )  # fmt: skip
    client, (run,) = runs_of(workspace)
    names = [f.path.split("/")[-1] for f in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert sorted(names, key=lambda n: int(n.split("-")[1])) == [f"checkpoint-{s}" for s in stored]
    for name in names:  # each stored copy is complete: its manifest came last
        listed = client.list_artifacts(run.info.run_id, f"checkpoints/{name}")
        files = {f.path.split("/")[-1] for f in listed}
        assert {"manifest.json", "model.safetensors", "optimizer.safetensors"} <= files
    assert "tunelab.checkpoint_upload_errors" not in run.data.tags
