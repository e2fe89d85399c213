"""Checkpoints that survive crashes: the on-disk protocol (protocol), which ones stay
(rotation), the Trainer that writes them in the background (trainer) and the stop on a signal
(signals). The last two import transformers: import them where training happens."""

from tunelab.checkpoints.protocol import (
    ARGS_JSON,
    CHECKSUM,
    CORRUPT,
    PARTIAL,
    PREFIX,
    REQUIRED,
    IncompleteCheckpoint,
    clean_incomplete,
    commit,
    committed,
    latest_valid,
    partial_dir,
    resume_point,
    step_of,
)
from tunelab.checkpoints.rotation import best_checkpoint, rotate
from tunelab.checkpoints.strategy import trainer_arguments

__all__ = [
    "ARGS_JSON",
    "CHECKSUM",
    "CORRUPT",
    "PARTIAL",
    "PREFIX",
    "REQUIRED",
    "IncompleteCheckpoint",
    "best_checkpoint",
    "clean_incomplete",
    "commit",
    "committed",
    "latest_valid",
    "partial_dir",
    "resume_point",
    "rotate",
    "step_of",
    "trainer_arguments",
]
