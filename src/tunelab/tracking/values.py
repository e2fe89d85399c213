"""What MLflow accepts as names and values: a nested config flattened into params cut at MLflow's
limits, and metric keys in its character set."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_PARAM_VALUE = 6000  # MLflow's limit; longer values are truncated, never dropped
MAX_PARAM_KEY = 250


def metric_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}; lists become JSON; values cut at MLflow's limit."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    value = json.dumps(tree) if isinstance(tree, (list, tuple)) else str(tree)
    if len(value) > MAX_PARAM_VALUE:
        marker = "...[truncated]"
        value = value[: MAX_PARAM_VALUE - len(marker)] + marker
    out[prefix.rstrip(".")[:MAX_PARAM_KEY]] = value
    return out
