# ruff: noqa: E501  (table-driven: one case per line reads best)
"""Bad input never costs a run: one clear line per problem, exit 2, nothing created."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import TINY, env, files_cfg, new_workspace, run_cli
from tunelab import config, data, manifests, preflight
from tunelab.tasks import causal_lm

# (arguments after `tunelab train`, lines the error must hold)
CASES = [
    (["training.lrr=1"], ["training.lrr: unknown key (did you mean training.lr?)"]),
    (["model.arch.n_embdd=3"], ["model.arch.n_embdd: unknown key (did you mean model.arch.n_embd?)"]),
    (["chekpoint=steps"], ["chekpoint: unknown key (did you mean checkpoint?)"]),
    (["data=text_files", "data.train=x.jsonl", "data.digits=2"], ["data.digits: unknown key; allowed: cache_max_age_days, cache_max_gb, completion_column, eval, eval_fraction"]),
    (["checkpoint=stepz"], ["checkpoint=stepz: no such option (did you mean checkpoint=steps?); options: best, epoch, none, steps"]),
    (["training.lr=[1,"], ["'training.lr=[1,': not a valid override"]),
    (["training.lr=-1", "checkpoint.keep=0"], ["training.lr: -1 must be greater than 0.0", "checkpoint.keep: 0 is below the minimum 1"]),
    (["checkpoint.every=0"], ["checkpoint.every: 0 is below the minimum 1"]),
    (["training.lr=fast"], ["training.lr: expected float, got 'fast'"]),
    (["checkpoint=best", "data.eval_size=0"], ["checkpoint=best: needs an eval set"]),
    (["checkpoint.metric=eval_bleu"], ["checkpoint.metric: 'eval_bleu' is not produced by this task"]),
    (["resume=/no/such/checkpoint"], ["resume: '/no/such/checkpoint' is not auto, never or an existing checkpoint path"]),
    (["model=hf", "model.name_or_path=/no/such/model"], ["model.name_or_path: /no/such/model does not exist"]),
    (["model=hf", "model.name_or_path=someorg/somemodel"], ["looks like a Hugging Face hub id, but the hub is offline"]),
    (["data=text_files", "data.train=/no/such.jsonl"], ["data.train: /no/such.jsonl does not exist"]),
    (["data.max_length=100"], ["data.max_length: 100 is longer than the model's model.arch.n_positions=64"]),
    (["-m", "training.lr=1e-3,-1"], ["training.lr: -1 must be greater than 0.0 (in 1 of 2 jobs, e.g. training.lr=-1)"]),
    (["-m", "training.lr=interval(-1,1)"], ["training.lr: -1.0 must be greater than 0.0 (in 1 of 2 jobs"]),
]  # fmt: skip


def assert_one_line_per_problem(returncode: int, stderr: str, expected: list[str]) -> None:
    assert returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert all(line.startswith("tunelab: config error: ") for line in lines), lines
    assert len(lines) == len(expected), lines
    for want in expected:
        assert any(want in line for line in lines), (want, lines)


@pytest.mark.parametrize(("args", "expected"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_config_is_one_line_per_problem_exit_2_and_nothing_created(tmp_path, args, expected):
    # In this process: the CLI's own exit status, stderr and (empty) working directory.
    result = run_cli("train", *args, cwd=tmp_path, check=False, light=True)
    assert_one_line_per_problem(result.returncode, result.stderr, expected)
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no outputs/, multirun/, mlflow.db


@pytest.mark.parametrize("case", [CASES[0], CASES[-2]], ids=["run", "sweep"])
def test_a_bad_config_in_a_real_process_too(tmp_path, case):
    args, expected = case
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", *args],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert_one_line_per_problem(proc.returncode, proc.stderr, expected)
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_output_root_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = config.compose([f"output.root={blocker / 'out'}"])
    assert preflight.job_problems(cfg) == [f"output.root: {blocker / 'out'}: {blocker} is a file, not a directory"]  # fmt: skip


def test_a_full_output_disk_is_refused_before_anything_starts(small_disk):
    (small_disk / "filler").write_bytes(b"\0" * (900 * 1024))
    cfg = config.compose([f"output.root={small_disk / 'out'}"])
    (problem,) = preflight.job_problems(cfg)
    assert problem.startswith(f"output.root: {small_disk / 'out'} is full (")


def _pickle_only_model(tmp_path: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    out = tmp_path / "pickled"
    model.save_pretrained(out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return out


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path):
    source = _pickle_only_model(tmp_path)
    cfg = config.compose(["model=hf", f"model.name_or_path={source}"])
    (problem,) = preflight.job_problems(cfg)
    assert problem.startswith(f"model.name_or_path: {source} holds only pickle weights")
    assert "model.allow_pickle=true" in problem
    allowed = config.compose(
        ["model=hf", f"model.name_or_path={source}", "model.allow_pickle=true"]
    )
    assert preflight.job_problems(allowed) == []


def test_long_rows_are_counted_and_truncated_or_refused(tmp_path, caplog):
    from tunelab import model as models

    path = tmp_path / "rows.jsonl"
    rows = [{"text": "x" * n} for n in (5, 50, 60, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = files_cfg(path, max_length=20, eval_fraction=0)
    loaded = data.load(cfg, tmp_path / "cache")
    tok = models.train_tokenizer(loaded.texts())
    with caplog.at_level("WARNING", logger="tunelab"):
        out = causal_lm.tokenize(loaded.train, tok, 20)
    assert out.truncated_rows == 2 and max(len(ids) for ids in out.dataset["input_ids"]) == 20
    assert "2 of 4 train rows were longer than data.max_length=20 tokens" in caplog.text
    with pytest.raises(data.DataError, match=r"data.max_length: 2 of 4 train rows are longer"):
        causal_lm.tokenize(loaded.train, tok, 20, truncate=False)


def test_a_bad_data_file_stops_before_an_mlflow_run_exists(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "12+34=46"}\n{"text": \n')
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny = [o for o in TINY if not o.startswith("data.") or o.startswith("data.max_length")]
    args = [f"output.root={tmp_path / 'out'}", f"tracking.uri={uri}", *tiny]
    result = run_cli(
        "train", *args, "data=text_files", f"data.train={path}", cwd=tmp_path, check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"tunelab: config error: data.train: {path} line 2: not valid JSON" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    # The same process goes on as if nothing had happened (the refused run's removed directory
    # held the log file MLflow's logger had been lent): MLflow logs as it makes a new store.
    from mlflow import MlflowClient

    assert MlflowClient(f"sqlite:///{tmp_path / 'other.db'}").search_experiments()


def test_configs_and_code_in_a_model_directory_are_data_never_run(trained, tmp_path, empty_store):
    """A model directory whose config.json names custom code (auto_map) and whose tunelab.yaml
    asks Hydra to instantiate something: tunelab trains from it without running either."""
    import shutil

    _, run_dir, _ = trained
    ws = new_workspace(tmp_path / "ws", empty_store)
    source = tmp_path / "model"
    shutil.copytree(run_dir / "model", source)
    marker = tmp_path / "EXECUTED"
    (source / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((source / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Evil", "AutoConfig": "evil.EvilConfig"}
    (source / "config.json").chmod(0o644)
    (source / "config.json").write_text(json.dumps(cfg))
    (source / "tunelab.yaml").chmod(0o644)
    (source / "tunelab.yaml").write_text(
        f"_target_: os.system\ncommand: touch {marker}\nhydra:\n  callbacks:\n"
        f"    x:\n      _target_: os.system\n      command: touch {marker}\n"
    )
    tiny = [o for o in TINY if not o.startswith("model.")]
    args = [*ws.base(), *tiny, "model=hf", f"model.name_or_path={source}", "checkpoint=none"]
    result = run_cli("train", *args, cwd=ws.root, check=False)
    assert not marker.exists()
    assert result.returncode == 0, result.stderr[-3000:]  # gpt2 is built in: auto_map is ignored
    (trained_dir,) = ws.run_dirs()
    assert manifests.read_manifest(trained_dir / "model")["base_model"] == str(source)


OVERRIDE_CHARS = "abcdeghiklmnoprstuvxy._=+~,:[](){}$'\" 0123456789-/*@"
KEYS = ["training.lr", "checkpoint", "checkpoint.keep", "model.arch.n_embd", "data", "seed",
        "hydra.run.dir", "+x", "~training.lr", "training"]  # fmt: skip


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.text(OVERRIDE_CHARS, max_size=24),
            st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(OVERRIDE_CHARS, max_size=12)),
        ),
        max_size=3,
    ),
    st.booleans(),
)  # fmt: skip
def test_random_overrides_never_raise_only_problem_lines(overrides, multirun):
    args = (["-m"] if multirun else []) + [o for o in overrides if not o.startswith("-")]
    problems = preflight.check_jobs(args)
    assert isinstance(problems, list)
    assert all(isinstance(p, str) and p and "\n" not in p for p in problems), problems


@pytest.mark.parametrize(
    "args",
    [
        ["--nproc_per_node", "2", "script.py"],
        ["--nproc_per_node", "2", "-m", "tunelab", "train"],
        ["--nproc_per_node", "2"],
    ],  # fmt: skip
)
def test_tunelab_launch_runs_train_only_and_says_so(tmp_path, args):
    result = run_cli("launch", "--standalone", *args, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[0].startswith("usage: tunelab launch")
    assert not list(tmp_path.iterdir())  # nothing started, nothing written
