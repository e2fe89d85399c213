"""End to end: real tiny runs through the CLI, a real sqlite MLflow store, real reloads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY, env, invoke, new_workspace, runs_of, served_model
from tunelab import manifests
from tunelab.tasks import causal_lm
from tunelab.tracking.logged_model import MLFLOW_FILES

# Written by the test, not taken from the code under test: what unpickles on load.
PICKLES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# Tests that count on this machine having no CUDA device (a job asking for one fails).
NO_CUDA = pytest.mark.skipif(_has_cuda(), reason="needs a machine without a CUDA device")

EXPECTED_FILES = {
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",  # the from-scratch tokenizer's small template (README *Data*)
    "tunelab.yaml",
    "manifest.json",
    "README.md",
}

PROMPT = "12+34="

# What a user does with an artifact, in a fresh interpreter that never imports tunelab.
RELOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path)
tok = AutoTokenizer.from_pretrained(path)
ids = tok(prompt, return_tensors="pt")
with torch.no_grad():
    logits = model(**ids).logits[0]
out = model.generate(**ids, max_new_tokens=4, do_sample=False)
print(json.dumps({
    "ids": ids["input_ids"][0].tolist(),
    "logits": logits.tolist(),
    "generated": tok.decode(out[0][ids["input_ids"].shape[1]:]),
    "tunelab_imported": "tunelab" in sys.modules,
}))
"""


def reload_in_a_fresh_process(path: Path, prompt: str = PROMPT) -> dict:
    """Load `path` with plain transformers in a new interpreter: the prompt's ids, the logits
    on it and the greedy continuation (4 tokens, special tokens kept)."""
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(path), prompt],
        capture_output=True,
        text=True,
        env=env(),
        cwd=path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def from_the_files(path: Path) -> tuple:
    """(model, tokenizer) built here straight from the files, without from_pretrained's
    weight loading: the architecture from config.json, the weights read from model.safetensors
    (the output layer is tied to the embeddings, so the file holds it once), tokenizer.json."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    stored = load_file(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(stored, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model.eval(), Tokenizer.from_file(str(path / "tokenizer.json"))


def greedy(path: Path, prompt: str, new_tokens: int) -> tuple[list[int], object, list[int]]:
    """(prompt ids, logits on the prompt, greedy continuation ids, up to and with eos), computed
    in this process from the files, by an explicit argmax loop."""
    import torch

    model, tok = from_the_files(path)
    eos = model.config.eos_token_id
    ids = tok.encode(prompt).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        seq, new = list(ids), []
        for _ in range(new_tokens):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
            new.append(nxt)
            if nxt == eos:
                break
    return ids, logits, new


def continuation(path: Path, prompt: str, new_tokens: int, skip_special: bool = True) -> str:
    """The greedy continuation of `prompt` by the weights in `path`, as text."""
    from tokenizers import Tokenizer

    _, _, new = greedy(path, prompt, new_tokens)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return tok.decode(new, skip_special_tokens=skip_special)


def assert_reloads_as_stored(path: Path) -> None:
    """Plain transformers in a fresh process (no tunelab) computes, on a fixed prompt, the same
    logits and the same greedy continuation as the stored weights do."""
    import torch

    reloaded = reload_in_a_fresh_process(path)
    assert reloaded["tunelab_imported"] is False
    ids, logits, new = greedy(path, PROMPT, 4)
    assert reloaded["ids"] == ids
    torch.testing.assert_close(torch.tensor(reloaded["logits"]), logits, rtol=1e-4, atol=1e-5)
    assert reloaded["generated"] == continuation(path, PROMPT, 4, skip_special=False)


def test_run_writes_a_complete_artifact(trained):
    ws, run_dir, result = trained
    model_dir = run_dir / "model"
    assert {p.name for p in model_dir.iterdir()} == EXPECTED_FILES
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert not list(run_dir.parent.glob(".*partial"))  # nothing half-written left beside it
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == EXPECTED_FILES - {"manifest.json"}
    assert manifests.verify_manifest(model_dir) == []
    assert manifest["step"] == 8
    assert manifest["metrics"]["eval_loss"] > 0 and "eval_exact_match" in manifest["metrics"]
    assert {"torch", "transformers", "mlflow", "tunelab"} <= set(manifest["versions"])
    assert len(manifest["data_digest"]) == 64
    resolved = yaml.safe_load((model_dir / "tunelab.yaml").read_text())
    assert resolved["training"]["max_steps"] == 8 and resolved["model"]["arch"]["n_embd"] == 32
    assert "run finished" in result.stdout and str(model_dir) in result.stdout


def test_the_artifact_holds_the_weights_its_metrics_were_measured_on(trained):
    """The eval loss recorded in the manifest, recomputed from the stored files on the run's
    own eval rows (one batch of 32): the artifact is the model that was evaluated."""
    import torch

    from tunelab import data

    _, run_dir, _ = trained
    model_dir = run_dir / "model"
    manifest = manifests.read_manifest(model_dir)
    resolved = yaml.safe_load((model_dir / "tunelab.yaml").read_text())
    d = resolved["data"]
    rows = data.addition(d["digits"], d["train_size"], d["eval_size"], d["seed"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tokenized = causal_lm.tokenize(rows.eval, tok, d["max_length"]).dataset
    eval_set = tokenized.select_columns(["input_ids", "labels"])
    batch = causal_lm.collator(tok)([eval_set[i] for i in range(len(eval_set))])
    model, _ = from_the_files(model_dir)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(manifest["metrics"]["eval_loss"], rel=1e-4)


def test_artifact_holds_no_pickle(trained):
    _, run_dir, _ = trained
    found = [p for p in (run_dir / "model").rglob("*") if p.suffix in PICKLES]
    assert found == []


def test_artifact_reloads_with_plain_transformers_and_generates(trained):
    _, run_dir, _ = trained
    assert_reloads_as_stored(run_dir / "model")


def test_manifest_detects_a_changed_file(trained, tmp_path):
    _, run_dir, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "model", copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    (problem,) = manifests.verify_manifest(copy)
    assert "model.safetensors" in problem and "do not match" in problem


def test_mlflow_run_holds_params_metrics_artifacts_and_status(trained):
    ws, run_dir, _ = trained
    client, (run,) = runs_of(ws)
    assert run.info.status == "FINISHED"
    # Named as a person reads its overrides (the directory: the same, spelled for a filesystem).
    name = run.info.run_name
    assert name.startswith("batch_size=16 ") and " max_steps=8 " in name and " n_embd=32" in name
    assert run_dir.name.startswith("checkpoint-none+")
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


def test_the_artifact_is_the_runs_logged_model_stored_once(trained, monkeypatch, tmp_path):
    import mlflow.artifacts

    ws, run_dir, _ = trained
    # MLflow 3.17 resolves runs:/.../model -> models:/ID against the default store, not the one
    # passed in: point the default at this store too.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws.uri)
    client, (run,) = runs_of(ws)
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.name == "model" and model.source_run_id == run.info.run_id
    assert str(model.status) == "READY"
    assert {m.key for m in model.metrics} >= {"eval_loss", "eval_exact_match"}
    # runs:/ID/model resolves to the logged model: one download, ready for from_pretrained.
    uri = f"runs:/{run.info.run_id}/model"
    listed = mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=ws.uri)
    # The Hugging Face files, plus MLflow's MLmodel and the tokenizer where its flavor looks.
    assert {f.path.split("/")[-1] for f in listed} == EXPECTED_FILES | {"MLmodel", "components"}
    dst = tmp_path / "dl"
    dst.mkdir()
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst), tracking_uri=ws.uri))
    # MLflow keeps its own files beside the listed ones (`tunelab export` leaves them out).
    assert manifests.verify_manifest(local, ignore=MLFLOW_FILES) == []
    for name in EXPECTED_FILES:  # the run directory's files, byte for byte
        assert (local / name).read_bytes() == (run_dir / "model" / name).read_bytes(), name
    # One copy of the weights in the store, and, the store being on the same filesystem, it is
    # a hard link to the run directory's (read-only) file: no second copy on disk at all.
    (weights,) = list((ws.root / "mlartifacts").rglob("model.safetensors"))
    assert weights.samefile(run_dir / "model" / "model.safetensors")
    assert all(not (f.stat().st_mode & 0o222) for f in (run_dir / "model").iterdir())
    # MLflow's own loader reads the same files: its pipeline continues the prompt as the stored
    # weights do.
    import mlflow.transformers

    pipe = mlflow.transformers.load_model(f"models:/{model.model_id}")
    out = pipe(PROMPT, max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert out == PROMPT + continuation(local, PROMPT, 3)


@pytest.mark.slow  # a real scoring server
def test_mlflow_models_serve_continues_inputs_as_greedy_decoding_does(trained, tmp_path):
    """The Logged Model of a causal LM, served by `mlflow models serve`, answers
    {"inputs": [...]} with each prompt and its greedy continuation, as the artifact's weights
    give it here (a text-generation pipeline samples unless told not to); up to the model's
    context by default (a pipeline's 256 new tokens ran past the 16 positions), or
    `max_new_tokens` from the request's params."""
    ws, run_dir, _ = trained
    client, (run,) = runs_of(ws)
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    prompts = [PROMPT, "99+01="]
    with served_model(f"models:/{model.model_id}", ws.uri, tmp_path) as url:
        default = invoke(url, {"inputs": prompts})["predictions"]
        two = invoke(url, {"inputs": prompts, "params": {"max_new_tokens": 2}})["predictions"]
        sampled = invoke(url, {"inputs": prompts, "params": {"do_sample": True}})["predictions"]
    path = run_dir / "model"
    positions = json.loads((path / "config.json").read_text())["n_positions"]
    assert json.loads((path / "generation_config.json").read_text())["max_length"] == positions
    room = [positions - len(greedy(path, p, 0)[0]) for p in prompts]
    assert default == [p + continuation(path, p, n) for p, n in zip(prompts, room, strict=True)]
    assert two == [p + continuation(path, p, 2) for p in prompts]
    assert two != default  # the params reached the pipeline
    assert [s[: len(p)] for s, p in zip(sampled, prompts, strict=True)] == prompts
    # do_sample reached the pipeline: this barely trained model (eval loss ~4.7: no next token
    # above a few percent) samples its ~10 new tokens of each prompt as greedy decoding would
    # with a chance far below one in a million.
    assert sampled != default


@pytest.mark.slow  # a real scoring server
def test_tunelab_serve_from_a_fresh_shell_serves_the_run_named_in_its_summary(trained, tmp_path):
    """The summary names the Logged Model and the command that serves it; `tunelab serve
    RUN_ID`, run by path from a shell whose PATH lacks the environment's bin directory (MLflow's
    scoring server starts `uvicorn` by name), answers /invocations as the model does, and
    Ctrl-C stops it."""
    import os
    import signal
    import urllib.request

    from tests.helpers import free_port, run_cli, wait_for

    ws, run_dir, result = trained
    client, (run,) = runs_of(ws)
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    uri = f"models:/{model.model_id}"
    said = f"  model    : {uri}  (serve it: tunelab serve {run.info.run_id})"
    assert said in result.stdout.splitlines(), result.stdout
    assert run.data.tags["tunelab.model_uri"] == uri
    listed = run_cli("runs", "--uri", ws.uri, cwd=ws.root).stdout
    assert uri in listed.splitlines()[1], listed
    assert f"tunelab serve {run.info.run_id}" in (run_dir / "model" / "README.md").read_text()
    port = free_port()
    fresh = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "tunelab"), "serve", run.info.run_id, "--port",
         str(port), "--uri", ws.uri],
        cwd=tmp_path, env=fresh, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(answers, proc, timeout=240)
        served = invoke(url, {"inputs": [PROMPT], "params": {"max_new_tokens": 2}})
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in its terminal
        out = proc.communicate(timeout=60)[0]
    assert served["predictions"] == [PROMPT + continuation(run_dir / "model", PROMPT, 2)]
    assert proc.returncode == 0, out[-3000:]
    assert out.splitlines()[0] == (
        f'tunelab: serving {uri} at {url}/invocations (POST {{"inputs": [...]}}; Ctrl-C stops it)'
    )
    assert "Traceback" not in out and out.rstrip().endswith("tunelab: model server stopped")


def test_run_records_sizes_datasets_throughput_and_system_metrics(trained):
    ws, run_dir, _ = trained
    client, (run,) = runs_of(ws)
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
    # Trainer's bookkeeping is kept as tags, out of the metric charts.
    charted = set(run.data.metrics)
    assert not charted & {"epoch", "total_flos", "train_runtime", "eval_runtime",
                          "num_input_tokens_seen", "train_samples_per_second"}, charted  # fmt: skip
    assert float(tags["trainer.train_runtime"]) > 0 and float(tags["trainer.total_flos"]) > 0
    assert float(tags["trainer.epoch"]) > 0


def test_artifacts_live_beside_the_store(trained):
    ws, _, _ = trained
    _, (run,) = runs_of(ws)
    assert run.info.artifact_uri.startswith((ws.root / "mlartifacts").as_uri())


def test_long_param_values_are_truncated_not_dropped():
    from tunelab.tracking import MAX_PARAM_VALUE, flatten

    flat = flatten({"a": {"b": "x" * 10_000, "c": [1, 2]}})
    assert len(flat["a.b"]) == MAX_PARAM_VALUE and flat["a.b"].endswith("...[truncated]")
    assert flat["a.c"] == "[1, 2]"


@NO_CUDA
def test_failing_run_is_marked_failed(workspace):
    # No CUDA device here: found when the Trainer is built, after tracking began.
    result = workspace.train("training.device=cuda", "checkpoint=none", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "training.device: cuda, but this machine has no CUDA device" in result.stderr
    _, (run,) = runs_of(workspace)
    assert run.info.status == "FAILED"
    assert "no CUDA device" in run.data.tags["tunelab.error"]
    assert not (workspace.run_dirs()[0] / "model").exists()


@NO_CUDA
def test_fsdp_without_gpus_is_one_line(workspace):
    # FSDP runs on CUDA GPUs only: asked for on this CPU machine, it is refused, not ignored.
    result = workspace.train("training.fsdp=true", "checkpoint=none", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "training.fsdp: true needs CUDA GPUs" in result.stderr, result.stderr


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


def test_tracking_none_trains_without_mlflow(tmp_path):
    ws = new_workspace(tmp_path, store=None)
    ws.train("tracking=none", "checkpoint=none")
    (run_dir,) = ws.run_dirs()
    assert (run_dir / "model" / "manifest.json").is_file()
    assert not (ws.root / "mlflow.db").exists()
    assert not (ws.root / "mlartifacts").exists()


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
    from tests.helpers import run_cli

    run_cli(
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
    assert manifest["step"] == 8 and manifests.verify_manifest(run_dir / "model") == []
    # Fine-tuned: the same architecture and tokenizer, other weights.
    first, tuned = first_run / "model", run_dir / "model"
    assert (tuned / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert json.loads((tuned / "config.json").read_text())["n_embd"] == 32
    assert (tuned / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
    assert_reloads_as_stored(tuned)


@pytest.mark.slow  # two real processes
def test_a_run_prints_its_own_lines_and_one_bar_and_minus_v_the_rest(trained, workspace):
    """Fine-tuning a model directory on a jsonl file, as a terminal shows it: tunelab's lines
    and one bar with the loss in its postfix; no line of the libraries' INFO chatter, Trainer's
    dicts, their bars or MLflow's dataset-source warning, all of which train.log keeps. With
    -v the libraries print as they would."""
    _, first_run, _ = trained
    rows = [{"prompt": f"{a:02d}+{b:02d}=", "completion": f"{a + b:03d}"}
            for a in range(8) for b in range(8)]  # fmt: skip
    train = workspace.root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = [o for o in TINY if not o.startswith(("model.", "data.", "training.progress_bar"))]
    command = [*tiny, "model=hf", f"model.name_or_path={first_run / 'model'}",
               "data=text_files", f"data.train={train}", "data.max_length=16",
               "checkpoint=none"]  # fmt: skip

    def run(*extra: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "tunelab", "train", *extra, *workspace.base(), *command],
            cwd=workspace.root, env=env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    out = run()
    assert "tunelab: run finished" in out and "loss=" in out, out[-3000:]
    chatter = ("INFO mlflow", "{'loss'", "{'eval_loss'", "Map", "Loading weights",
               "Downloading artifacts", "UserWarning", "Warning:")  # fmt: skip
    said = [line for line in out.splitlines() if any(c in line for c in chatter)]
    assert not said, said
    (run_dir,) = workspace.run_dirs()
    kept = (run_dir / "train.log").read_text()
    assert "{'loss'" in kept and "system_metrics" in kept, kept[-2000:]
    shutil.rmtree(run_dir)
    loud = run("-v")
    assert "{'loss'" in loud and "INFO mlflow" in loud, loud[-3000:]
