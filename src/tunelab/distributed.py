"""Several processes of one run (torchrun, `accelerate launch`): who they are, what they share.

Every rank runs the whole command. What must be the same everywhere is decided once, by rank 0,
and handed to the others through torchrun's own key-value store (`decided_by_rank_zero`), so
ranks can never diverge: the suffix of a `resume=never` directory, the run directory, the
MLflow run id. Rank 0 alone writes checkpoints, the artifact and tracking; every rank takes part
in the same collectives in the same order (RNG states gathered for a checkpoint, the stop after
a signal).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from tunelab.errors import ConfigError, RankStopped, TunelabError, exit_code, first_line

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


def close() -> None:
    """End this process's process group, if one was started, before the interpreter shuts
    down: a gloo group left to the interpreter's teardown can abort the process (SIGABRT,
    "terminate called without an active exception") after its work is done. Called on a
    clean exit only: an error may have left another rank inside a collective."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_store: Any = None
# Every rank makes the same calls in the same order: the n-th call of a name has keys of its own
# (a sweep's jobs, or a process running several commands, call each name again).
_calls: dict[str, int] = {}
_FAILED = "\0tunelab-failed:"


def _agent_store() -> Any:
    """torchrun's agent store (also used by `accelerate launch`), or None: a plain process, or a
    launcher without one."""
    if world_size() == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    global _store
    if _store is None:
        from datetime import timedelta

        import torch.distributed as dist

        # The timeout bounds a connect and a get; waits for another rank are polled (below).
        _store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(minutes=2),
        )
    return _store


def _key(name: str) -> str:
    _calls[name] = _calls.get(name, 0) + 1
    # A restarted worker group (--max-restarts) decides afresh.
    return f"tunelab/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}/{_calls[name]}"


def _wait_for(store: Any, keys: list[str]) -> None:
    """Until `keys` are all set. Polled, so a signal's Python handler runs meanwhile (a blocking
    get would hold it until they are, and torchrun would kill this rank unheard); a store that
    is gone (its launcher ended) stops this rank with one line instead of a hang."""
    import time

    while True:
        try:
            if store.check(keys):
                return
        except Exception as exc:  # noqa: BLE001 (torch's store errors carry no common type)
            first = first_line(exc)
            raise TunelabError(
                f"rank {rank()}: the launcher's store is gone ({first}): another process of "
                "this run stopped; nothing was changed by this one"
            ) from None
        time.sleep(0.05)


def decided_by_rank_zero(key: str, make: Callable[[], str]) -> str:
    """`make()` on rank 0, the same string on every rank; a plain process just calls `make`.
    When `make` raises on rank 0, every other rank raises RankStopped with its exit code (rank 0
    says why), at once instead of waiting for a value that never comes."""
    store = _agent_store()
    if store is None:
        return make()
    full = _key(key)
    if is_main():
        try:
            value = make()
        except BaseException as exc:
            store.set(full, f"{_FAILED}{exit_code(exc) if isinstance(exc, Exception) else 1}")
            raise
        store.set(full, value)
        return value
    _wait_for(store, [full])
    value = bytes(store.get(full)).decode()
    if value.startswith(_FAILED):
        raise RankStopped(int(value.removeprefix(_FAILED)))
    return value


def gather(key: str, mine: str) -> list[str]:
    """Every rank's `mine`, in rank order, on every rank; [mine] in a plain process."""
    store = _agent_store()
    if store is None:
        return [mine]
    full = _key(key)
    store.set(f"{full}/{rank()}", mine)
    keys = [f"{full}/{r}" for r in range(world_size())]
    _wait_for(store, keys)
    return [bytes(store.get(k)).decode() for k in keys]


def same_config(resolved: dict[str, Any], run_dir: Any) -> None:
    """Every rank, before it touches anything: a ConfigError on every rank alike, naming the
    keys, when the ranks were launched with different configs (or in different directories)."""
    import json

    mine = {"run directory": str(run_dir), **_flat(resolved)}
    everyone = [json.loads(x) for x in gather("config", json.dumps(mine, default=str))]
    problems = []
    for other, theirs in enumerate(everyone[1:], 1):
        differ = sorted(k for k in everyone[0].keys() | theirs.keys()
                        if everyone[0].get(k) != theirs.get(k))  # fmt: skip
        if len(differ) > 1:  # the directories differ because the keys do: name the keys
            differ.remove("run directory")
        if differ:
            shown = "; ".join(
                f"{k}: {everyone[0].get(k)!r} on rank 0, {theirs.get(k)!r} on rank {other}"
                for k in differ[:4]
            )
            more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
            problems.append(
                f"ranks differ: {shown}{more}; launch every rank with the same command, "
                "overrides and working directory"
            )
    if problems:
        raise ConfigError(problems[:1])


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
