"""Where tunelab finds its configs and presets, and where the default store lives."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent
_REPO = _PKG.parents[1]


def project_root() -> Path:
    """The checkout tunelab runs from (editable install), else the installed package."""
    return _REPO if (_REPO / "conf" / "train.yaml").is_file() else _PKG


def conf_dir() -> Path:
    return project_root() / "conf"
