"""LoRA through peft (peft=lora): real tiny models trained for real steps.

A base GPT-2 (~40k parameters) is trained once per module, in process; LoRA runs fine-tune it as
`model=hf model.name_or_path=<its model/>`. Only the kill -9 resume test uses subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY, committed_steps, env, run_here, tunelab, wait_for
from tunelab import checkpoints, config, files, manifests, preflight
from tunelab.checkpoints import snapshots

# Written by the test, not taken from the code under test: what unpickles on load.
PICKLES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}

# TINY without the from-scratch architecture (model=hf has none), and a learning rate at which 8
# steps move the adapter visibly.
DATA_AND_TRAINING = [o for o in TINY if not o.startswith("model.arch.")] + ["training.lr=0.01"]
CKPT = ["checkpoint=steps", "checkpoint.every=4", "checkpoint.keep=2"]


def lora_overrides(base: Path, *extra: str) -> list[str]:
    return [
        *DATA_AND_TRAINING,
        "model=hf",
        f"model.name_or_path={base}",
        "peft=lora",
        *CKPT,
        *extra,
    ]


def train(root: Path, run: str, overrides: list[str], tracking: list[str] | None = None):
    """One run in this process (much faster than a subprocess): `root/run`."""
    return run_here(overrides, root / run, *(tracking or ["tracking=none"]), f"output.root={root}")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 trained from scratch: the base model of the LoRA runs."""
    root = tmp_path_factory.mktemp("base")
    overrides = [*TINY, "checkpoint=none"]
    return train(root, "base", overrides).artifact_dir


@pytest.fixture(scope="module")
def lora(base: Path, tmp_path_factory: pytest.TempPathFactory):
    """A LoRA run on `base`, tracked in a sqlite store, with a checkpoint every 4 of its 8 steps."""
    root = tmp_path_factory.mktemp("lora")
    uri = f"sqlite:///{root / 'm.db'}"
    tracking = [f"tracking.uri={uri}", "tracking.system_metrics=false"]
    result = train(root, "run", lora_overrides(base), tracking)
    return result, uri


def test_the_artifact_holds_the_merged_model_and_the_adapter(base, lora):
    result, _ = lora
    model_dir = result.artifact_dir
    names = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*"))
    assert "model.safetensors" in names and "config.json" in names  # the merged model, at the root
    assert [n for n in names if n.startswith("adapter")] == [
        "adapter",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ]
    assert not (model_dir / "adapter_config.json").exists()  # the root is a plain model
    assert manifests.verify_manifest(model_dir) == []  # adapter/ files listed and verified
    peft = manifests.read_manifest(model_dir)["peft"]
    assert peft["method"] == "lora" and peft["r"] == 8 and peft["alpha"] == 16
    assert peft["target_modules"] == ["c_attn"]  # peft's default for GPT-2
    assert peft["base_model"] == str(base.resolve())
    assert peft["base_weights_sha256"] == {
        "model.safetensors": files.sha256_file(base / "model.safetensors")
    }
    adapter_config = json.loads((model_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base.resolve())
    # No pickle anywhere, but Trainer's RNG state in checkpoints (read with weights_only=True).
    pickles = [p for p in result.run_dir.rglob("*") if p.suffix in PICKLES]
    assert {p.name for p in pickles} <= {"rng_state.pth"}
    assert not [p for p in pickles if "checkpoint-" not in p.parent.name]
    assert "adapter/" in (model_dir / "README.md").read_text()


def test_the_merged_model_loads_without_peft_and_the_adapter_gives_the_same_logits(base, lora):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = lora[0].artifact_dir
    out = model_dir.parent / "merged_logits.safetensors"
    script = f"""
import sys
sys.modules["peft"] = None  # peft cannot be imported in this process
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    import peft
except ImportError:
    pass
else:
    raise SystemExit("peft is importable")
tok = AutoTokenizer.from_pretrained({str(model_dir)!r})
model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}).eval()
ids = tok(["12+34=", "99+01="], return_tensors="pt")["input_ids"]
with torch.no_grad():
    save_file({{"logits": model(ids).logits.contiguous(), "ids": ids}}, {str(out)!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = load_file(out)

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert torch.equal(tok(["12+34=", "99+01="], return_tensors="pt")["input_ids"], merged["ids"])
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        base_logits = plain(merged["ids"]).logits
    adapted = PeftModel.from_pretrained(plain, model_dir / "adapter").eval()
    with torch.no_grad():
        adapter_logits = adapted(merged["ids"]).logits
    torch.testing.assert_close(adapter_logits, merged["logits"], rtol=1e-5, atol=1e-5)
    assert (merged["logits"] - base_logits).abs().max() > 1e-3  # the adapter changed the model


def test_checkpoints_hold_only_the_adapter_and_its_optimizer_state(base, lora):
    from safetensors.torch import load_file

    result, _ = lora
    trainable = manifests.read_manifest(result.artifact_dir)["peft"]["trainable_parameters"]
    full_weights = (base / "model.safetensors").stat().st_size
    root = result.run_dir / "checkpoints"
    assert [checkpoints.step_of(p) for p in checkpoints.committed(root)] == [8, 4]
    for ckpt in checkpoints.committed(root):
        names = {p.name for p in ckpt.iterdir()}
        assert {
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.safetensors",
        } <= names
        assert not names & {"model.safetensors", "config.json", "optimizer.pt"}, names
        assert manifests.verify_manifest(ckpt) == []
        adapter = load_file(ckpt / "adapter_model.safetensors")
        assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
        assert sum(t.numel() for t in adapter.values()) == trainable
        assert (ckpt / "adapter_model.safetensors").stat().st_size < full_weights / 4
        # Adam's two moments for the adapter's parameters, nothing for the frozen ones.
        optimizer = snapshots.load_optimizer(ckpt)
        assert sum(t.numel() for s in optimizer["state"].values() for t in s.values()) == (
            2 * trainable + len(optimizer["state"])  # + one step count per parameter
        )
        assert (ckpt / "optimizer.safetensors").stat().st_size < full_weights / 2


def test_synchronous_checkpoints_hold_the_same_adapter(base, lora, tmp_path):
    """Trainer's own write (PeftModel.save_pretrained) and the background one agree."""
    import torch
    from safetensors.torch import load_file

    background = lora[0].run_dir / "checkpoints" / "checkpoint-8"
    sync = train(tmp_path, "sync", lora_overrides(base, "checkpoint.async_write=false"))
    ckpt = sync.run_dir / "checkpoints" / "checkpoint-8"
    assert not {"model.safetensors", "config.json"} & {p.name for p in ckpt.iterdir()}
    assert manifests.verify_manifest(ckpt) == []
    a = load_file(ckpt / "adapter_model.safetensors")
    b = load_file(background / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    config_a = json.loads((ckpt / "adapter_config.json").read_text())
    assert config_a == json.loads((background / "adapter_config.json").read_text())


def test_mlflow_has_trainable_below_total_and_exports_the_adapter(lora, tmp_path):
    from mlflow import MlflowClient

    from tunelab.tracking import download_model

    result, uri = lora
    run = MlflowClient(tracking_uri=uri).get_run(result.run_id)
    params = run.data.params
    total, trainable = int(params["model.parameters"]), int(params["model.trainable_parameters"])
    assert trainable == manifests.read_manifest(result.artifact_dir)["peft"]["trainable_parameters"]
    assert 0 < trainable < total / 10
    assert params["peft.method"] == "lora" and params["peft.r"] == "8"
    exported = download_model(result.run_id, tmp_path / "export", uri)  # = tunelab export
    assert (exported / "adapter" / "adapter_model.safetensors").is_file()
    assert manifests.verify_manifest(exported) == []


def test_lora_on_a_model_built_from_config(tmp_path):
    """The default tiny GPT-2 from config: no base on disk, so none is named or hashed; the
    base is rebuilt by the same config and seed, and the adapter on it is the merged model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from tunelab import data, tasks
    from tunelab import model as models

    overrides = [*TINY, "peft=lora", "checkpoint=none", "training.lr=0.01"]
    result = train(tmp_path, "run", overrides)
    peft = manifests.read_manifest(result.artifact_dir)["peft"]
    assert peft["base_model"] is None and peft["base_weights_sha256"] is None
    assert (result.artifact_dir / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(result.artifact_dir).eval()
    # The base as the run built it: the same config, tokenizer and seed.
    cfg = config.compose([*overrides, f"output.root={tmp_path}"])
    tok = AutoTokenizer.from_pretrained(result.artifact_dir)
    set_seed(cfg.seed)
    rows = data.load(cfg.data, tmp_path / ".cache" / "datasets")
    base = models.load_model(cfg.model, tok, None, tasks.get("causal_lm"), rows).eval()
    ids = tok(["12+34=", "99+01="], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, result.artifact_dir / "adapter").eval()
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)
    assert (merged(ids).logits - base_logits).abs().max() > 1e-3  # the adapter changed it


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["peft.r=0"], "peft.r: 0 is below the minimum 1"),
        (["peft.r=2.5"], "peft.r: expected int, got 2.5"),
        (["peft.alpha=0"], "peft.alpha: 0 must be greater than 0.0"),
        (["peft.dropout=1"], "peft.dropout: 1 must be less than 1.0"),
        (["peft.dropout=-0.1"], "peft.dropout: -0.1 is below the minimum 0.0"),
        (["peft.bias=some"], "peft.bias: 'some' is not one of none, all, lora_only"),
        (["peft.target_modules=[]"], "peft.target_modules: [] is not a list of module names"),
        (["peft.method=prefix"], "peft.method: 'prefix' is not one of ['lora', 'none']"),
    ],
)
def test_bad_lora_values_are_config_errors(overrides, problem):
    assert [
        p[: len(problem)] for p in config.problems(config.compose(["peft=lora", *overrides]))
    ] == [problem]


def test_an_adapter_checkpoint_is_not_resumed_as_a_full_model(lora):
    ckpt = lora[0].run_dir / "checkpoints" / "checkpoint-8"
    assert preflight.job_problems(config.compose([f"resume={ckpt}"])) == [
        f"resume: {ckpt} holds a LoRA adapter (peft=lora); resume it with the peft it was "
        "trained with"
    ]


def test_a_bad_lora_value_stops_the_cli_with_one_line(tmp_path):
    proc = tunelab(
        "train", "peft=lora", "peft.r=0", f"output.root={tmp_path}", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tunelab: config error: peft.r: 0 is below the minimum 1"
    ]
    assert not list(tmp_path.iterdir())  # no output directory, no store


def test_target_modules_that_match_nothing_are_named(tmp_path):
    overrides = [*TINY, "peft=lora", "peft.target_modules=[q_proj]", "checkpoint=none"]
    with pytest.raises(
        config.ConfigError, match=r"peft.target_modules: \['q_proj'\]: Target modules"
    ):
        train(tmp_path, "run", overrides)


@pytest.mark.slow
def test_resume_after_kill_9_ends_bit_exact(base, tmp_path):
    """Killed (SIGKILL) after its second committed checkpoint, then the identical command again:
    the merged weights are byte for byte those of an uninterrupted run."""
    args = [
        *lora_overrides(base, "training.max_steps=20", "training.eval_every=10"),
        "tracking=none",
    ]

    def command(root: Path) -> list[str]:
        return [sys.executable, "-m", "tunelab", "train", *args, f"output.root={root}"]

    straight = subprocess.run(command(tmp_path / "a"), env=env(), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    root, log = tmp_path / "b", tmp_path / "killed.log"
    # Each commit held 1 s (the snapshot is taken before): the run is still going, seconds
    # from its end, when the test sees the second checkpoint, however loaded the machine.
    slow = {**env(), "TUNELAB_TEST_COMMIT_DELAY": "1"}
    with log.open("w") as out:  # a file, not a pipe nobody reads while it trains
        proc = subprocess.Popen(command(root), env=slow, stdout=out, stderr=subprocess.STDOUT)

    def newest() -> int:
        dirs = root.glob("tunelab/*/checkpoints")
        return max([0, *(step for d in dirs for step in committed_steps(d))])

    wait_for(lambda: newest() >= 8, proc, timeout=300)
    proc.kill()
    proc.wait()
    (run_dir,) = root.glob("tunelab/*")
    assert not (run_dir / "model").exists()  # killed before the end

    resumed = subprocess.run(command(root), env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    (straight_dir,) = (tmp_path / "a").glob("tunelab/*")
    assert straight_dir.name == run_dir.name
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert files.sha256_file(run_dir / "model" / name) == files.sha256_file(
            straight_dir / "model" / name
        ), name
