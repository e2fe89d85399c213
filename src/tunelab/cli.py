"""The `tunelab` command. `train` hands its arguments to Hydra; the rest are small argparse
tools (`tunelab.tools`). What the process prints and how it exits is decided here: an error's
lines and exit code come from its class (`tunelab.errors`).

Heavy libraries are imported inside the commands, so `--help`, `--cfg job` and config errors
answer without loading torch, transformers or mlflow.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab import (
    config,
    console,
    distributed,
    errors,
    launch,
    locks,
    paths,
    preflight,
    runner,
    sweeps,
)

if TYPE_CHECKING:
    from omegaconf import DictConfig

USAGE = """\
usage: tunelab <command> [args]

commands:
  train [-v] [overrides]
                      train one run (Hydra: `-m` sweeps, `--cfg job`, `--help`, `-cd DIR`);
                      -v: the libraries' own output too (Trainer's dicts, MLflow's INFO lines)
  launch [torchrun options] train [overrides]
                      the same run in several processes (DDP): torchrun, a line per fault
  runs                recent runs: name, status, key metrics, duration, artifact
  export RUN_ID DIR   download a run's model, ready for from_pretrained(DIR)
  register RUN_ID NAME [--alias A]
                      register a run's model as a new version of NAME, alias A (champion),
                      so models:/NAME@A loads it
  generate PATH|RUN_ID PROMPT
                      load a model (directory, run id or runs:/ URI) and continue PROMPT
  predict PATH|RUN_ID TEXT...
                      label each TEXT with a classifier, or tag its words with a tagger
  serve RUN_ID|models:/... [--port N]
                      serve a run's model over HTTP (MLflow's scoring server, 127.0.0.1)
  ui [--port N]       MLflow UI on the same store `tunelab train` writes to (127.0.0.1)
  cache [prune]       the prepared-data cache under output.root: list it, or prune it now
  server [--dir DIR] [--port N]
                      a team tracking server: MLflow on PostgreSQL, proxied artifacts, on
                      127.0.0.1 (`make server`); runs use tracking.uri=http://127.0.0.1:N

`runs`, `export`, `register`, `generate`, `predict`, `serve` and `ui` take --uri (default: the store
`train` uses: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db).

examples:
  tunelab train
  tunelab train training.lr=1e-3 checkpoint=steps checkpoint.every=200 checkpoint.keep=2
  tunelab train -m training.lr=1e-4,3e-4 seed=1,2
  tunelab train experiment=addition_small
  tunelab launch --standalone --nproc_per_node 2 train training.lr=1e-4
  tunelab train model=hf model.name_or_path=PATH data=text_files data.train=a.jsonl
"""


TOOL_NAMES = (
    "runs",
    "export",
    "register",
    "generate",
    "predict",
    "serve",
    "ui",
    "cache",
    "server",
)  # tools.TOOLS


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except SystemExit as exc:
        if exc.code in (None, 0):
            distributed.close()
        launch.note_exit(exc.code)  # a worker of `tunelab launch` tells it the code it chose
        raise
    distributed.close()
    launch.note_exit(0)


def _main(argv: list[str] | None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        if "-v" in rest or "--verbose" in rest:  # the libraries' output, as they print it
            os.environ[console.VERBOSE] = "1"
            rest = [a for a in rest if a not in ("-v", "--verbose")]
        train(rest)
    elif command == "launch":
        launch.main(rest)
    elif command in TOOL_NAMES:
        _run_tool(command, rest)
    else:
        known = ", ".join(["train", "launch", *TOOL_NAMES])
        print(f"tunelab: unknown command {command!r}; commands: {known}", file=sys.stderr)
        raise SystemExit(2)


def _run_tool(command: str, args: list[str]) -> None:
    """Run a store tool; an unreachable store or a bad argument is one line, not a traceback."""
    # The one import of tunelab's own inside a function: the tools' modules (tracking, inference,
    # the team server) load only when a tool runs, so `train` and its config errors stay light.
    from tunelab import tools

    try:
        tools.TOOLS[command](args)
    except (errors.TunelabError, OSError, RuntimeError) as exc:
        print(f"tunelab {command}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def train(args: list[str]) -> None:
    """Run Hydra's app with `args` exactly as if they followed a Hydra script's name."""
    import hydra

    distributed.follow_launcher()
    # Every job's config, before Hydra creates anything: one line per problem, exit 2.
    if problems := _on_every_rank(preflight.check_jobs(args)):
        for line in config.ConfigError(problems).lines() if distributed.is_main() else []:
            print(line, file=sys.stderr)  # under torchrun every rank has them: rank 0 says them
        raise SystemExit(config.ConfigError.exit_code)
    # A `resume=never` directory's suffix: rank 0's on every rank, so that all name the same one.
    suffix = distributed.decided_by_rank_zero("fresh-suffix", config.own_fresh_suffix)
    config.set_fresh_suffix(suffix)
    config.serve_experiments()
    app = hydra.main(config_path=str(paths.conf_dir()), config_name="train", version_base="1.3")(
        train_job
    )
    sys.argv = [sys.argv[0], *args]
    sweeps.forget_failures()  # a process may run several commands (tests, notebooks)
    try:
        app()
        failed, unrecorded = sweeps.failed_jobs(), sweeps.unrecorded_end()
        unranked = sweeps.unranked_objective()
        if failed:
            print(f"tunelab: {failed} job(s) of the sweep failed (see above)", file=sys.stderr)
        if unranked:
            print(
                f"tunelab: no job of the sweep reported its objective {unranked}, so none is "
                "best; set sweep.objective to a metric its runs log (see `tunelab runs`)",
                file=sys.stderr,
            )
        if unrecorded:
            print(
                f"tunelab: the sweep's outcome could not be recorded in its tracking store "
                f"({unrecorded}); its parent run is ended by the next tunelab command on this "
                "host, and the same command, once the store answers, records it (finished jobs "
                "are skipped)",
                file=sys.stderr,
            )
        if failed or unrecorded or unranked:
            raise SystemExit(1)
    except KeyboardInterrupt as exc:
        # SIGTERM/SIGINT: the run wrote a checkpoint and is KILLED in MLflow; the same command
        # resumes it. Exit as a process killed by that signal would (128 + signal number).
        signum = getattr(exc, "signum", 2)
        if distributed.is_main():  # under torchrun every rank stopped
            print(
                f"tunelab: {exc or 'interrupted'}; run the same command again to resume",
                file=sys.stderr,
            )
        raise SystemExit(128 + signum) from None


def _on_every_rank(problems: list[str]) -> list[str]:
    """Under torchrun: rank 0's config problems, or when it has none another rank's (named), on
    every rank, so that all stop together and rank 0 says why (a rank's config can differ from
    rank 0's: another working directory, other conf files or environment)."""
    everyone = [json.loads(x) for x in distributed.gather("preflight", json.dumps(problems))]
    named = [f"rank {r}: {p}" for r, theirs in enumerate(everyone) for p in theirs]
    return list(everyone[0]) or named


def train_job(cfg: DictConfig) -> float | dict[str, float] | None:
    """One job (Hydra's task function): checked unless preflight already did, then handed to
    the runner. Returns the job's objective, for Hydra's sweepers (a pruned trial: where it was
    pruned). A single run that fails
    prints one line and exits (2 for bad config or data, 1 otherwise); in a sweep the job's
    failure is noted beside it, counted on the parent, and the other jobs go on."""
    distributed.from_slurm_tasks()
    distributed.quiet_replicas()
    console.quiet_libraries()
    job = sweeps.current_job(cfg.get("name"))
    try:
        preflight.require_valid(cfg)  # unless preflight checked it (not a sweeper's choice)
        result = runner.run(
            cfg, job.run_dir, job.overrides, tags=job.tags, name=job.name, trial=job.trial
        )
    except errors.TrialPruned as exc:
        if distributed.is_main():
            print(f"tunelab: trial {job.num} ({job.name}) {exc}")
        return {"pruned_at": exc.step, "value": exc.value}  # the sweeper tells the study
    except Exception as exc:
        known = _known_failure(exc)
        if job.in_sweep:
            said = known[1] if known else []
            why = said[0].removeprefix("tunelab: ") if said else f"{type(exc).__name__}: {exc}"
            sweeps.job_failed(job, (why.splitlines() or [type(exc).__name__])[0])
            return None
        if known is None:
            raise  # a bug, or an error from training itself: its traceback is what to read
        code, lines = known
        # Bad config or data (on every rank alike), or a store that refused the run before it
        # started: leave nothing behind.
        if code == 2 or isinstance(exc, errors.TrackingUnavailable):
            _remove_if_untouched(job.run_dir)
        if distributed.is_main() or not isinstance(exc, errors.ConfigError):
            for line in lines:  # every rank meets the same config and data errors
                print(line, file=sys.stderr)
        raise SystemExit(code) from None
    finally:
        console.job_ended()
        sweeps.job_released(job)
    if not result.already_finished and distributed.is_main():
        print(result.summary())
    return result.objective


def _known_failure(exc: Exception) -> tuple[int, list[str]] | None:
    """The exit code and the lines that say why a job failed, for errors of a kind tunelab
    knows (one line each); None for anything else."""
    if isinstance(exc, errors.TunelabError):
        return exc.exit_code, exc.lines()
    if distributed.peer_lost(exc):
        return 1, [
            f"tunelab: rank {distributed.rank()}: another process of this run stopped (the "
            "connection to it was lost); stopping too. Committed checkpoints are intact: run "
            "the same command again to resume."
        ]
    from safetensors import SafetensorError

    if isinstance(exc, (OSError, SafetensorError)):  # the artifact on a full disk, say
        return 1, [f"tunelab: cannot write the run's files: {exc}"]
    return None


def _remove_if_untouched(run_dir: Path) -> None:
    """Remove a run directory that holds only what Hydra and the lock put there, unless a live
    process holds its lock (a run that has only just started in it)."""
    hydras = {".hydra", "train.log", locks.RUN_LOCK}
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= hydras:
        return
    try:
        with locks.run_dir(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
    except locks.Busy:
        pass
