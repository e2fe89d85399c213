"""Adapters (PEFT): a LoRA adapter put on a model for `peft=lora`, and telling a PEFT model from a
plain one. peft itself is imported only by a LoRA run."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, first_line

_PEFT_TASKS = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS",
               "token_classification": "TOKEN_CLS"}  # fmt: skip


def apply_peft(model: Any, cfg: Any, task: str) -> Any:
    """`model` wrapped by `peft.get_peft_model` with a LoRA adapter when `cfg.method` (the `peft`
    group) is lora: its own weights freeze and only the adapter trains. Unchanged for none."""
    if cfg.method == "none":
        return model
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules
    if targets is not None and not isinstance(targets, str):
        targets = [str(t) for t in targets]
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,  # None: peft's default for the model type
        bias=cfg.bias,
        task_type=_PEFT_TASKS.get(task),
    )
    try:
        with warnings.catch_warnings():
            # GPT-2's Conv1D layers need fan_in_fan_out, which peft sets itself, with a warning.
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            # peft asks an attribute transformers 5 renamed: a FutureWarning in every LoRA run.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
            wrapped = get_peft_model(model, lora)
    except ValueError as exc:  # no default for this model type, or no module matches
        raise ConfigError([f"peft.target_modules: {targets!r}: {first_line(exc)}"]) from None
    adapter = wrapped.peft_config[wrapped.active_adapter]
    base = adapter.base_model_name_or_path
    if base and Path(base).is_dir():  # the adapter names its base: absolute, valid from anywhere
        adapter.base_model_name_or_path = str(Path(base).resolve())
    total, trainable = parameter_count(wrapped)
    chosen = getattr(adapter, "target_modules", None)  # with peft's default filled in
    on = chosen if isinstance(chosen, str) else ",".join(sorted(chosen or []))
    print(
        f"tunelab: LoRA r={cfg.r} alpha={cfg.alpha} on {on}: {trainable:,} of {total:,} "
        f"parameters train ({100 * trainable / total:.2f}%)"
    )
    return wrapped


def is_peft(model: Any) -> bool:
    """A `peft.PeftModel` (told without importing peft, which only a LoRA run needs)."""
    return any(c.__module__.startswith("peft.") for c in type(model).__mro__)


def parameter_count(model: Any) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
