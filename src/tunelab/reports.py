"""Pictures of a finished run, logged on it under `report/` for the MLflow UI: the training and
eval loss on one chart (every task), and for a classifier or tagger its eval split's confusion
matrix, per-class precision / recall / F1 / support, and the eval examples it got wrong.

Drawn with matplotlib (offline, no browser). A report that cannot be drawn is a warning, never
the run's failure. Imports matplotlib and numpy: loaded by the stages when a run ends."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from tunelab.errors import first_line

log = logging.getLogger("tunelab")

FOLDER = "report"
MAX_ROWS = 5000  # eval rows predicted for the report (the first ones)
MAX_WRONG = 200  # misclassified examples listed
MAX_ANNOTATED = 30  # classes up to which the confusion matrix prints its counts


def loss_chart(log_history: list[dict[str, Any]], folder: Path) -> None:
    """`loss.png`: the training loss at each logging step and the eval loss at each
    evaluation, on one chart (MLflow's charts draw one metric each)."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evals:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, folder / "loss.png")


def classifier_report(
    trainer: Any, eval_set: Any, tokenizer: Any, labels: list[str], folder: Path | None
) -> dict[str, Any] | None:
    """Predict the eval split (its first MAX_ROWS rows) and, when `folder` is given (rank 0),
    write the report's files there. Every rank must call it (prediction is a collective under
    DDP). Returns the per-class figures, or None when there is nothing to report."""
    import numpy as np

    rows = eval_set.select(range(min(len(eval_set), MAX_ROWS)))
    out = trainer.predict(rows, metric_key_prefix="report")
    predicted, truth = np.asarray(out.predictions), np.asarray(out.label_ids)
    if folder is None or predicted.shape != truth.shape:
        return None
    if truth.ndim == 1:  # a classifier: one label a row (a tagger: one a token)
        predicted, truth = predicted[:, None], truth[:, None]
    scored = truth != -100  # a tagger's sub-tokens and special tokens carry no label
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (truth[scored], predicted[scored]), 1)
    per_class = _per_class(confusion, labels)
    _write_per_class(per_class, folder)
    _draw_confusion(confusion, labels, folder)
    _draw_per_class(per_class, folder)
    _write_wrong(rows, predicted, truth, labels, tokenizer, folder)
    return {"classes": per_class, "confusion": confusion.tolist()}


def _per_class(confusion: Any, labels: list[str]) -> list[dict[str, Any]]:
    found = []
    for i, name in enumerate(labels):
        hit = int(confusion[i, i])
        said, real = int(confusion[:, i].sum()), int(confusion[i, :].sum())
        precision = hit / said if said else 0.0
        recall = hit / real if real else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        found.append(
            {"label": name, "precision": precision, "recall": recall, "f1": f1, "support": real}
        )
    return found


def _write_per_class(per_class: list[dict[str, Any]], folder: Path) -> None:
    with (folder / "per_class.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label", "precision", "recall", "f1", "support"])
        writer.writeheader()
        for row in per_class:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})


def _draw_confusion(confusion: Any, labels: list[str], folder: Path) -> None:
    plt = _pyplot()
    k = len(labels)
    side = min(2 + 0.5 * k, 14)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    shown = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    ticks = range(k)
    ax.set_xticks(ticks, labels, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(ticks, labels)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(f"confusion matrix ({int(confusion.sum())} eval labels)")
    if k <= MAX_ANNOTATED:
        top = confusion.max() or 1
        for i in ticks:
            for j in ticks:
                value = int(confusion[i, j])
                color = "white" if value > top / 2 else "black"
                ax.text(j, i, str(value), ha="center", va="center", color=color, fontsize=8)
    _save(fig, folder / "confusion_matrix.png")


def _draw_per_class(per_class: list[dict[str, Any]], folder: Path) -> None:
    import numpy as np

    plt = _pyplot()
    names = [row["label"] for row in per_class]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1 + 0.8 * len(names)), 4))
    for shift, key in ((-0.27, "precision"), (0.0, "recall"), (0.27, "f1")):
        ax.bar(x + shift, [row[key] for row in per_class], width=0.27, label=key)
    ax.set_xticks(x, [f"{row['label']}\n(n={row['support']})" for row in per_class])
    ax.set(ylim=(0, 1.05), title="per class, on the eval split")
    ax.legend(loc="lower right")
    _save(fig, folder / "per_class.png")


def _write_wrong(
    rows: Any, predicted: Any, truth: Any, labels: list[str], tokenizer: Any, folder: Path
) -> None:
    """`misclassified.csv`: each eval example with a wrong label (a tagger: a wrong tag), its
    text, and the true and predicted labels (a tagger: the labelled tokens' tags, in order)."""
    with (folder / "misclassified.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "text", "true", "predicted"])
        written = 0
        for i in range(len(truth)):
            scored = truth[i] != -100
            if (truth[i][scored] == predicted[i][scored]).all():
                continue
            text = tokenizer.decode(rows[i]["input_ids"], skip_special_tokens=True)
            true = " ".join(labels[t] for t in truth[i][scored].ravel())
            said = " ".join(labels[p] for p in predicted[i][scored].ravel())
            writer.writerow([i, text, true, said])
            written += 1
            if written >= MAX_WRONG:
                return


def write(trainer: Any, inputs: Any, labels: list[str] | None, folder: Path | None) -> bool:
    """The whole report into `folder` (rank 0; None on the other ranks, which still take part
    in the prediction); True when something was written."""
    try:
        if labels and inputs.prepared.eval is not None:
            classifier_report(trainer, inputs.prepared.eval, inputs.tokenizer, labels, folder)
        if folder is not None:
            loss_chart(trainer.state.log_history, folder)
            return any(folder.iterdir())
    except Exception as exc:  # noqa: BLE001 (a picture never fails the run)
        log.warning("the run's report was not drawn: %s", first_line(exc))
    return False


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
