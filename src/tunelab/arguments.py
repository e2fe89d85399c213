"""The run's `training` and `checkpoint` config mapped onto transformers' TrainingArguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from tunelab.checkpoints import trainer_arguments
from tunelab.errors import ConfigError


def training_arguments(cfg: DictConfig, run_dir: Path, has_eval: bool) -> Any:
    """TrainingArguments for `cfg`, writing checkpoints under `run_dir/checkpoints`;
    `has_eval`: the run has an eval split (evaluations are scheduled only then)."""
    import torch
    from transformers import TrainingArguments

    t = cfg.training
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            ["training.device: cuda, but this machine has no CUDA device; use auto or cpu"]
        )
    cuda = t.device != "cpu" and torch.cuda.is_available()
    if t.fsdp and not cuda:
        raise ConfigError(
            [
                "training.fsdp: true needs CUDA GPUs (FSDP does not run on CPU); use DDP there "
                "(training.fsdp=false, the default)"
            ]  # fmt: skip
        )
    bf16 = t.precision == "bf16" or (
        t.precision == "auto" and cuda and torch.cuda.is_bf16_supported()
    )
    evaluate = has_eval and t.eval_every > 0
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        learning_rate=t.lr,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_every if evaluate else None,
        logging_steps=t.log_every,
        bf16=bf16,
        fp16=t.precision == "fp16",
        use_cpu=not cuda,
        dataloader_num_workers=t.num_workers,
        ddp_find_unused_parameters=t.find_unused_parameters,
        fsdp=t.fsdp,
        fsdp_config=cast("dict[str, Any]", OmegaConf.to_container(t.fsdp_config))
        if t.fsdp
        else None,
        log_level_replica="error",  # under torchrun rank 0 alone speaks
        dataloader_pin_memory=cuda,
        disable_tqdm=not t.progress_bar,
        report_to="none",  # tracking is tunelab's own callback
        include_num_input_tokens_seen="non_padding",  # for tokens/s
        seed=cfg.seed,
        data_seed=cfg.seed,
        **trainer_arguments(cfg.checkpoint),
    )
