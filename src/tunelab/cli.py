"""The `tunelab` command. `train` hands its arguments to Hydra; the rest are small argparse tools.

Heavy libraries are imported inside the commands, so `--help`, `--cfg job` and config errors
answer without loading torch, transformers or mlflow.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab import config, distributed, paths, preflight, sweeps

if TYPE_CHECKING:
    import argparse

    from omegaconf import DictConfig

USAGE = """\
usage: tunelab <command> [args]

commands:
  train [overrides]   train one run (Hydra: `-m` sweeps, `--cfg job`, `--help`, `-cd DIR`)
  launch [torchrun options] train [overrides]
                      the same run in several processes (DDP): torchrun, a line per fault
  runs                recent runs: name, status, key metrics, duration, artifact
  export RUN_ID DIR   download a run's model, ready for from_pretrained(DIR)
  generate PATH|RUN_ID PROMPT
                      load a model (directory, run id or runs:/ URI) and continue PROMPT
  predict PATH|RUN_ID TEXT...
                      label each TEXT with a classifier, or tag its words with a tagger
  ui [--port N]       MLflow UI on the same store `tunelab train` writes to (127.0.0.1)
  cache [prune]       the prepared-data cache under output.root: list it, or prune it now
  server [--dir DIR] [--port N]
                      a team tracking server: MLflow on PostgreSQL, proxied artifacts, on
                      127.0.0.1 (`make server`); runs use tracking.uri=http://127.0.0.1:N

`runs`, `export`, `generate`, `predict` and `ui` take --uri (default: the store `train` uses:
$MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db).

examples:
  tunelab train
  tunelab train training.lr=1e-3 checkpoint=steps checkpoint.every=200 checkpoint.keep=2
  tunelab train -m training.lr=1e-4,3e-4 seed=1,2
  tunelab train experiment=addition_small
  tunelab launch --standalone --nproc_per_node 2 train training.lr=1e-4
  tunelab train model=hf model.name_or_path=PATH data=text_files data.train=a.jsonl
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        train(rest)
    elif command == "launch":
        from tunelab import launch

        launch.main(rest)
    elif command in TOOLS:
        _run_tool(command, rest)
    else:
        known = ", ".join(["train", "launch", *TOOLS])
        print(f"tunelab: unknown command {command!r}; commands: {known}", file=sys.stderr)
        raise SystemExit(2)


def _run_tool(command: str, args: list[str]) -> None:
    """Run a store tool; an unreachable store or a bad argument is one line, not a traceback."""
    from tunelab.errors import TunelabError
    from tunelab.tracking import TrackingUnavailable

    try:
        TOOLS[command](args)
    except (TrackingUnavailable, TunelabError, OSError, RuntimeError) as exc:
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
        if failed:
            print(f"tunelab: {failed} job(s) of the sweep failed (see above)", file=sys.stderr)
        if unrecorded:
            print(
                f"tunelab: the sweep's outcome could not be recorded in its tracking store "
                f"({unrecorded}); its parent run is ended by the next tunelab command on this "
                "host, and the same command, once the store answers, records it (finished jobs "
                "are skipped)",
                file=sys.stderr,
            )
        if failed or unrecorded:
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
    import json

    everyone = [json.loads(x) for x in distributed.gather("preflight", json.dumps(problems))]
    named = [f"rank {r}: {p}" for r, theirs in enumerate(everyone) for p in theirs]
    return list(everyone[0]) or named


def train_job(cfg: DictConfig) -> float | None:
    """One job (Hydra's task function): validated unless preflight already did, then handed to
    the runner. Returns the job's objective, for Hydra's sweepers. A single run that fails
    prints one line and exits (2 for bad config or data, 1 otherwise); in a sweep the job's
    failure is recorded beside it, counted on the parent, and the other jobs go on."""
    import gc

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from tunelab import config, distributed, runner, sweeps
    from tunelab.tracking import TrackingUnavailable

    distributed.from_slurm_tasks()
    distributed.quiet_replicas()
    hc = HydraConfig.get()
    in_sweep = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    tags, name = {}, None
    if in_sweep:
        name = config.job_name(hc.overrides.task)
        tags = {"tunelab.sweep_id": Path(hc.sweep.dir).name, "tunelab.job_num": str(hc.job.num)}
        parent = sweeps.parent_run_id(hc.sweep.dir)
        if parent:
            tags["mlflow.parentRunId"] = parent
        sweeps.clear_failure(run_dir)
    try:
        preflight.require_valid(cfg)  # unless preflight checked it (not a sweeper's choice)
        result = runner.run(cfg, run_dir, list(hc.overrides.task), tags=tags, name=name)
    except Exception as exc:
        known = _known_failure(exc)
        if not in_sweep:
            if known is None:
                raise  # a bug, or an error from training itself: its traceback is what to read
            code, lines = known
            # Bad config or data (on every rank alike), or a store that refused the run before
            # it started: leave nothing behind.
            if code == 2 or isinstance(exc, TrackingUnavailable):
                _remove_if_untouched(run_dir)
            if distributed.is_main() or not isinstance(exc, config.ConfigError):
                for line in lines:  # every rank meets the same config and data errors
                    print(line, file=sys.stderr)
            raise SystemExit(code) from None
        said = known[1] if known else []
        why = said[0].removeprefix("tunelab: ") if said else f"{type(exc).__name__}: {exc}"
        why = (why.splitlines() or [type(exc).__name__])[0]
        print(f"tunelab: job {hc.job.num} ({name}) failed: {why}", file=sys.stderr)
        sweeps.record_failure(run_dir, name or run_dir.name, why)
        return None
    finally:
        gc.collect()  # a sequential sweep releases each job's model and data before the next
        if in_sweep:
            import logging

            import psutil

            rss = psutil.Process().memory_info().rss / 2**20
            log = logging.getLogger("tunelab")
            log.info("job %d released: process RSS %.1f MiB", hc.job.num, rss)
    if not result.already_finished and distributed.is_main():
        print(result.summary())
    return result.objective


def _known_failure(exc: Exception) -> tuple[int, list[str]] | None:
    """The exit code and the lines that say why a job failed, for errors of a kind tunelab
    knows (one line each); None for anything else."""
    from tunelab import distributed, errors

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
    import shutil

    from tunelab import locks

    hydras = {".hydra", "train.log", locks.RUN_LOCK}
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= hydras:
        return
    try:
        with locks.run_dir(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
    except locks.Busy:
        pass


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _port(text: str) -> int:
    import argparse

    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(prog=f"tunelab {command}", description=description)
    parser.add_argument("--uri", default=None, help="tracking URI (default: the one train uses)")
    return parser


def runs(args: list[str]) -> None:
    parser = _parser("runs", "Recent runs, newest first.")
    parser.add_argument("--experiment", default="tunelab")
    parser.add_argument("--limit", type=_positive, default=20)
    parser.add_argument("--sweep", default=None, help="a sweep's parent run id or name")
    opts = parser.parse_args(args)
    if opts.sweep:
        from tunelab.sweeps import find_parent, summary

        jobs = find_parent(opts.uri, opts.experiment, opts.sweep)
        print(summary(jobs).replace("sweep finished, best first", f"sweep {opts.sweep}"))
        return
    from tunelab.metrics import SUMMARY
    from tunelab.tracking import recent_runs

    rows = recent_runs(opts.uri, opts.experiment, opts.limit)
    if not rows:
        print(f"no runs in experiment {opts.experiment!r}")
        return

    def cell(v: object) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    header = ["run id", "name", "status", *SUMMARY]
    header += ["duration", "artifact"]
    table = [
        [r["run_id"][:12], _cut(r["name"], 40), r["status"], *(cell(r[m]) for m in SUMMARY),
         f"{r['duration_s']:.0f}s", r["artifact"]]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=False)]
    for line in [header, *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=False)).rstrip())
    from tunelab.tracking.store import resolve_uri, ui_hint

    print(f"MLflow UI: {ui_hint(resolve_uri(opts.uri), rows[0]['experiment_id'])}")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def export(args: list[str]) -> None:
    parser = _parser("export", "Download a run's model into DIR, ready for from_pretrained.")
    parser.add_argument("run", help="run id, runs:/ID/model or models:/ID")
    parser.add_argument("dir")
    opts = parser.parse_args(args)
    from pathlib import Path

    from tunelab.tracking import download_model

    dst = Path(opts.dir)
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise FileExistsError(f"{dst} exists and is not a directory; choose a new directory")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new directory")
    if dst.exists():
        dst.rmdir()
    download_model(opts.run, dst, opts.uri)
    print(f"exported {opts.run} to {dst} (verified against its manifest)")


def generate(args: list[str]) -> None:
    parser = _parser("generate", "Continue PROMPT with a model, greedily, to check it by eye.")
    parser.add_argument("model", help="a model directory, a run id, or runs:/ / models:/ URI")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=_positive, default=16)
    opts = parser.parse_args(args)
    from tunelab.inference import generate as continue_prompt

    with _local_model(opts.model, opts.uri) as path:
        print(opts.prompt + continue_prompt(path, opts.prompt, opts.max_new_tokens))


def predict(args: list[str]) -> None:
    parser = _parser("predict", "Label TEXT with a classifier or tagger: one line per text.")
    parser.add_argument("model", help="a model directory, a run id, or runs:/ / models:/ URI")
    parser.add_argument("text", nargs="+")
    opts = parser.parse_args(args)
    from tunelab.inference import predict as label

    with _local_model(opts.model, opts.uri) as path:
        for text, answer in zip(opts.text, label(path, opts.text), strict=True):
            print(f"{text}\t{answer}")


@contextlib.contextmanager
def _local_model(model: str, uri: str | None) -> Iterator[str]:
    """A model directory as it is, or a run's model downloaded (and verified) for the call."""
    import tempfile

    from tunelab.inference import ModelRefused
    from tunelab.tracking import download_model

    if Path(model).is_dir():
        yield model
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the answer alone
    with tempfile.TemporaryDirectory() as tmp:
        path = str(download_model(model, Path(tmp) / "model", uri))
        try:
            yield path
        except ModelRefused as exc:  # named as the user named it, not by the download's path
            raise ModelRefused(str(exc).replace(path, model)) from None


def ui(args: list[str]) -> None:
    parser = _parser("ui", "Open the MLflow UI on the store train writes to.")
    parser.add_argument("--port", type=_port, default=5000)
    opts = parser.parse_args(args)
    from tunelab.tracking import resolve_uri

    uri = resolve_uri(opts.uri)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", "127.0.0.1", "--port", str(opts.port)]
    print(f"tunelab: MLflow UI for {uri} at http://127.0.0.1:{opts.port}", flush=True)
    os.execv(sys.executable, cmd)


def cache(args: list[str]) -> None:
    """List the data cache of an output root, or prune it to the limits (the data config's
    cache_max_gb and cache_max_age_days unless given): never an entry a process uses."""
    import argparse
    import time

    from tunelab import config
    from tunelab.data import cache as data_cache

    defaults = config.compose([])

    def amount(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number, at least 0")
        return value

    parser = argparse.ArgumentParser(prog="tunelab cache", description=cache.__doc__)
    parser.add_argument("action", nargs="?", choices=("list", "prune"), default="list")
    parser.add_argument("--root", default=defaults.output.root, help="output.root")
    parser.add_argument("--max-gb", type=amount, default=defaults.data.cache_max_gb)
    parser.add_argument("--max-age-days", type=amount, default=defaults.data.cache_max_age_days)
    opts = parser.parse_args(args)
    root = Path(opts.root).expanduser().absolute() / ".cache" / "datasets"
    limits = data_cache.Limits.of({"cache_max_gb": opts.max_gb,
                                   "cache_max_age_days": opts.max_age_days})  # fmt: skip
    if opts.action == "prune":
        for entry in data_cache.prune(root, limits):
            print(f"pruned {_bytes(entry.size)}  {entry.path.relative_to(root)}")
    found = data_cache.cached_entries(root)
    size = "no size limit" if opts.max_gb is None else f"at most {opts.max_gb:g} GB"
    age = "no age limit" if opts.max_age_days is None else f"{opts.max_age_days:g} days unused"
    total = _bytes(sum(e.size for e in found)).strip()
    print(f"{root}: {len(found)} entries, {total} ({size}, {age})")
    for e in reversed(found):  # most recently used first
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used))
        held = "in use" if data_cache.in_use(root, e.path) else ""
        print(f"  {used}  {_bytes(e.size)}  {e.kind:<10}  {held:<6}  {e.path.relative_to(root)}")


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:6.1f} {unit}"
    return f"{n:6d} B "


def server(args: list[str]) -> None:
    from tunelab import teamserver

    teamserver.main(args)


TOOLS = {"runs": runs, "export": export, "generate": generate, "predict": predict, "ui": ui,
         "cache": cache, "server": server}  # fmt: skip
