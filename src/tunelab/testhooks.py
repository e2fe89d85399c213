"""Points where a test holds a run for a few seconds, to signal or kill it at that moment.

Each is an environment variable giving the seconds to wait (unset or 0 in real use), and
`..._UNTIL` instead of `..._DELAY` names a file to wait for:

- `TUNELAB_TEST_START_DELAY`: the MLflow run exists, the run record not yet.
- `TUNELAB_TEST_STAGE_DELAY`: a background checkpoint's state is being copied (its `.partial`
  directory exists, the writer has not taken it).
- `TUNELAB_TEST_COMMIT_DELAY`: a checkpoint is written but not committed (before the background
  write, or between Trainer's synchronous write and the manifest).
- `TUNELAB_TEST_FINISH_DELAY`: the run is ending and its MLflow status is not written yet.
"""

from __future__ import annotations

import os
import time


def pause(point: str) -> None:
    """Wait `TUNELAB_TEST_<POINT>_DELAY` seconds, then until the file `TUNELAB_TEST_<POINT>_UNTIL`
    names exists (at most 10 minutes): a test that must act while the process waits here
    releases it when it is done, however slow the machine."""
    seconds = float(os.environ.get(f"TUNELAB_TEST_{point}_DELAY") or 0)
    if seconds:
        time.sleep(seconds)
    until = os.environ.get(f"TUNELAB_TEST_{point}_UNTIL")
    deadline = time.monotonic() + 600
    while until and not os.path.exists(until) and time.monotonic() < deadline:
        time.sleep(0.05)
