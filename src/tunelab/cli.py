"""The `tunelab` command. `train` hands its arguments to Hydra; the rest are small argparse tools.

Heavy libraries are imported inside the commands, so `--help`, `--cfg job` and config errors
answer without loading torch, transformers or mlflow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tunelab import paths

USAGE = """\
usage: tunelab <command> [args]

commands:
  train [overrides]   train one run (Hydra: `-m` sweeps, `--cfg job`, `--help`, `-cd DIR`)
  ui [--port N]       MLflow UI on the same store `tunelab train` writes to (127.0.0.1)

examples:
  tunelab train
  tunelab train training.lr=1e-3 checkpoint=steps checkpoint.every=200 checkpoint.keep=2
  tunelab train -m training.lr=1e-4,3e-4 seed=1,2
  tunelab train experiment=addition_small
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
    elif command == "ui":
        ui(rest)
    else:
        print(f"tunelab: unknown command {command!r}; commands: train, ui", file=sys.stderr)
        raise SystemExit(2)


def train(args: list[str]) -> None:
    """Run Hydra's app with `args` exactly as if they followed a Hydra script's name."""
    import hydra

    os.environ.setdefault("TUNELAB_EXPERIMENTS_DIR", str(paths.experiments_dir()))
    app = hydra.main(config_path=str(paths.conf_dir()), config_name="train", version_base="1.3")(
        train_job
    )
    sys.argv = [sys.argv[0], *args]
    try:
        app()
    except KeyboardInterrupt as exc:
        # SIGTERM/SIGINT: the run wrote a checkpoint and is KILLED in MLflow; the same command
        # resumes it. Exit as a process killed by that signal would (128 + signal number).
        signum = getattr(exc, "signum", 2)
        print(
            f"tunelab: {exc or 'interrupted'}; run the same command again to resume",
            file=sys.stderr,
        )
        raise SystemExit(128 + signum) from None


def train_job(cfg):  # type: ignore[no-untyped-def]  # Hydra's task function
    """One job: validate (again, for sweeps), then hand over to the runner."""
    from hydra.core.hydra_config import HydraConfig

    from tunelab import config

    config.exit_on_problems(config.validate(cfg))
    hc = HydraConfig.get()
    from hydra.types import RunMode

    from tunelab import runner

    tags = {}
    if hc.mode == RunMode.MULTIRUN:
        tags = {"tunelab.sweep_id": Path(hc.sweep.dir).name, "tunelab.job_num": str(hc.job.num)}
    try:
        result = runner.run(
            cfg, run_dir=hc.runtime.output_dir, overrides=list(hc.overrides.task), tags=tags
        )
    except config.ConfigError as exc:
        config.exit_on_problems(exc.problems)
    if not result.extra.get("already_finished"):
        print(result.summary())
    return result.objective


def ui(args: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="tunelab ui", description="Open the MLflow UI.")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--uri", default=None, help="tracking URI (default: the one train uses)")
    opts = parser.parse_args(args)
    from tunelab.tracking import resolve_uri

    uri = resolve_uri(opts.uri)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", "127.0.0.1", "--port", str(opts.port)]
    print(f"tunelab: MLflow UI for {uri} at http://127.0.0.1:{opts.port}", flush=True)
    os.execv(sys.executable, cmd)
