"""pytest's fixtures and hooks for the suite; what the tests share is in tests/helpers.py."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import TINY, Background, Workspace, free_port, new_workspace, run_here


def _default_run() -> Background:
    """`tunelab train` with the defaults: only where things go is changed."""
    root = Path(tempfile.mkdtemp(prefix="tunelab-default-run-"))
    args = [sys.executable, "-m", "tunelab", "train", f"output.root={root / 'outputs'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            "training.progress_bar=false"]  # fmt: skip
    return Background(args, root)


def _mlflow_server() -> Background:
    """A real MLflow tracking server with proxied artifacts, on a free loopback port."""
    root = Path(tempfile.mkdtemp(prefix="tunelab-server-"))
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]  # fmt: skip
    return Background(args, root, url=f"http://127.0.0.1:{port}")


PRESTART = {"default_run": _default_run, "mlflow_server": _mlflow_server}
_started: dict[str, Background] = {}


# The longest files first: under xdist (`make test` runs 2 workers, a file per worker at a
# time) they start at once and the short ones fill in around them.
LONGEST_FIRST = ("test_default_run.py", "test_server.py", "test_distributed.py",
                 "test_reliability.py", "test_sweeps.py", "test_checkpoints.py")  # fmt: skip


def _longest_first(item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only what selected tests need
def pytest_collection_modifyitems(config, items) -> None:
    items.sort(key=_longest_first)  # stable: each file keeps its own order
    if config.option.collectonly or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under xdist each worker collects every test: started when first needed
    wanted = {name for item in items for name in getattr(item, "fixturenames", ())}
    for name, start in PRESTART.items():
        if name in wanted and name not in _started:
            _started[name] = start()


def pytest_sessionfinish(session) -> None:
    for background in _started.values():
        background.stop()


def prestarted(name: str) -> Background:
    if name not in _started:  # collected some other way: start it now
        _started[name] = PRESTART[name]()
    return _started[name]


@pytest.fixture(scope="session")
def default_run() -> tuple[Path, subprocess.CompletedProcess]:
    """The default run (`make train`), in a real process: (its directory, the process)."""
    run = prestarted("default_run")
    return run.root, run.wait(timeout=900)


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[str]:
    """The URL of a real MLflow server, started with the session."""
    server = prestarted("mlflow_server")
    deadline, tries = time.monotonic() + 180, 1
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            # Its free port was taken between being found and being bound: another one.
            assert tries < 3, server.stderr.read_text()[-3000:]
            server.stop()
            server = _started["mlflow_server"] = _mlflow_server()
            tries += 1
        try:
            urllib.request.urlopen(server.url + "/health", timeout=2)
            break
        except OSError:
            time.sleep(0.2)
    else:
        pytest.fail("mlflow server did not start")
    yield server.url


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated, empty sqlite MLflow store per session (creating and migrating one takes
    seconds); each workspace gets a copy of the file."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("empty-store")
    path = root / "mlflow.db"
    saved = os.getcwd()
    os.chdir(root)  # MLflow's Default experiment points at ./mlruns: keep it out of the repo
    try:
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    finally:
        os.chdir(saved)
    return path


@pytest.fixture
def workspace(tmp_path: Path, empty_store: Path) -> Workspace:
    return new_workspace(tmp_path / "ws", empty_store)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, empty_store: Path):
    """One tiny run through the CLI, shared by the tests that inspect its results (read-only:
    a test that trains again does it in a workspace of its own)."""
    ws = new_workspace(tmp_path_factory.mktemp("trained"), empty_store)
    # MLflow publishes system metrics once a sampling interval has passed: make it shorter than
    # any run can be, so that they are there to check however fast the machine.
    fast_sampling = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.05"}
    result = ws.train("checkpoint=none", environ=fast_sampling)
    (run_dir,) = ws.run_dirs()
    return ws, run_dir, result


@pytest.fixture(scope="session")
def tiny_tracked(tmp_path_factory: pytest.TempPathFactory):
    """One tiny tracked run of 2 steps through `runner.run`, in this process: (workspace, run
    directory, run id). A test that alters its store puts it back."""
    ws = Workspace(tmp_path_factory.mktemp("tiny-tracked"))
    overrides = [*TINY, "checkpoint=none", "training.max_steps=2"]
    with pytest.MonkeyPatch.context() as patch:  # MLflow's own sampler: every 5 s, too late
        patch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
        result = run_here(overrides, ws.root / "run", *ws.base())
    return ws, ws.root / "run", result.run_id


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for two checkpoints of the tiny model, not three. Needs mount rights
    (root with CAP_SYS_ADMIN, as on the project's machines); skipped otherwise."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()})")
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], check=True)
