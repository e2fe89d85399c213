"""The final artifact as its run's MLflow Logged Model, stored once: its Auto class and the
transformers pipeline that serves it read from the artifact's own manifest, the files linked or
uploaded, the transformers flavor (MLmodel) beside them, the final metrics linked to it."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from tunelab import artifacts, files, manifests, metrics
from tunelab.tracking.values import metric_key

log = logging.getLogger("tunelab")

# What MLflow keeps beside the Hugging Face files of a Logged Model (the flavor's MLmodel and
# its copy of the tokenizer) or adds to a download of one (registered_model_meta): not part of
# the artifact, so not left in a downloaded one.
MLFLOW_FILES = ("MLmodel", "components", "registered_model_meta")

# The transformers pipeline task serving each Auto class an artifact's manifest names, and the
# pipeline class MLflow's transformers flavor instantiates for it.
PIPELINES = {
    "AutoModelForCausalLM": ("text-generation", "TextGenerationPipeline"),
    "AutoModelForSequenceClassification": ("text-classification", "TextClassificationPipeline"),
    "AutoModelForTokenClassification": ("token-classification", "TokenClassificationPipeline"),
}


def log_model(
    client: Any,
    experiment_id: str,
    run_id: str,
    local_dir: Path,
    final: dict[str, Any],
    step: int,
    replace_earlier: bool = False,
) -> str:
    """The Hugging Face directory `local_dir` as the Logged Model `model` of run `run_id`:
    uploaded once, as the model's artifacts (MLflow 3 serves them under runs:/ID/model too),
    with the final eval metrics linked to it. `replace_earlier`: the run's earlier process may
    have left a half-finished one (a continued run): deleted first. Returns the model id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    manifest = manifests.read_manifest(local_dir)
    task = str(manifest.get("task") or "causal_lm")
    auto_class = str(manifest.get("auto_class") or "AutoModelForCausalLM")
    if auto_class not in PIPELINES:
        raise ValueError(f"{local_dir}: no transformers pipeline is known to serve {auto_class}")
    if replace_earlier:
        for old in _logged_models(client, experiment_id, run_id):
            client.delete_logged_model(old.model_id)
    model = client.create_logged_model(
        experiment_id,
        name="model",
        source_run_id=run_id,
        tags={"tunelab.format": "huggingface", "tunelab.loader": auto_class},
        model_type=f"transformers/{task}",
    )
    if not _link_into(model.artifact_location, local_dir):
        client.log_model_artifacts(model.model_id, str(local_dir))
    _log_transformers_flavor(client, model.model_id, local_dir, *PIPELINES[auto_class])
    now = int(time.time() * 1000)
    linked = [
        Metric(metric_key(k), v, now, step, model_id=model.model_id)
        for k, v in metrics.final(final).items()
    ]
    if linked:
        client.log_batch(run_id, metrics=linked)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    return str(model.model_id)


def _log_transformers_flavor(
    client: Any, model_id: str, local_dir: Path, pipeline: str, pipeline_class: str
) -> None:
    """An MLmodel file beside the Hugging Face files, so `mlflow.transformers.load_model` and
    pyfunc load the logged model too. It points the flavor's weights at the directory itself
    (model_binary ".") rather than a copy; only the tokenizer files (small) are repeated under
    components/tokenizer/, where the flavor looks for them."""
    import shutil
    import tempfile

    import transformers
    from mlflow.models import Model

    weights_and_ours = ("model.safetensors", "model-", "config.json", "generation_config.json",
                        artifacts.CONFIG, manifests.MANIFEST, "README.md")  # fmt: skip
    arch = files.read_json(local_dir / "config.json").get("architectures") or ["?"]
    tok_class = files.read_json(local_dir / "tokenizer_config.json").get("tokenizer_class")
    with tempfile.TemporaryDirectory() as tmp:
        components = Path(tmp, "components", "tokenizer")
        components.mkdir(parents=True)
        for file in local_dir.iterdir():
            if file.is_file() and not file.name.startswith(weights_and_ours):
                shutil.copy2(file, components / file.name)
        flavor = Model(model_id=model_id, signature=_signature(pipeline))
        flavor.add_flavor(
            "transformers",
            transformers_version=transformers.__version__,
            code=None,
            task=pipeline,
            instance_type=pipeline_class,
            pipeline_model_type=arch[0],
            source_model_name="tunelab",
            framework="pt",
            model_binary=".",
            components=["tokenizer"],
            tokenizer_type=tok_class or "PreTrainedTokenizerFast",
        )
        flavor.add_flavor("python_function", loader_module="mlflow.transformers")
        flavor.save(str(Path(tmp, "MLmodel")))
        client.log_model_artifacts(model_id, tmp)


def _signature(pipeline: str) -> Any:
    """Texts in; generated text (the prompt and its continuation), or a label and its score,
    out. With it the scoring server (`mlflow models serve`) takes `{"inputs": ["...", ...]}` as
    a column of strings. A generator also takes `"params": {"max_new_tokens": N, "do_sample":
    true}`; by default it decodes greedily (a text-generation pipeline samples unless told not
    to) up to the model's generation config's length (for a model built from config, its
    context)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(DataType.string)])
    if pipeline == "text-classification":
        outputs = Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "score")])
        return ModelSignature(inputs=inputs, outputs=outputs)
    outputs = Schema([ColSpec(DataType.string)])
    if pipeline != "text-generation":
        return ModelSignature(inputs=inputs, outputs=outputs)
    params = ParamSchema(
        [
            ParamSpec("max_new_tokens", DataType.long, None),
            ParamSpec("do_sample", DataType.boolean, False),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _logged_models(client: Any, experiment_id: str, run_id: str) -> list[Any]:
    found = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string="name = 'model'"
    )
    return [m for m in found if m.source_run_id == run_id]


def _link_into(artifact_uri: str, source: Path) -> bool:
    """Hard-link the files of `source` into a local (`file:`) artifact location: the store holds
    the artifact without a second copy of the weights, in no time. False, with nothing left
    behind, when the location is not local or not on the same filesystem: then it is copied.
    The artifact's files are read-only (artifacts.save_final), so neither side is edited in
    place."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    if not artifact_uri.startswith("file:"):
        return False
    dest = Path(local_file_uri_to_path(artifact_uri))
    linked: list[Path] = []
    try:
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            target = dest / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(file, target)
            linked.append(target)
    except OSError as exc:  # another filesystem (EXDEV), no hard links, or a clash
        log.debug("cannot hard-link the artifact into %s (%s); copying", dest, exc)
        for target in linked:
            target.unlink(missing_ok=True)
        return False
    return True
