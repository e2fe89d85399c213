"""`tunelab launch [torchrun options] train [overrides]`: torchrun's own launcher, run in this
process, so that its faults end in one line each instead of torchrun's tracebacks.

Everything torchrun accepts is accepted (`--standalone`, `--nproc_per_node`, `--nnodes`,
`--rdzv_*`, ...) and means the same: the options are parsed by torchrun's parser and the workers
are started by its elastic agent, each running `python -m tunelab train [overrides]`. What
differs is only the end:

- a worker that exits by itself (a config error, a finished or stopped run) has said why: the
  launcher exits with its code, silently;
- a worker killed by a signal (the OOM killer, kill -9) is named in one line;
- SIGTERM/SIGINT to the launcher is relayed to the workers (they checkpoint and stop, rank 0
  says how to resume) and the launcher exits 128 + the signal, without torchrun's traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

# A directory where each worker notes the exit code it chose (it has said why): the launcher
# exits with it even when its agent lost the rendezvous first (the peer that hosted it left).
SAID = "TUNELAB_LAUNCH_SAID"


def main(argv: list[str]) -> NoReturn:
    from torch.distributed import run as torchrun

    args = _parse(torchrun, argv)
    # torchrun logs each fault as a warning or an error (each of its loggers has a level of
    # its own); the lines below replace them.
    torch_loggers = ("torch.distributed.elastic", "torch.distributed.run")
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith(torch_loggers) and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)
    code = 0
    said = Path(tempfile.mkdtemp(prefix="tunelab-launch-"))
    os.environ[SAID] = str(said)  # the workers inherit it
    try:
        torchrun.run(args)
    except KeyboardInterrupt:  # before the agent installed its own handlers
        code = 128 + signal.SIGINT
    except Exception as exc:  # noqa: BLE001 (torchrun's errors, each made one line)
        code = _failed(exc, said)
    finally:
        shutil.rmtree(said, ignore_errors=True)
    raise SystemExit(code)


def note_exit(code: object) -> None:
    """In a worker of `tunelab launch`: the exit code it chose, having said why (0: it
    finished its work)."""
    folder = os.environ.get(SAID)
    code = 0 if code is None else code
    if folder and isinstance(code, int) and code >= 0:
        with contextlib.suppress(OSError):  # the launcher is gone: nobody to tell
            (Path(folder) / os.environ.get("RANK", "0")).write_text(str(code))


def _said(folder: Path, rank: int | None = None) -> int | None:
    """The exit code a worker of this node chose, if one did: `rank`'s, or the lowest rank's
    that chose to fail."""
    codes = {
        int(p.name): int(text)
        for p in folder.glob("*")
        if p.name.isdigit() and (text := p.read_text()).isdigit()
    }
    if rank is not None:
        return codes.get(rank)
    failed = sorted((r, code) for r, code in codes.items() if code > 0)
    return failed[0][1] if failed else None


def _parse(torchrun: Any, argv: list[str]) -> Any:
    parser = torchrun.get_args_parser()
    parser.prog = "tunelab launch"
    parser.usage = "tunelab launch [torchrun options] train [overrides]"
    args = parser.parse_args(argv)
    if args.module or args.no_python or args.training_script != "train":
        parser.error(
            f"after torchrun's options comes `train` and its overrides, not "
            f"{' '.join([args.training_script, *args.training_script_args][:3])!r} "
            "(e.g. tunelab launch --standalone --nproc_per_node 2 train training.lr=1e-4)"
        )
    args.module = True  # each worker runs `python -m tunelab train ...`
    args.training_script = "tunelab"
    args.training_script_args = ["train", *args.training_script_args]
    return args


def _failed(exc: Exception, said: Path) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(exc, SignalException):  # the workers were sent the same signal and stopped
        return 128 + int(exc.sigval)
    if not isinstance(exc, ChildFailedError) and (code := _said(said)) is not None:
        return code  # a worker stopped by itself, having said why; then the rendezvous went
    if not isinstance(exc, ChildFailedError):  # rendezvous, a port taken, a bad option value
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"tunelab launch: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    rank, failure = exc.get_first_failure()
    if failure.exitcode > 0:
        return failure.exitcode  # it exited by itself, having said why
    if (code := _said(said, rank)) is not None:
        # It had ended its work and said so; the signal came as the interpreter shut down (a
        # library's thread torn down late): nothing of the run was lost.
        return code
    print(
        f"tunelab launch: rank {rank} (pid {failure.pid}) was killed by "
        f"{failure.signal_name()}; committed checkpoints are intact: run the same command "
        "again to resume.",
        file=sys.stderr,
    )
    return 1
