"""What the tests share: tiny, real training runs through the real CLI, against real sqlite
stores, and the helpers to start, wait for and read them (the fixtures and pytest's hooks are in
conftest.py).

Most runs call `tunelab.cli.main` in this process (`run_cli`, `Workspace.train`, `run_here`):
Hydra, the runner, Trainer and MLflow all run for real, without paying ~6 s of imports per run.
Tests whose point is a process (kill -9, signals, exit codes, what a fresh interpreter imports,
launchers that start workers) start real ones (`tunelab`, `Workspace.popen`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's sources first, whatever the venv's (editable) install points at: the runs made
# in this process test the same code as the processes `env()` starts.
sys.path.insert(0, str(REPO / "src"))

# Offline (no hub lookups), system metrics sampled every second (not every 5), and
# one compute thread: the tiny models gain nothing from a second one, and on a machine whose
# cores are busy with other work, torch's threads waiting for each other at every small op make
# a run 10x slower. Set for this process too, before anything imports torch, huggingface_hub or
# mlflow.
TEST_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
os.environ.update(TEST_ENV)
os.environ.pop("MLFLOW_TRACKING_URI", None)

# A model of ~40k parameters on 2-digit addition: a run is a few seconds of real training.
TINY = [
    "model.arch.n_embd=32",
    "model.arch.n_layer=2",
    "model.arch.n_head=2",
    "model.arch.n_positions=16",
    "data.digits=2",
    "data.train_size=256",
    "data.eval_size=32",
    "data.max_length=16",
    "training.max_steps=8",
    "training.eval_every=4",
    "training.log_every=2",
    "training.batch_size=16",
    "training.eval_batch_size=32",
    "training.warmup_steps=0",
    "training.progress_bar=false",
]


# TINY's model without the addition data's keys: the tiny model on `data=text_files`.
TINY_MODEL = [
    o for o in TINY if not o.startswith(("data.digits", "data.train_size", "data.eval_size"))
]


def tiny(*overrides: str) -> list[str]:
    """TINY with `overrides` on top: an override of a key TINY sets replaces TINY's (one value
    per key on the command line, and in the run's name)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [*(o for o in TINY if o.split("=", 1)[0] not in keys), *overrides]


def files_cfg(path: Path, **extra: object):
    """The composed `data` config reading `path` with `data=text_files` (and data.KEY=VALUE for
    each of `extra`)."""
    from tunelab import config

    overrides = ["data=text_files", f"data.train={path}"]
    return config.compose([*overrides, *(f"data.{k}={v}" for k, v in extra.items())]).data


# ---------------------------------------------------------------------------------------------
# Real processes.


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(TEST_ENV)
    e.pop("MLFLOW_TRACKING_URI", None)
    # Child processes run in temporary directories: put this checkout's sources first, by
    # absolute path, so they run the code under test (not whatever the venv's install points at).
    e["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), *filter(None, e.get("PYTHONPATH", "").split(os.pathsep))]
    )
    e.update(extra)
    return e


def tunelab(*args: str, cwd: Path, check: bool = True, timeout: float = 600):
    """Run `python -m tunelab ARGS` in a fresh process; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"tunelab {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


# ---------------------------------------------------------------------------------------------
# Long real processes started as soon as the tests are collected, to run on the second core
# while the (single-threaded) tests run on the first. A fixture of the same name hands one over.


class Background:
    """A real process, its output in files, in a temporary directory of its own."""

    def __init__(self, args: list[str], root: Path, url: str = "") -> None:
        self.root, self.args, self.url = root, args, url
        self.stdout, self.stderr = self.root / "stdout.txt", self.root / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(args, cwd=self.root, env=env(), stdout=out, stderr=err)

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for it (`timeout` seconds, counted from now), then its output."""
        self.proc.wait(timeout=timeout)
        return subprocess.CompletedProcess(
            self.args, self.proc.returncode, self.stdout.read_text(), self.stderr.read_text()
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def free_port() -> int:
    """A free port on 127.0.0.1, as `tunelab server` finds one."""
    from tunelab.teamserver import free_port as find

    return find()


@contextlib.contextmanager
def served_model(model_uri: str, store_uri: str, cwd: Path) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` (a Logged Model of the store `store_uri`) in a real
    process on a free loopback port: yields its URL once /ping answers, stops it after."""
    for _ in range(3):
        server, url = _start_scoring_server(model_uri, store_uri, cwd)
        try:
            if _answers_ping(server, url):
                yield url
                return
        finally:
            if server.poll() is None:
                server.terminate()
                server.communicate(timeout=30)
    raise AssertionError("mlflow models serve: its free port was taken, 3 times")


def _answers_ping(server: subprocess.Popen, url: str) -> bool:
    """True once the scoring server answers; False when its port was taken between being found
    free and being bound; an AssertionError with its output for any other failure."""
    deadline = time.monotonic() + 240
    while True:
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2)
            return True
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                error = server.communicate()[1][-3000:]
                if "address already in use" in error.lower():
                    return False
                raise AssertionError(error) from None
            time.sleep(0.2)


def _start_scoring_server(
    model_uri: str, store_uri: str, cwd: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    server = subprocess.Popen(
        [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", model_uri,
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        # The scoring server runs `uvicorn` from the environment's bin directory.
        env={**env(), "MLFLOW_TRACKING_URI": store_uri,
             "PATH": bin_dir + os.pathsep + os.environ["PATH"]},
        cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return server, f"http://127.0.0.1:{port}"


def invoke(url: str, payload: dict) -> dict:
    """POST `payload` to a scoring server's /invocations; its JSON answer."""
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


# ---------------------------------------------------------------------------------------------
# The CLI in this process.


@dataclass
class Result:
    """What `tunelab ARGS` left, as a process would: exit status, stdout, stderr."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def _import_heavy_libraries() -> None:
    """Import them outside any output capture: their loggers bind sys.stderr once, at import."""
    import mlflow  # noqa: F401
    import torch
    import transformers  # noqa: F401

    torch.set_num_threads(1)  # as OMP_NUM_THREADS says, should torch have been imported before


def _freeze_what_lives() -> None:
    """Collect the garbage, then move every object still alive (modules, mostly) out of the
    garbage collector's sight. A run calls gc.collect() (tunelab after each job, accelerate on
    cleanup): in a process holding torch, transformers and mlflow each call costs most of a
    second otherwise. Only the cycle collector skips frozen objects; nothing else changes."""
    import gc

    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def _restored_process_state(cwd: Path) -> Iterator[None]:
    """Run in `cwd`, then put back what a run changes in a process: cwd, sys.argv, environment
    (TUNELAB_SWEEP, TUNELAB_EXPERIMENTS_DIR, MLFLOW_TRACKING_URI, ...), Hydra's global state and
    the logging setup Hydra installs. SIGTERM/SIGINT handlers are put back too, and a run that
    left its own installed is an error: `runner.run` must uninstall them."""
    from hydra.core.global_hydra import GlobalHydra

    saved_cwd, saved_argv, saved_env = os.getcwd(), sys.argv, dict(os.environ)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    os.chdir(cwd)
    leaked = []
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()  # Hydra's console and train.log handlers
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for sig, handler in saved_signals.items():
            if signal.getsignal(sig) is not handler:
                leaked.append(signal.Signals(sig).name)
                signal.signal(sig, handler)
    assert not leaked, f"the run left its {leaked} handlers installed"


def run_cli(
    *args: str,
    cwd: Path,
    check: bool = True,
    light: bool = False,
    environ: dict[str, str] | None = None,
) -> Result:
    """`tunelab ARGS` in this process, in `cwd`, with `environ` added to the environment for the
    call. An exception escaping `main` counts as exit status 1 with its traceback on stderr, as
    in a process. `light`: the command is expected to stop before importing torch, transformers
    or mlflow (config errors)."""
    from tunelab import cli

    if not light:
        _import_heavy_libraries()
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    captured = (contextlib.redirect_stdout(out), contextlib.redirect_stderr(err))
    with _restored_process_state(cwd), captured[0], captured[1]:
        os.environ.update(environ or {})
        try:
            cli.main(list(args))
        except SystemExit as exc:
            code = exc.code
        except Exception:
            traceback.print_exc()
            code = 1
    if not light:
        _freeze_what_lives()
    if isinstance(code, str):  # sys.exit("message")
        err.write(code + "\n")
        code = 1
    result = Result(list(args), code or 0, out.getvalue(), err.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(
            f"tunelab {' '.join(args)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


# ---------------------------------------------------------------------------------------------
# Stores, runs and checkpoints.


def runs_of(ws_or_uri: Workspace | str, experiment: str = "tunelab"):
    """(client, the experiment's runs) of a store."""
    from mlflow import MlflowClient

    uri = ws_or_uri.uri if isinstance(ws_or_uri, Workspace) else ws_or_uri
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return client, client.search_runs([exp.experiment_id])


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Until `predicate()` is true; fails when `proc` ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read()[-3000:] if proc.stdout else "(its output went to a file)"
            raise AssertionError(f"process ended early:\n{out}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def committed_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under a checkpoints directory, ascending."""
    from tunelab import checkpoints

    return sorted(checkpoints.step_of(p) for p in checkpoints.committed(root))


@dataclass
class Workspace:
    root: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def base(self) -> list[str]:
        return [f"output.root={self.root / 'outputs'}", f"tracking.uri={self.uri}"]

    def train(self, *overrides: str, check: bool = True, environ: dict | None = None) -> Result:
        """`tunelab train` of the tiny model, in this process."""
        args = ["train", *self.base(), *tiny(*overrides)]
        return run_cli(*args, cwd=self.root, check=check, environ=environ)

    def popen(self, *overrides: str, **extra_env: str) -> subprocess.Popen:
        """`tunelab train` of the tiny model in a real process; output on .stdout."""
        return subprocess.Popen(
            [sys.executable, "-m", "tunelab", "train", *self.base(), *tiny(*overrides)],
            cwd=self.root,
            env=env(**extra_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run_dirs(self, experiment: str = "tunelab") -> list[Path]:
        parent = self.root / "outputs" / experiment
        return sorted(p for p in parent.iterdir() if p.is_dir()) if parent.exists() else []

    def runs(self, experiment: str = "tunelab") -> list:
        """The experiment's MLflow runs ([] before it exists: a predicate to wait on)."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        exp = client.get_experiment_by_name(experiment)
        return client.search_runs([exp.experiment_id]) if exp else []

    def ready_store(self) -> None:
        """Create and migrate the store before a process and the test both open it."""
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=self.uri).search_experiments()

    def committed(self) -> list[int]:
        """Steps of the complete checkpoints of the workspace's one run, ascending."""
        return committed_steps(self.checkpoints())

    def run_dir(self, experiment: str = "tunelab") -> Path:
        """The workspace's one run directory."""
        (found,) = [d for d in self.run_dirs(experiment) if d.name != "sweeps"]
        return found

    def checkpoints(self) -> Path:
        """The checkpoints directory of the workspace's only run (a path that does not exist
        until the run directory does)."""
        dirs = [d for d in self.run_dirs() if d.name != "sweeps"]
        assert len(dirs) <= 1, dirs
        return dirs[0] / "checkpoints" if dirs else self.root / "no-run-yet"


def run_here(overrides: list[str], run_dir: Path, *where: str):
    """One run in this process through `runner.run` itself (no CLI, no Hydra app): the
    `overrides` name the run; `where` (output.root, tracking) do not. Returns its RunResult."""
    from tunelab import config, preflight, runner

    cfg = config.compose([*overrides, *where])
    preflight.require_valid(cfg)
    return runner.run(cfg, run_dir, list(overrides))


def new_workspace(root: Path, store: Path | None) -> Workspace:
    """A workspace in `root`, holding a copy of the empty store `store` (None: no store yet)."""
    root.mkdir(parents=True, exist_ok=True)
    if store is not None:
        shutil.copy(store, root / "mlflow.db")
    return Workspace(root)
