"""The small commands beside `train`: runs, export, generate, predict, ui, cache, server.
Each parses its own arguments (argparse); a bad argument is argparse's one line (exit 2), a store
or model that refuses is one line from `cli` (exit 1). Heavy libraries load inside the commands
that need them."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tunelab import config, inference, metrics, sweeps, teamserver, tracking
from tunelab.data import cache as data_cache
from tunelab.errors import ModelRefused
from tunelab.teamserver.processes import stop_group
from tunelab.tracking.store import MODEL_TRAINING, resolve_uri, ui_hint


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


def _parser(command: str, description: str) -> argparse.ArgumentParser:
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
        tags, jobs = sweeps.find_parent(opts.uri, opts.experiment, opts.sweep)
        print(sweeps.summary(jobs).replace("sweep finished, best first", f"sweep {opts.sweep}"))
        if tags.get(sweeps.REGISTERED):
            print(f"  registered: {tags[sweeps.REGISTERED]}")
        return
    rows = tracking.recent_runs(opts.uri, opts.experiment, opts.limit)
    if not rows:
        print(f"no runs in experiment {opts.experiment!r}")
        return

    def cell(v: object) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    shown = metrics.columns([r["task"] for r in rows], [r["objective"] for r in rows])
    header = ["run id", "name", "status", *shown, "duration", "model", "artifact"]
    table = [
        [r["run_id"][:12], _cut(r["name"], 40), r["status"],
         *(cell(r["metrics"].get(m)) for m in shown), f"{r['duration_s']:.0f}s",
         r["model"] or "-", r["artifact"]]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=False)]
    for line in [header, *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=False)).rstrip())
    print(f"MLflow UI: {ui_hint(resolve_uri(opts.uri), rows[0]['experiment_id'])}")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def export(args: list[str]) -> None:
    parser = _parser("export", "Download a run's model into DIR, ready for from_pretrained.")
    parser.add_argument("run", help="run id, runs:/ID/model or models:/ID")
    parser.add_argument("dir")
    opts = parser.parse_args(args)
    dst = Path(opts.dir)
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise FileExistsError(f"{dst} exists and is not a directory; choose a new directory")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new directory")
    if dst.exists():
        dst.rmdir()
    tracking.download_model(opts.run, dst, opts.uri)
    print(f"exported {opts.run} to {dst} (verified against its manifest)")


def register(args: list[str]) -> None:
    parser = _parser("register", "Register a run's model in MLflow's Model Registry.")
    parser.add_argument("run", help="the run id")
    parser.add_argument("name", help="the registered model's name (created if new)")
    parser.add_argument("--alias", default=tracking.registry.CHAMPION, help="default: champion")
    opts = parser.parse_args(args)
    done = tracking.registry.register(opts.uri, opts.run, opts.name, opts.alias)
    print(
        f"registered run {opts.run} as {done.name} version {done.version} (@{done.alias}); "
        f"load it with {done.uri}"
    )


def serve(args: list[str]) -> None:
    parser = _parser("serve", "Serve a run's model over HTTP with MLflow's scoring server.")
    parser.add_argument("model", help="a run id, runs:/ID, or models:/m-ID | NAME@ALIAS | NAME/N")
    parser.add_argument("--port", type=_port, default=5001)
    opts = parser.parse_args(args)
    uri = resolve_uri(opts.uri)
    model_uri = tracking.registry.servable(uri, opts.model)
    # MLflow's scoring server starts `uvicorn` by name: this environment's, from any shell.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env["PATH"] = os.pathsep.join(filter(None, [bin_dir, os.environ.get("PATH")]))
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), _QUIET]))
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(opts.port)]  # fmt: skip
    print(f"tunelab: serving {model_uri} at http://127.0.0.1:{opts.port}/invocations "
          '(POST {"inputs": [...]}; Ctrl-C stops it)', flush=True)  # fmt: skip
    _serve_until_stopped(cmd, env, "model server")


def generate(args: list[str]) -> None:
    parser = _parser("generate", "Continue PROMPT with a model, greedily, to check it by eye.")
    parser.add_argument("model", help="a model directory, a run id, or runs:/ / models:/ URI")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=_positive, default=16)
    opts = parser.parse_args(args)
    with _local_model(opts.model, opts.uri) as path:
        print(opts.prompt + inference.generate(path, opts.prompt, opts.max_new_tokens))


def predict(args: list[str]) -> None:
    parser = _parser("predict", "Label TEXT with a classifier or tagger: one line per text.")
    parser.add_argument("model", help="a model directory, a run id, or runs:/ / models:/ URI")
    parser.add_argument("text", nargs="+")
    opts = parser.parse_args(args)
    with _local_model(opts.model, opts.uri) as path:
        for text, answer in zip(opts.text, inference.predict(path, opts.text), strict=True):
            print(f"{text}\t{answer}")


@contextlib.contextmanager
def _local_model(model: str, uri: str | None) -> Iterator[str]:
    """A model directory as it is, or a run's model downloaded (and verified) for the call."""
    if Path(model).is_dir():
        yield model
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the answer alone
    with tempfile.TemporaryDirectory() as tmp:
        path = str(tracking.download_model(model, Path(tmp) / "model", uri))
        try:
            yield path
        except ModelRefused as exc:  # named as the user named it, not by the download's path
            raise ModelRefused(str(exc).replace(path, model)) from None


def ui(args: list[str]) -> None:
    parser = _parser("ui", "Open the MLflow UI on the store train writes to.")
    parser.add_argument("--port", type=_port, default=5000)
    opts = parser.parse_args(args)
    uri = resolve_uri(opts.uri)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", "127.0.0.1", "--port", str(opts.port)]
    # A viewer for one person: one worker, no access log, quick to shut down; no job runner
    # (MLflow's GenAI jobs), no Starlette deprecation warnings.
    cmd += ["--workers", "1", "--uvicorn-opts", "--no-access-log --log-level warning "
            "--timeout-graceful-shutdown 1"]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), _QUIET]))
    page = f"http://127.0.0.1:{opts.port}/#/experiments{MODEL_TRAINING}"
    print(f"tunelab: MLflow UI for {uri} at {page} (Ctrl-C stops it)", flush=True)
    _serve_until_stopped(cmd, env, "MLflow UI")


# Python's -W filters (by message: a category outside the standard library cannot be named).
_QUIET = "ignore::DeprecationWarning,ignore:starlette"


def _serve_until_stopped(cmd: list[str], env: dict[str, str], what: str) -> None:
    """Run a server in a session of its own until it exits, or until Ctrl-C or SIGTERM here:
    then it gets one SIGTERM (its own clean shutdown; a terminal's Ctrl-C would otherwise reach
    each of its processes at once), and SIGKILL if it is not gone in 3 s."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        stop_group(proc.pid, grace=3)  # its workers, too
        proc.wait()
        print(f"tunelab: {what} stopped", flush=True)
        return
    if code:
        raise SystemExit(f"tunelab: {what} exited with status {code} (see above)")


def cache(args: list[str]) -> None:
    """List the data cache of an output root, or prune it to the limits (the data config's
    cache_max_gb and cache_max_age_days unless given): never an entry a process uses."""
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
    teamserver.main(args)


TOOLS = {"runs": runs, "export": export, "register": register, "generate": generate,
         "predict": predict, "serve": serve, "ui": ui, "cache": cache,
         "server": server}  # fmt: skip
