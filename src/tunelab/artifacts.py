"""The final artifact: a Hugging Face directory plus the resolved config, a manifest and a card.

It is written into a temporary sibling directory and renamed into place only when complete, so
`model/` is either absent or whole. The manifest is written last and fsynced.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from tunelab.constants import PICKLE_SUFFIXES
from tunelab.model import is_peft

MANIFEST = "manifest.json"
ADAPTER_DIR = "adapter"  # a PEFT run's adapter, in model/adapter/ beside the merged model
RUN_RECORD = "tunelab_run.json"  # in the run directory: config fingerprint and MLflow run id
CONFIG = "tunelab.yaml"
CHECKSUMS = ("sha256", "xxh3_128")
_LIBRARIES = ("tunelab", "torch", "transformers", "tokenizers", "safetensors", "accelerate",
              "datasets", "hydra-core", "omegaconf", "mlflow")  # fmt: skip


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


def weights_sha256(model: str | None) -> dict[str, str] | None:
    """{weights file: sha256} of the model directory (or hub id in the local cache) `model`;
    None when its files are not on this machine (a model built from config)."""
    directory = Path(model) if model and Path(model).is_dir() else _hub_cache_dir(model)
    if directory is None:
        return None
    index = read_json(directory / "model.safetensors.index.json").get("weight_map") or {}
    names = sorted(set(index.values())) if index else ["model.safetensors"]
    found = {n: sha256_file(directory / n) for n in names if (directory / n).is_file()}
    return found or None


def base_digest(model: str | None) -> str | None:
    """xxh3-128 over the weights files and config.json of the model directory (or hub id in the
    local cache) `model`: what a resume compares to know the base is the one the run started
    from. None for a model built from config. xxh3 rather than sha256: it reads at disk speed."""
    directory = Path(model) if model and Path(model).is_dir() else _hub_cache_dir(model)
    if directory is None:
        return None
    import xxhash

    index = read_json(directory / "model.safetensors.index.json").get("weight_map") or {}
    names = sorted(set(index.values())) if index else ["model.safetensors", "pytorch_model.bin"]
    h = xxhash.xxh3_128()
    for name in ["config.json", *names]:
        if (directory / name).is_file():
            h.update(f"{name}\0{file_digest(directory / name, 'xxh3_128')}\0".encode())
    return h.hexdigest()


def _hub_cache_dir(repo_id: str | None) -> Path | None:
    if not repo_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def refuse_pickles(directory: Path) -> None:
    """Fail if any file in `directory` is a pickle format, so none can reach an artifact."""
    found = [p.name for p in Path(directory).rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if found:
        raise RuntimeError(f"refusing to publish pickle files in {directory}: {', '.join(found)}")


def write_manifest(
    directory: Path,
    info: dict[str, Any],
    checksum: str = "sha256",
    known: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The checksum (`sha256`, or the much cheaper `xxh3_128` for checkpoints) and size of every
    file, plus `info` and the environment; written last, fsynced. `known`: checksums of files
    written (and fsynced) from memory whose digest was taken there, by relative name."""
    directory = Path(directory)
    known = known or {}
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        name = path.relative_to(directory).as_posix()
        if name not in known:
            _fsync_file(path)
        files[name] = {
            checksum: known.get(name) or file_digest(path, checksum),
            "size": path.stat().st_size,
        }
    manifest = {
        "format": "tunelab.manifest/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **info,
        "files": files,
        "versions": versions(),
        "git": git_state(),
    }
    write_json(directory / MANIFEST, manifest)
    fsync_dir(directory)
    return manifest


def verify_manifest(directory: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Problems with `directory` against its manifest (empty when every file matches, and no
    file is there that the manifest does not list). `ignore`: top-level names others may add
    beside the listed files (MLflow's own files in a store's copy)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{directory / MANIFEST}: missing or unreadable"]
    problems = []
    for name in files:
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or name.startswith("~"):
            problems.append(f"{directory / MANIFEST}: lists {name!r}, outside the directory")
    if problems:
        return problems
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        top = name.split("/", 1)[0]
        if path.is_dir() or name == MANIFEST or name in files or top in ignore:
            continue
        problems.append(f"{path}: not listed in the manifest")
    for name, want in files.items():
        path = directory / name
        want = want if isinstance(want, dict) else {}
        checksum = next((c for c in CHECKSUMS if c in want), None)
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif checksum is None:
            problems.append(f"{path}: no checksum in the manifest")
        elif (
            path.stat().st_size != want.get("size") or file_digest(path, checksum) != want[checksum]
        ):
            problems.append(f"{path}: contents do not match the manifest")
    return problems


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object at `path`, or {} when it is missing or unreadable."""
    try:
        found = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def read_manifest(directory: Path) -> dict[str, Any]:
    return read_json(Path(directory) / MANIFEST)


def is_complete(directory: Path) -> bool:
    """A directory whose manifest exists and whose files are all there at their recorded size
    (cheap: no hashing; `verify_manifest` hashes)."""
    files = read_manifest(directory).get("files")
    if not files or not isinstance(files, dict):
        return False
    for name, want in files.items():
        path = Path(directory) / name
        if not isinstance(want, dict) or not path.is_file():
            return False
        if path.stat().st_size != want.get("size"):
            return False
    return True


def read_run_record(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / RUN_RECORD)


def write_run_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_json(Path(run_dir) / RUN_RECORD, record)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` atomically (a temporary sibling, fsynced, renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    _fsync_file(tmp)
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def file_digest(path: Path, checksum: str) -> str:
    """Hex digest of a file. `xxh3_128` is ~12x faster than sha256 here: checkpoints use it, so
    hashing in the background does not take CPU from training (it guards against torn or rotted
    files, not tampering); the published artifact keeps sha256."""
    if checksum == "sha256":
        h: Any = hashlib.sha256()
    elif checksum == "xxh3_128":
        import xxhash

        h = xxhash.xxh3_128()
    else:
        raise ValueError(f"unknown checksum {checksum!r}; allowed: {', '.join(CHECKSUMS)}")
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def replace_dir(src: Path, dst: Path) -> None:
    """Move a complete directory into place; an older `dst` is removed only after the move."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[lib] = metadata.version(lib)
    return out


@functools.lru_cache(maxsize=4)
def git_state(cwd: Path | None = None) -> dict[str, Any]:
    """The commit and dirty flag of the checkout tunelab is run from, if it is one."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def model_card(info: ArtifactInfo) -> str:
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(info.metrics.items()))
    return f"""# {info.run_name}

Fine-tuned with tunelab (Hugging Face Trainer, configured by Hydra, tracked in MLflow).

- Base model: {info.base_model}
- Parameters: {info.parameters}
- Data: {info.data_source} (sha256 {info.data_digest[:16]}...)
- Steps: {info.step}, epochs: {_fmt(info.epoch)}
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

`tunelab.yaml` is the resolved config of the run; `manifest.json` lists the sha256 and size of
every file, the library versions and the git commit.
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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
