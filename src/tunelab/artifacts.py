"""The final artifact: a Hugging Face directory plus the resolved config, a manifest and a card.

It is written into a temporary sibling directory and renamed into place only when complete, so
`model/` is either absent or whole. The manifest is written last and fsynced.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tunelab.adapters import is_peft
from tunelab.constants import PICKLE_SUFFIXES
from tunelab.files import read_json, replace_dir, write_json
from tunelab.manifests import write_manifest
from tunelab.provenance import weights_sha256

ADAPTER_DIR = "adapter"  # a PEFT run's adapter, in model/adapter/ beside the merged model
RUN_RECORD = "tunelab_run.json"  # in the run directory: config fingerprint and MLflow run id
CONFIG = "tunelab.yaml"


@dataclass
class ArtifactInfo:
    """What the manifest and the model card say about the run that made an artifact."""

    run_name: str
    step: int
    epoch: float | None
    metrics: dict[str, float]
    base_model: str
    parameters: int
    data_source: str
    data_digest: str
    mlflow_run_id: str | None
    overrides: list[str] = field(default_factory=list)
    resumed_from: str | None = None
    task: str = "causal_lm"
    auto_class: str = "AutoModelForCausalLM"
    labels: list[str] | None = None  # classification / tagging: id order, as in config.json
    peft: dict[str, Any] | None = None  # the adapter of a PEFT run: set by save_final
    # training.early_stopping_patience: the best evaluation's step (whose model this is), its
    # value, and the step training stopped at (None: it ran to max_steps)
    early_stopping: dict[str, Any] | None = None


def save_final(
    out_dir: Path,
    model: Any,
    tokenizer: Any,
    resolved_config: str,
    info: ArtifactInfo,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write the artifact to `out_dir` atomically and return it. `info` goes into the manifest
    and the model card; `state_dict`: the full weights when `model` holds only a shard (FSDP)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if is_peft(model):
        # peft=lora: the adapter in adapter/, then the model with the adapter merged into its
        # weights (in place: this is the trained model's last use), so that model/ loads with
        # plain transformers, no peft needed.
        info = replace(info, peft=save_adapter(model, tmp / ADAPTER_DIR))
        model = model.merge_and_unload(safe_merge=True)  # safe_merge: refuses NaN weights
        info = replace(info, parameters=sum(p.numel() for p in model.parameters()))
    with _no_progress_bars():  # a bar per shard written, in every run's log
        model.save_pretrained(tmp, state_dict=state_dict)  # safetensors, nothing else
    tokenizer.save_pretrained(tmp)
    (tmp / CONFIG).write_text(resolved_config, encoding="utf-8")
    (tmp / "README.md").write_text(model_card(info), encoding="utf-8")
    refuse_pickles(tmp)
    write_manifest(tmp, asdict(info))
    for file in tmp.rglob("*"):  # finished: the store may hard-link these files (tracking)
        if file.is_file():
            file.chmod(0o444)
    replace_dir(tmp, out_dir)
    return out_dir


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_adapter(model: Any, out_dir: Path) -> dict[str, Any]:
    """The PEFT `model`'s adapter (`adapter_config.json`, `adapter_model.safetensors`) into
    `out_dir`; returns what the manifest records of it, the base weights' sha256 among it."""
    model.save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's blank card; ours describes the run
    config = model.peft_config[model.active_adapter]
    targets = config.target_modules
    return {
        "method": str(config.peft_type.value).lower(),
        "r": getattr(config, "r", None),
        "alpha": getattr(config, "lora_alpha", None),
        "dropout": getattr(config, "lora_dropout", None),
        "target_modules": targets if isinstance(targets, str) else sorted(targets or []),
        "bias": getattr(config, "bias", None),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "base_model": config.base_model_name_or_path,
        "base_weights_sha256": weights_sha256(config.base_model_name_or_path),
    }


def refuse_pickles(directory: Path) -> None:
    """Fail if any file in `directory` is a pickle format, so none can reach an artifact."""
    found = [p.name for p in Path(directory).rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if found:
        raise RuntimeError(f"refusing to publish pickle files in {directory}: {', '.join(found)}")


def read_run_record(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / RUN_RECORD)


def write_run_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_json(Path(run_dir) / RUN_RECORD, record)


def model_card(info: ArtifactInfo) -> str:
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(info.metrics.items()))
    return f"""# {info.run_name}

Fine-tuned with tunelab (Hugging Face Trainer, configured by Hydra, tracked in MLflow).

- Base model: {info.base_model}
- Parameters: {info.parameters}
- Data: {info.data_source} (sha256 {info.data_digest[:16]}...)
- Steps: {info.step}, epochs: {_fmt(info.epoch)}{_early_line(info.early_stopping)}
- MLflow run: {info.mlflow_run_id}

| metric | value |
| --- | --- |
{rows}

- Task: {info.task}{f" (labels: {', '.join(info.labels)})" if info.labels else ""}

{_adapter_card(info)}
## Load

```python
from transformers import {info.auto_class}, AutoTokenizer
model = {info.auto_class}.from_pretrained("path/to/this/dir")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")
```

{_serve_card(info)}`tunelab.yaml` is the resolved config of the run; `manifest.json` lists the
sha256 and size of every file, the library versions and the git commit.
"""


def _serve_card(info: ArtifactInfo) -> str:
    if not info.mlflow_run_id:
        return ""
    return f"""## Serve

`tunelab serve {info.mlflow_run_id}` serves the run's Logged Model over HTTP (MLflow's scoring
server: POST {{"inputs": [...]}} to /invocations); `tunelab runs` names its `models:/` URI.

"""


def _adapter_card(info: ArtifactInfo) -> str:
    peft = info.peft
    if not peft:
        return ""
    targets = peft["target_modules"]
    targets = targets if isinstance(targets, str) else ", ".join(targets)
    base = peft["base_model"] or "the base model built from config (same config and seed)"
    load_base = peft["base_model"] or "path/to/the/base"
    # A classifier's base gets this directory's config: its labels and head size.
    head = info.task != "causal_lm"
    imports = f"{info.auto_class}, AutoConfig" if head else info.auto_class
    config = ', config=AutoConfig.from_pretrained("path/to/this/dir")' if head else ""
    return f"""
## Adapter

Trained as a {peft["method"].upper()} adapter (r={peft["r"]}, alpha={_fmt(peft["alpha"])}, on
{targets}) of {base}. The weights in this directory are the model with the adapter merged in; the
adapter alone is in `adapter/` (the base weights' sha256 is in `manifest.json`):

```python
from peft import PeftModel
from transformers import {imports}
base = {info.auto_class}.from_pretrained("{load_base}"{config})
model = PeftModel.from_pretrained(base, "path/to/this/dir/adapter")
```
"""


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _early_line(early: dict[str, Any] | None) -> str:
    if not early:
        return ""
    stopped = early.get("stopped_at_step")
    how = f"stopped at step {stopped}" if stopped is not None else "ran to its end"
    return (
        f"\n- Early stopping (patience {early['patience']}): {how}; these are the weights of "
        f"step {early.get('weights_step', early['best_step'])} (the best {early['metric']}: "
        f"{_fmt(early['best_value'])} at step {early['best_step']})"
    )
