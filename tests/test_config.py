"""The config composes, validates and names runs without touching torch, transformers or mlflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import env, tunelab
from tunelab import config, preflight


def test_default_config_composes_and_validates():
    cfg = config.compose()
    assert preflight.job_problems(cfg) == []
    assert cfg.model.arch.model_type == "gpt2"
    assert cfg.data.type == "addition"
    assert cfg.checkpoint.strategy == "steps"
    assert cfg.tracking.backend == "mlflow"
    assert cfg.resume == "auto"


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=addition_small"],
        ["experiment=lr_batch_grid"],
        ["checkpoint=epoch"],
        ["checkpoint=none"],
        ["checkpoint=best", "checkpoint.metric=eval_exact_match"],
        ["tracking=none"],
        ["model=hf", "model.name_or_path={tmp}/model"],
        ["data=text_files", "data.train={tmp}/train.jsonl"],
    ],
)
def test_presets_compose_and_validate(overrides, tmp_path):
    (tmp_path / "model").mkdir()
    for name in ("model/config.json", "model/model.safetensors", "train.jsonl"):
        (tmp_path / name).write_text("{}")
    cfg = config.compose([o.format(tmp=tmp_path) for o in overrides])
    assert preflight.job_problems(cfg) == [], overrides


def test_experiment_preset_overrides_only_what_differs():
    cfg = config.compose(["experiment=addition_small"])
    assert cfg.data.digits == 2 and cfg.tracking.experiment == "addition_small"
    assert cfg.checkpoint.strategy == "none"
    assert cfg.training.lr == config.compose().training.lr  # untouched keys keep the defaults


def test_validation_reports_every_problem_with_key_and_allowed_values():
    cfg = config.compose(["training.lr=-1", "checkpoint.keep=0", "tracking.log_checkpoints=some"])
    problems = config.problems(cfg)
    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert "training.lr" in text and "checkpoint.keep" in text
    assert "tracking.log_checkpoints: 'some' is not one of none, last, best, all" in text


def test_validation_names_unknown_keys_with_a_suggestion():
    cfg = config.compose()
    OmegaConf.set_struct(cfg, False)
    cfg.training.lrr = 1.0
    (problem,) = config.problems(cfg)
    assert problem.startswith("training.lrr: unknown key (did you mean training.lr?)")


def test_validation_catches_impossible_combinations():
    cfg = config.compose(["checkpoint=best", "checkpoint.metric=null", "data.eval_size=0"])
    problems = config.problems(cfg)
    assert any(p.startswith("checkpoint.metric: required") for p in problems)
    assert any("needs an eval set" in p for p in problems)
    assert config.problems(config.compose(["model=hf"])) == [
        "model.name_or_path: required, set it on the command line (model.name_or_path=...)"
    ]


def test_config_checks_values_and_preflight_what_they_point_at(tmp_path):
    missing = tmp_path / "no-model"
    cfg = config.compose(["model=hf", f"model.name_or_path={missing}", f"output.root={tmp_path}"])
    assert config.problems(cfg) == []
    assert preflight.job_problems(cfg) == [
        f"model.name_or_path: {missing} does not exist (a local model directory)"
    ]


def test_config_imports_only_the_ground_floor():
    probe = "import sys, tunelab.config; print(*sorted(m for m in sys.modules if 'tunelab' in m))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env())
    outside = [m for m in out.stdout.split() if not m.startswith("tunelab.config")]
    ground = ["tunelab", "tunelab.constants", "tunelab.errors", "tunelab.metrics", "tunelab.paths"]
    assert outside == ground, out


def test_a_fresh_run_directory_takes_the_suffix_it_is_handed():
    assert config.run_dir_name(["seed=1"]) == "seed-1"
    try:
        config.set_fresh_suffix("20250101-000000-7")  # under torchrun: rank 0's, on every rank
        assert config.run_dir_name(["seed=1"], "never") == "seed-1@20250101-000000-7"
    finally:
        config.set_fresh_suffix(config.own_fresh_suffix())
    assert config.run_dir_name(["seed=1"], "never") == f"seed-1@{config.own_fresh_suffix()}"


def test_a_runs_mlflow_name_leads_with_what_sets_it_apart():
    """The two runs a user could not tell apart (a full fine-tune and a LoRA run of the same
    data): model, task, peft and the learning rate first, paths as file stems, numbers to 3
    significant digits; the directory name is unchanged, and `name=` sets the name alone."""
    common = [
        "checkpoint.every=15", "data.eval=/tmp/x/intents_eval.csv", "model=hf",
        "data.label_column=intent", "data.train=/tmp/x/intents_train.csv", "data=text_files",
        "model.name_or_path=/models/all-MiniLM-L6-v2", "model.task=sequence_classification",
    ]  # fmt: skip
    full = config.display_name([*common, "training.lr=0.0008459126528049375"])
    lora = config.display_name([*common, "peft=lora", "training.lr=3e-4"])
    assert full.startswith("model=all-MiniLM-L6-v2 task=cls train=intents_train lr=0.000846 ")
    assert lora.startswith("model=all-MiniLM-L6-v2 task=cls peft=lora train=intents_train ")
    assert "lr=0.0003 " in lora and full != lora
    assert config.display_name([]) == "default"
    assert config.display_name(["seed=1"], "my baseline") == "my baseline"
    assert config.run_name(["seed=1", "name=my baseline"]) == config.run_name(["seed=1"])
    assert (
        config.display_name(["model.name_or_path=/o/tunelab/run-a1/model"]) == "model=run-a1/model"
    )


def test_run_name_is_stable_readable_and_safe():
    a = config.run_name(["training.lr=1e-4", "seed=2"])
    assert a == config.run_name(["seed=2", "training.lr=1e-4"]) == "seed-2+training.lr-1e-4"
    assert config.run_name([]) == "default"
    # Overrides that do not change what is trained do not change the directory.
    assert config.run_name(["resume=never", "tracking.uri=x", "output.root=/y"]) == "default"
    odd = config.run_name(["data.train=a/b,c.jsonl"])
    assert "/" not in odd and "," not in odd and odd.startswith("data.train-a_b_c.jsonl-")
    assert odd != config.run_name(["data.train=a_b,c.jsonl"])  # the hash keeps them apart
    long = config.run_name([f"model.name_or_path={'x' * 300}"])
    assert len(long) <= 130
    # The name itself is a valid unquoted Hydra override value.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(f"model.name_or_path=/runs/{odd}/model")
    assert parsed.value() == f"/runs/{odd}/model"


def test_cli_config_paths_do_not_import_heavy_libraries(tmp_path):
    probe = (
        "import sys\n"
        "from tunelab.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    for args in (["--help"], ["train", "--cfg", "job"], ["train", "training.lr=-1"]):
        proc = subprocess.run(
            [sys.executable, "-c", probe, *args],
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "HEAVY []" in proc.stderr, (args, proc.stderr)


def test_config_error_exits_2_and_creates_nothing(tmp_path):
    proc = tunelab(
        "train",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "training.lr=-1",
        "checkpoint.every=0",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tunelab: config error:")]
    assert len(lines) == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_python_dash_m_and_console_script_agree(tmp_path):
    out = tunelab("train", "--cfg", "job", "seed=7", cwd=tmp_path).stdout
    script = Path(sys.executable).parent / "tunelab"
    assert script.exists(), "the console script is installed beside the interpreter"
    direct = subprocess.run(
        [str(script), "train", "--cfg", "job", "seed=7"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env(),
    )
    assert direct.stdout == out and "seed: 7" in out
