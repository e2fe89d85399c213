"""Which checkpoints stay: the newest `keep`, and with `keep_best` the best by a metric
(evaluated at the checkpoint's own step). Trainer's own rotation is turned off; this runs after
each commit, so an incomplete checkpoint is never counted as kept."""

from __future__ import annotations

from pathlib import Path

from tunelab import metrics
from tunelab.checkpoints.protocol import committed, manifest_of, remove, step_of


def rotate(root: Path, keep: int | None, metric: str | None, mode: str | None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep`, sparing the best by `metric` (when
    given). Only directories named checkpoint-<step> under `root` are ever touched."""
    done = committed(root)
    if not keep or len(done) <= keep:
        return []
    spared = set(done[:keep])
    best = best_checkpoint(done, metric, mode) if metric else None
    if best is not None:
        spared.add(best)
    removed = [p for p in done if p not in spared]
    for path in removed:
        remove(path)
    return removed


def best_checkpoint(done: list[Path], metric: str, mode: str | None) -> Path | None:
    """The checkpoint whose manifest holds the best value of `metric` measured at its own step."""
    name = metrics.eval_name(metric)
    sign = 1 if metrics.mode(name, mode) == "max" else -1
    scored = []
    for path in done:
        value = ((manifest_of(path) or {}).get("metrics") or {}).get(name)
        if isinstance(value, (int, float)):
            scored.append((sign * value, step_of(path), path))
    return max(scored)[2] if scored else None
