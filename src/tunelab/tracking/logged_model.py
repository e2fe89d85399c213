"""The final artifact as the run's MLflow Logged Model, stored once, and models read back from
the store (`runs:/`, `models:/`, run ids) into local directories."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab import artifacts, files, manifests, metrics
from tunelab.errors import ModelNotFound
from tunelab.tracking import store

if TYPE_CHECKING:
    from tunelab.tracking.tracker import MlflowTracker

log = logging.getLogger("tunelab")


def log_model(tracker: MlflowTracker, local_dir: Path, final: dict[str, Any], step: int) -> str:
    """The Hugging Face directory `local_dir` as the run's Logged Model `model`: uploaded once,
    as the model's artifacts (MLflow 3 serves them under runs:/ID/model too), with the final
    eval metrics linked to it. Returns the model id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    from tunelab import tasks
    from tunelab.tracking.tracker import metric_key

    task_name = str(manifests.read_manifest(local_dir).get("task") or "causal_lm")
    task = tasks.get(task_name)
    client = tracker.client
    if tracker.continued:  # only an earlier process of this run can have left one
        for old in _logged_models(client, tracker.experiment_id, tracker.id):
            client.delete_logged_model(old.model_id)  # a half-finished upload
    model = client.create_logged_model(
        tracker.experiment_id,
        name="model",
        source_run_id=tracker.id,
        tags={"tunelab.format": "huggingface", "tunelab.loader": task.AUTO_CLASS},
        model_type=f"transformers/{task_name}",
    )
    if not _link_into(model.artifact_location, local_dir):
        client.log_model_artifacts(model.model_id, str(local_dir))
    _log_transformers_flavor(client, model.model_id, local_dir, task.PIPELINE)
    now = int(time.time() * 1000)
    linked = [
        Metric(metric_key(k), v, now, step, model_id=model.model_id)
        for k, v in metrics.final(final).items()
    ]
    if linked:
        client.log_batch(tracker.id, metrics=linked)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(tracker.id, [LoggedModelOutput(model.model_id, step)])
    return str(model.model_id)


# The pipeline class MLflow's transformers flavor instantiates for each pipeline task.
_PIPELINES = {
    "text-generation": "TextGenerationPipeline",
    "text-classification": "TextClassificationPipeline",
    "token-classification": "TokenClassificationPipeline",
}


def _log_transformers_flavor(client: Any, model_id: str, local_dir: Path, pipeline: str) -> None:
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
            instance_type=_PIPELINES[pipeline],
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


# What MLflow keeps beside the Hugging Face files of a Logged Model (the flavor's MLmodel and
# its copy of the tokenizer) or adds to a download of one (registered_model_meta): not part of
# the artifact, so not left in a downloaded one.
MLFLOW_FILES = ("MLmodel", "components", "registered_model_meta")


def download_model(source: str, dst: Path, uri: str | None = None) -> Path:
    """Download a run's model (a run id, runs:/ID/model or models:/...) into `dst`: the Hugging
    Face files only, verified against the manifest (no file it does not list), written beside
    `dst` and renamed into place when complete."""
    import shutil
    import tempfile

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    resolved = store.resolve_uri(uri)
    store.check_reachable(resolved)
    if not source.startswith(store.MODEL_URI_SCHEMES):
        source = f"runs:/{source}/model"
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp,
        store.default_store(resolved),
    ):
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(source, dst_path=tmp, tracking_uri=resolved)
            )
        except MlflowException as exc:
            first = (str(exc).strip().splitlines() or ["not found"])[0]
            raise ModelNotFound(f"{source}: not found in the store {resolved} ({first})") from None
        for name in MLFLOW_FILES:
            target = local / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        problems = manifests.verify_manifest(local)
        if problems:
            raise RuntimeError(f"{source}: the download does not match its manifest: {problems[0]}")
        _unshare(local)
        os.replace(local, dst)
    return dst


def _unshare(folder: Path) -> None:
    """Every file of a download its own: one that shares its inode with another file (a hard
    link into the store, whose files are the run's own `model/`: _link_into) is replaced by a
    copy, so editing the download never edits the run. A copy-on-write clone where the
    filesystem makes one (btrfs, XFS), else a plain copy."""
    import shutil

    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        if file.stat().st_nlink == 1:
            continue
        copy = file.with_name(f".{file.name}.copy")
        with open(file, "rb") as src, open(copy, "wb") as dst:
            if not _clone(src.fileno(), dst.fileno()):
                shutil.copyfileobj(src, dst, 1 << 20)
        shutil.copystat(file, copy)
        os.replace(copy, file)


def _clone(src: int, dst: int) -> bool:
    """A copy-on-write clone of `src` into `dst` (Linux FICLONE); False where not supported."""
    import fcntl

    try:
        fcntl.ioctl(dst, 0x40049409, src)  # FICLONE
    except OSError:
        return False
    return True


def fetch_model(name_or_path: str | None, uri: str | None, cache: Path) -> str | None:
    """A local directory for `model.name_or_path`: MLflow URIs are downloaded once into `cache`
    (keyed by the URI); paths and hub ids are returned as they are."""
    if not name_or_path or not name_or_path.startswith(store.MODEL_URI_SCHEMES):
        return name_or_path
    import hashlib

    from tunelab import locks

    key = hashlib.sha1(f"{store.resolve_uri(uri)} {name_or_path}".encode()).hexdigest()[:16]
    local = Path(cache) / key
    if manifests.is_complete(local):
        return str(local)
    # Parallel jobs fetching the same model: one downloads (into a temporary name, renamed into
    # place), the others wait and then reuse the complete entry.
    with locks.waiting(Path(cache) / f".{key}.lock", f"model cache entry {local}"):
        if not manifests.is_complete(local):
            log.info("downloading %s to %s", name_or_path, local)
            if local.exists():  # an incomplete entry left by a killed download
                import shutil

                shutil.rmtree(local)
            download_model(name_or_path, local, uri)
    return str(local)
