"""A store that stops answering during a run: the client's settings that make it say so in
seconds, the errors that mean it, tracker calls that then do nothing, and MLflow's queued
metrics dropped rather than retried against it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

# A server that stops answering mid-run costs seconds, not MLflow's default minutes of retries
# per call (7 retries, backoff factor 2, 120 s timeouts); the environment's own values win.
CLIENT_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # Queued metrics reach the store one batch at a time, in order: MLflow sends up to 10 at
    # once, and two batches of one run with the same key race on the server's latest-metric
    # upsert (PostgreSQL: "duplicate key value violates unique constraint latest_metric_pk").
    "MLFLOW_ASYNC_LOGGING_THREADPOOL_SIZE": "1",
}


def lost_errors() -> tuple[type[BaseException], ...]:
    """What a store that stopped answering raises: MLflow's errors, HTTP and database ones."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    errors: list[type[BaseException]] = [MlflowException, RequestException, OSError]
    try:
        from sqlalchemy.exc import SQLAlchemyError

        errors.append(SQLAlchemyError)
    except ImportError:
        pass
    return tuple(errors)


class Losable(Protocol):
    """A writer to the store that knows when it has lost it (MlflowTracker)."""

    lost: str | None

    def lose(self, exc: BaseException) -> None: ...


_F = TypeVar("_F", bound=Callable[..., Any])


def tolerant(method: _F) -> _F:
    """A tracker call that, once the store has stopped answering, does nothing: the run goes
    on, writes its artifact, and the same command uploads it later (tracking.lifecycle)."""

    @functools.wraps(method)
    def call(self: Losable, *args: Any, **kwargs: Any) -> Any:
        if self.lost:
            return None
        try:
            return method(self, *args, **kwargs)
        except lost_errors() as exc:
            self.lose(exc)
            return None

    return call  # type: ignore[return-value]


def drop_queued_metrics(client: Any) -> None:
    """Metrics still queued on MLflow's background logger are dropped (each would retry against
    the lost store, one error line each, and the process would wait for them at exit)."""
    from queue import Empty

    logging.getLogger("mlflow.utils.async_logging").setLevel(logging.CRITICAL)
    store_ = getattr(getattr(client, "_tracking_client", None), "store", None)
    queued = getattr(getattr(store_, "_async_logging_queue", None), "_queue", None)
    while queued is not None:
        try:
            batch = queued.get_nowait()
        except Empty:
            return
        batch.exception = RuntimeError("the tracking store was lost")
        batch.complete()  # whoever waits for it is told
