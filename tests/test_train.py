"""End to end: real tiny runs through the CLI, a real sqlite MLflow store, real reloads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import TINY, env
from tunelab import artifacts
from tunelab.tracking.logged_model import MLFLOW_FILES

EXPECTED_FILES = {
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tunelab.yaml",
    "manifest.json",
    "README.md",
}

RELOAD = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path)
tok = AutoTokenizer.from_pretrained(path)
ids = tok("12+34=", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=4, do_sample=False)
print("GENERATED", repr(tok.decode(out[0][ids["input_ids"].shape[1]:])))
print("TUNELAB_IMPORTED", "tunelab" in sys.modules)
"""


def reload_and_generate(path: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(path)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TUNELAB_IMPORTED False" in proc.stdout
    return proc.stdout


def only_run(ws) -> object:
    client = MlflowClient(tracking_uri=ws.uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "tunelab"]
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def test_run_writes_a_complete_artifact(trained):
    ws, run_dir, proc = trained
    model_dir = run_dir / "model"
    assert {p.name for p in model_dir.iterdir()} == EXPECTED_FILES
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert not list(run_dir.parent.glob(".*partial"))  # nothing half-written left beside it
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == EXPECTED_FILES - {"manifest.json"}
    assert artifacts.verify_manifest(model_dir) == []
    assert manifest["step"] == 8
    assert manifest["metrics"]["eval_loss"] > 0 and "eval_exact_match" in manifest["metrics"]
    assert {"torch", "transformers", "mlflow", "tunelab"} <= set(manifest["versions"])
    assert len(manifest["data_digest"]) == 64
    resolved = yaml.safe_load((model_dir / "tunelab.yaml").read_text())
    assert resolved["training"]["max_steps"] == 8 and resolved["model"]["arch"]["n_embd"] == 32
    assert "run finished" in proc.stdout and str(model_dir) in proc.stdout


def test_artifact_holds_no_pickle(trained):
    _, run_dir, _ = trained
    found = [p for p in (run_dir / "model").rglob("*") if p.suffix in artifacts.PICKLE_SUFFIXES]
    assert found == []


def test_artifact_reloads_with_plain_transformers_and_generates(trained):
    _, run_dir, _ = trained
    out = reload_and_generate(run_dir / "model")
    assert "GENERATED" in out


def test_manifest_detects_a_changed_file(trained, tmp_path):
    _, run_dir, _ = trained
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "model", copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    (problem,) = artifacts.verify_manifest(copy)
    assert "model.safetensors" in problem and "do not match" in problem


def test_mlflow_run_holds_params_metrics_artifacts_and_status(trained):
    ws, run_dir, _ = trained
    client, run = only_run(ws)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_dir.name
    params = run.data.params
    assert params["training.max_steps"] == "8"
    assert params["model.arch.n_embd"] == "32"
    assert params["checkpoint.strategy"] == "none"
    assert params["tracking.uri"] == ws.uri
    tags = run.data.tags
    assert "training.max_steps=8" in tags["tunelab.overrides"]
    assert tags["tunelab.run_dir"] == str(run_dir.resolve())

    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [2, 4, 6, 8]
    evals = client.get_metric_history(run.info.run_id, "eval_exact_match")
    assert {m.step for m in evals} >= {4, 8}
    assert client.get_metric_history(run.info.run_id, "learning_rate")
    assert client.get_metric_history(run.info.run_id, "grad_norm")

    config_files = {f.path for f in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/tunelab.yaml", "config/overrides.yaml", "config/hydra"} <= config_files


def test_the_artifact_is_the_runs_logged_model_stored_once(trained, monkeypatch):
    import mlflow.artifacts

    ws, run_dir, _ = trained
    # MLflow 3.17 resolves runs:/.../model -> models:/ID against the default store, not the one
    # passed in: point the default at this store too.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws.uri)
    client, run = only_run(ws)
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.name == "model" and model.source_run_id == run.info.run_id
    assert str(model.status) == "READY"
    assert {m.key for m in model.metrics} >= {"eval_loss", "eval_exact_match"}
    # runs:/ID/model resolves to the logged model: one download, ready for from_pretrained.
    uri = f"runs:/{run.info.run_id}/model"
    listed = mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=ws.uri)
    # The Hugging Face files, plus MLflow's MLmodel and the tokenizer where its flavor looks.
    assert {f.path.split("/")[-1] for f in listed} == EXPECTED_FILES | {"MLmodel", "components"}
    dst = ws.root / "dl"
    dst.mkdir()
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst), tracking_uri=ws.uri))
    # MLflow keeps its own files beside the listed ones (`tunelab export` leaves them out).
    assert artifacts.verify_manifest(local, ignore=MLFLOW_FILES) == []
    reload_and_generate(local)
    # One copy of the weights in the store, and, the store being on the same filesystem, it is
    # a hard link to the run directory's (read-only) file: no second copy on disk at all.
    (weights,) = list((ws.root / "mlartifacts").rglob("model.safetensors"))
    assert weights.samefile(run_dir / "model" / "model.safetensors")
    assert all(not (f.stat().st_mode & 0o222) for f in (run_dir / "model").iterdir())
    # MLflow's own loader reads the same files.
    import mlflow.transformers

    pipe = mlflow.transformers.load_model(f"models:/{model.model_id}")
    out = pipe("12+34=", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert out.startswith("12+34=")


def test_run_records_sizes_datasets_throughput_and_system_metrics(trained):
    ws, run_dir, _ = trained
    client, run = only_run(ws)
    params = run.data.params
    assert int(params["model.parameters"]) == int(params["model.trainable_parameters"]) > 10_000
    assert params["data.train_examples"] == "256" and params["data.eval_examples"] == "32"
    assert int(params["data.train_tokens"]) == 256 * 10  # "12+34=" + "046" + eos
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"addition-2digit-train", "addition-2digit-eval"}
    context = {t.key: t.value for t in inputs["addition-2digit-train"].tags}
    assert context["mlflow.data.context"] == "train" and context["tunelab.rows"] == "256"
    assert inputs["addition-2digit-train"].dataset.source_type == "code"
    for key in ("throughput/samples_per_second", "throughput/tokens_per_second"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4, 6, 8]
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system, system
    tags = run.data.tags
    assert "transformers" in tags["tunelab.versions"] and tags["mlflow.note.content"]


def test_artifacts_live_beside_the_store(trained):
    ws, _, _ = trained
    _, run = only_run(ws)
    assert run.info.artifact_uri.startswith((ws.root / "mlartifacts").as_uri())


def test_long_param_values_are_truncated_not_dropped(workspace, tmp_path):
    from tunelab.tracking import MAX_PARAM_VALUE, flatten

    flat = flatten({"a": {"b": "x" * 10_000, "c": [1, 2]}})
    assert len(flat["a.b"]) == MAX_PARAM_VALUE and flat["a.b"].endswith("...[truncated]")
    assert flat["a.c"] == "[1, 2]"


def test_failing_run_is_marked_failed(workspace):
    # No CUDA device here: found when the Trainer is built, after tracking began.
    proc = workspace.train("training.device=cuda", "checkpoint=none", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "training.device: cuda, but this machine has no CUDA device" in proc.stderr
    client, run = only_run(workspace)
    assert run.info.status == "FAILED"
    assert "tunelab.error" in run.data.tags
    assert not (workspace.run_dirs()[0] / "model").exists()


def test_steps_checkpoints_keep_exactly_two_loadable(workspace):
    workspace.train(
        "checkpoint=steps", "checkpoint.every=2", "checkpoint.keep=2", "checkpoint.keep_best=false"
    )
    (run_dir,) = workspace.run_dirs()
    ckpts = sorted((run_dir / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in ckpts] == ["checkpoint-6", "checkpoint-8"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for ckpt in ckpts:
        assert AutoModelForCausalLM.from_pretrained(ckpt).config.n_embd == 32
        assert AutoTokenizer.from_pretrained(ckpt).eos_token == "<|endoftext|>"


def test_tracking_none_trains_without_mlflow(workspace):
    workspace.train("tracking=none", "checkpoint=none")
    (run_dir,) = workspace.run_dirs()
    assert (run_dir / "model" / "manifest.json").is_file()
    assert not (workspace.root / "mlflow.db").exists()
    assert not (workspace.root / "mlartifacts").exists()


@pytest.mark.slow
def test_finetune_a_local_model_on_jsonl_files(trained, workspace):
    """model=hf from the first run's artifact directory, data=text_files from jsonl files."""
    _, first_run, _ = trained
    pairs = [(a, b) for a in range(12) for b in range(12)]
    rows = [{"prompt": f"{a:02d}+{b:02d}=", "completion": f"{a + b:03d}"} for a, b in pairs]
    train = workspace.root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:120]))
    evaluation = workspace.root / "eval.jsonl"
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in rows[120:]))
    tiny = [o for o in TINY if not o.startswith(("model.", "data."))]
    from tests.conftest import tunelab

    tunelab(
        "train",
        *workspace.base(),
        *tiny,
        "model=hf",
        f"model.name_or_path={first_run / 'model'}",
        "data=text_files",
        f"data.train={train}",
        f"data.eval={evaluation}",
        "data.max_length=16",
        "checkpoint=none",
        cwd=workspace.root,
    )
    (run_dir,) = workspace.run_dirs()
    manifest = json.loads((run_dir / "model" / "manifest.json").read_text())
    assert manifest["base_model"] == str(first_run / "model")
    assert "eval_exact_match" in manifest["metrics"]
    reload_and_generate(run_dir / "model")
