"""What a run was made with: library versions, the git commit, digests of a base model's weights.
Written into manifests and tags."""

from __future__ import annotations

import contextlib
import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from tunelab.files import file_digest, read_json, sha256_file

_LIBRARIES = ("tunelab", "torch", "transformers", "tokenizers", "safetensors", "accelerate",
              "datasets", "hydra-core", "omegaconf", "mlflow")  # fmt: skip


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
