"""Several processes of one run (torchrun, `accelerate launch`): who they are, what they share.

Every rank runs the whole command. What must be the same everywhere is decided once, by rank 0,
and handed to the others through torchrun's own key-value store (`share`), so ranks can never
diverge: the suffix of a `resume=never` directory, the run directory, the MLflow run id. Rank 0
alone writes checkpoints, the artifact and tracking; every rank takes part in the same
collectives in the same order (RNG states gathered for a checkpoint, the stop after a signal).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tunelab")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0, or a plain single process."""
    return rank() == 0


def from_slurm_tasks() -> None:
    """A job of Hydra's submitit_slurm launcher with several tasks (`tasks_per_node`, nodes):
    every task runs the job, so export torch.distributed's variables (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM's, and the tasks train as one DDP run."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    # Each task keeps every GPU of its node visible: Trainer picks cuda:LOCAL_RANK.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def follow_launcher() -> None:
    """Under torchrun (Linux): SIGTERM to this worker when torchrun dies, however it dies. A
    kill -9 of torchrun alone would otherwise leave its workers training on as orphans (each
    runs in a session of its own); with it they checkpoint and stop, as on any SIGTERM."""
    if world_size() == 1 or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes
    import signal
    import sys

    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # torchrun died before that took effect
        os.kill(os.getpid(), signal.SIGTERM)


_store: Any = None


def share(key: str, make: Callable[[], str]) -> str:
    """`make()` on rank 0, the same string on every rank. Through torchrun's agent store (also
    used by `accelerate launch`); a plain process, or a launcher without one, just calls make."""
    if world_size() == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return make()
    global _store
    from datetime import timedelta

    import torch.distributed as dist

    if _store is None:
        _store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(minutes=30),  # rank 0 may be preparing a large dataset
        )
    # A restarted worker group (--max-restarts) decides afresh.
    full = f"tunelab/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{key}"
    if is_main():
        value = make()
        _store.set(full, value)
        return value
    # Polled, so a signal's Python handler runs meanwhile (a blocking get would hold it until
    # rank 0 answers, and torchrun would kill this rank unheard).
    import time

    while not _store.check([full]):
        time.sleep(0.05)
    return bytes(_store.get(full)).decode()


def same_run(run_dir: Any, run_id: str | None) -> str | None:
    """Rank 0's MLflow run id on every rank, once every rank is found to train in rank 0's run
    directory (a ConfigError otherwise: ranks launched with different commands)."""
    import json

    mine = json.dumps({"run_dir": str(run_dir), "run_id": run_id})
    shared = json.loads(share("run", lambda: mine))
    if shared["run_dir"] != str(run_dir):
        from tunelab.config import ConfigError

        raise ConfigError(
            [
                f"rank {rank()} would train in {run_dir} but rank 0 in {shared['run_dir']}: "
                "launch every rank with the same command and overrides"
            ]
        )
    return shared["run_id"]


def note_resume(checkpoint: Any) -> None:
    """Warn when `checkpoint` was written by another number of processes than resume it: the
    run continues from its step, but each rank's random state is its own, so not bit-exactly."""
    if checkpoint is None or not is_main():
        return
    from pathlib import Path

    writers = len(list(Path(checkpoint).glob("rng_state_*.pth"))) or 1
    if writers != world_size():
        log.warning(
            "%s was written by %d process(es) and is resumed by %d: training continues from its "
            "step, but not bit-exactly (random states are per process)",
            Path(checkpoint).name,
            writers,
            world_size(),
        )


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a collective: all ranks must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_bytes(data: bytes) -> list[bytes] | None:
    """Every rank's `data` on rank 0 (in rank order), None elsewhere (a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [data]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(data, out, dst=0)
    return out


def parameters(args: Any) -> dict[str, Any]:
    """What a run's params say about its processes: `args` are the TrainingArguments."""
    world = args.world_size
    return {
        "parallel.world_size": world,
        "parallel.global_batch_size": args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * world,
        "parallel.backend": _backend() if world > 1 else "none",
        "parallel.mode": str(args.parallel_mode.value),
    }


def _backend() -> str:
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_initialized() else "none"


def quiet_replicas() -> None:
    """Only rank 0 speaks: the other ranks log errors only (Trainer's `log_level_replica`
    does the same for transformers)."""
    if is_main():
        return
    for name in ("tunelab", "transformers", "mlflow", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank is gone (gloo, NCCL)."""
    if world_size() == 1:
        return False
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    marks = ("gloo", "Connection closed by peer", "Connection reset by peer", "NCCL", "Broken pipe")
    return isinstance(exc, RuntimeError) and any(m in text for m in marks)
