"""One Optuna study shared by every worker of a sweep.

A worker is one `tunelab train -m` process (or one of its `n_jobs` slots): it claims a trial,
launches its job, tells the outcome, and claims the next, so no worker waits for another's
trial. Workers on one machine share the sweep directory's sqlite study; workers on several
share `hydra.sweeper.storage` (PostgreSQL). Claims are made under a lock held across workers
(a file lock beside a sqlite study, an advisory lock on PostgreSQL), so exactly `n_trials`
trials are asked in all, however many workers race. A claimed trial carries its worker's host
and pid and a heartbeat: a trial whose worker died (kill -9, a lost machine) is failed and asked
again with the same parameters (its job resumes from its checkpoints), at most `max_retry`
times.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab import locks, metrics
from tunelab.constants import PRUNERS, STUDY_STORES
from tunelab.errors import ConfigError, TunelabError, first_line
from tunelab.tracking.liveness import process_gone, process_tags

log = logging.getLogger("tunelab")

HEARTBEAT_S = 5  # how often a worker says its trial is alive
GRACE_S = 30  # a trial silent for this long is taken for dead (another machine's worker)
RETRY_OF = "tunelab.retry_of"  # user attr: the number of the trial this one asks again
WORKER = "tunelab.worker"  # user attr: the worker's host, pid and start (process_tags)
PARENT = "tunelab.parent_run_id"  # study user attr: the sweep's MLflow parent run
WORKERS = "tunelab.workers"  # study user attr: how many workers joined (each seeds its own)
SAME_AS = "tunelab.same_as"  # user attr: the earlier trial of the same parameters it took after


@dataclass
class Claim:
    """A trial a worker runs: its number, id and parameters."""

    number: int
    trial_id: int
    params: dict[str, Any]
    # An earlier trial of the same parameters, running: its outcome is this one's (a second job
    # would share its run directory), so the worker waits for it instead of training.
    twin: int | None = None


WAIT = "wait"  # no trial to claim now, but others' trials run (one may yet fail and return)


def storage_url(configured: str | None, sweep_dir: Path) -> str:
    """`hydra.sweeper.storage`, or a sqlite study in the sweep directory."""
    return configured or f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"


def check_storage(url: str) -> None:
    """Only stores whose claims can be locked across workers."""
    if not url.startswith(STUDY_STORES):
        raise ConfigError(
            [
                f"hydra.sweeper.storage: {url.split('://')[0]}:// cannot hold a study shared by "
                "workers here; use sqlite:///ABS/PATH.db (one machine) or "
                "postgresql://USER@HOST/DB (several machines)"
            ]
        )


def check_own_database(url: str, tracking_uri: str) -> None:
    """A study's database must be neither the tracking store nor another MLflow store: both
    keep their schema's version in a table named `alembic_version`, so one's migrations fail
    on (or break) the other's tables."""
    import sqlalchemy as sa

    why = f"hydra.sweeper.storage: {_safe(url)} "
    advice = (
        "; a study needs a database of its own (both keep an alembic_version table), e.g. "
        "the sweep directory's default (leave storage unset), or `createdb optuna` and "
        "postgresql://USER@HOST/optuna"
    )
    if _place(url) == _place(tracking_uri):
        raise ConfigError([why + "is tracking.uri's database" + advice])
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        tables = set(sa.inspect(engine).get_table_names())
    except sa.exc.SQLAlchemyError as exc:
        reason = first_line(exc)
        raise TunelabError(f"hydra.sweeper.storage: cannot open {_safe(url)}: {reason}") from None
    finally:
        engine.dispose()
    if {"experiments", "runs"} <= tables and "studies" not in tables:
        raise ConfigError([why + "holds an MLflow tracking store" + advice])


def _place(uri: str) -> tuple[str, ...]:
    """Where a database lives: a sqlite file's absolute path, a server's host, port and name."""
    import sqlalchemy as sa

    if uri.startswith("sqlite:///"):
        return ("sqlite", str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve()))
    try:
        parsed = sa.engine.make_url(uri)
    except sa.exc.ArgumentError:
        return ("other", uri)  # http://: a tracking server, never a study's database
    return (parsed.get_backend_name(), str(parsed.host), str(parsed.port), str(parsed.database))


def _safe(url: str) -> str:
    """The URL without its password."""
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)


def storage(url: str) -> Any:
    import optuna

    check_storage(url)
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            engine_kwargs={"pool_pre_ping": True} if url.startswith("postgresql") else None,
        )


@contextlib.contextmanager
def claims_lock(url: str, study_name: str) -> Iterator[None]:
    """Held while a worker counts and claims trials: one worker at a time, on any machine."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).with_suffix(".claims.lock")
        with locks.waiting(path, f"study {study_name}"):
            yield
        return
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    digest = hashlib.blake2b(f"tunelab:{study_name}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "big", signed=True)
    with engine.connect() as conn:  # the lock dies with the session: a killed worker frees it
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    engine.dispose()


def _retry(study: Any, trial: Any, max_retry: int) -> None:
    """Ask a failed trial again with its parameters, unless it was asked `max_retry` times."""
    tries, number = 0, trial.number
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    while number in by_number and RETRY_OF in by_number[number].user_attrs:
        tries, number = tries + 1, int(by_number[number].user_attrs[RETRY_OF])
    if tries < max_retry:
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})


def reap(study: Any, max_retry: int) -> list[int]:
    """Fail the RUNNING trials whose worker is gone, each asked again: at once when the worker
    ran on this machine and its process is gone, else once its heartbeat is `GRACE_S` old.
    Returns their numbers."""
    import optuna
    from optuna.trial import TrialState

    gone = [
        t
        for t in study.get_trials(deepcopy=False, states=[TrialState.RUNNING])
        if process_gone(t.user_attrs.get(WORKER, {}))
    ]
    stale = set(study._storage._get_stale_trial_ids(study._study_id))
    gone += [
        t
        for t in study.get_trials(deepcopy=False, states=[TrialState.RUNNING])
        if t._trial_id in stale and t not in gone
    ]
    reaped = []
    for trial in gone:
        try:
            if not study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker finished or failed it first
        _retry(study, trial, max_retry)
        reaped.append(trial.number)
    return reaped


def counted(study: Any) -> list[Any]:
    """The trials that count toward `n_trials`: all but failed ones asked again (their retry
    counts instead)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    return [
        t
        for t in trials
        if not (t.state == TrialState.FAIL and (t.number in retried or SAME_AS in t.user_attrs))
    ]


def claim(
    study: Any, url: str, space: dict[str, Any], n_trials: int, max_retry: int
) -> Claim | str | None:
    """The next trial for this worker: a trial to ask again first, then a new one while fewer
    than `n_trials` count; WAIT while others' trials run; None when the study is done."""
    from optuna.trial import TrialState

    with claims_lock(url, study.study_name):
        reap(study, max_retry)
        while True:  # each pass returns, or settles one trial: at most n_trials passes
            trials = counted(study)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting and len(trials) >= n_trials:
                running = any(t.state == TrialState.RUNNING for t in trials)
                return WAIT if running else None
            with warnings.catch_warnings():  # "supposed to be used with Study.optimize": we
                warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)  # beat
                trial = study.ask(space)
            twin = (
                None if RETRY_OF in trial.user_attrs else _twin(study, trial.number, trial.params)
            )
            if twin is not None and twin.state != TrialState.RUNNING:
                take_outcome(study, trial.number, trial._trial_id, twin)
                continue
            trial.set_user_attr(WORKER, process_tags())
            study._storage.record_heartbeat(trial._trial_id)
            twin_number = None if twin is None else twin.number
            return Claim(trial.number, trial._trial_id, dict(trial.params), twin_number)


def _twin(study: Any, number: int, params: dict[str, Any]) -> Any:
    """The earliest other trial of trial `number`'s parameters that trained or trains (a failed
    one does not count: it is asked again), or None. The sampler may ask a point twice (a
    small categorical space, several workers)."""
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    trials = study.get_trials(deepcopy=False, states=live)
    return next((t for t in trials if t.number != number and t.params == params), None)


def take_outcome(study: Any, number: int, trial_id: int, twin: Any) -> str:
    """Trial `number` ends as its finished twin did, without training: its value when complete,
    pruned when pruned, failed (not counted: the twin is asked again) when failed."""
    from optuna.trial import TrialState

    study._storage.set_trial_user_attr(trial_id, SAME_AS, twin.number)
    if twin.state == TrialState.COMPLETE:
        study.tell(number, twin.value)
    else:
        study.tell(number, state=twin.state if twin.state == TrialState.PRUNED else TrialState.FAIL)
    log.info("trial %d: the parameters of trial %d, whose outcome it takes (%s)", number,
             twin.number, twin.state.name)  # fmt: skip
    return twin.state.name


def await_twin(study: Any, url: str, claim: Claim, max_retry: int, stop: threading.Event) -> None:
    """Wait for the running twin of `claim` to end (reaping it if its worker died), then take
    its outcome; return early, leaving the trial to be asked again, when `stop` is set."""
    from optuna.trial import TrialState

    storage = study._storage
    twin_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, claim.twin)
    while not stop.wait(HEARTBEAT_S):
        with claims_lock(url, study.study_name):
            reap(study, max_retry)
        twin = storage.get_trial(twin_id)
        if twin.state != TrialState.RUNNING:
            take_outcome(study, claim.number, claim.trial_id, twin)
            return


@contextlib.contextmanager
def heartbeat(study: Any, claim: Claim) -> Iterator[None]:
    """The trial's heartbeat while its job runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a store that blinks: the next beat retries
                study._storage.record_heartbeat(claim.trial_id)

    thread = threading.Thread(target=beat, name=f"heartbeat-{claim.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def make_pruner(kind: str, settings: dict[str, Any], eval_every: int, max_steps: int) -> Any:
    """Optuna's pruner `kind`, read in training steps: by default a trial is first judged at its
    first evaluation, and hyperband's budget is the run's `max_steps`. The sweeper and every
    trial's job build the same one from the same config."""
    import optuna.pruners as p

    first = int(settings.get("min_resource") or max(eval_every, 1))
    if kind == "none":
        return p.NopPruner()
    if kind == "median":
        return p.MedianPruner(
            n_startup_trials=int(settings.get("n_startup_trials", 2)),
            n_warmup_steps=int(settings.get("n_warmup_steps", 0)),
        )
    if kind == "successive_halving":
        return p.SuccessiveHalvingPruner(
            min_resource=first, reduction_factor=int(settings.get("reduction_factor", 3))
        )
    if kind == "hyperband":
        top = settings.get("max_resource") or (max_steps if max_steps > 0 else "auto")
        return p.HyperbandPruner(
            min_resource=first,
            max_resource=top if top == "auto" else int(top),
            reduction_factor=int(settings.get("reduction_factor", 3)),
        )
    raise ConfigError(
        [f"hydra.sweeper.pruner: {kind!r} is not a pruner; use one of {', '.join(PRUNERS)}"]
    )


@dataclass
class TrialRef:
    """Where a trial's job finds its trial: the study's store and name, the trial's number, and
    the metric it reports at each evaluation, and the pruner that judges it."""

    url: str
    study_name: str
    number: int
    pruner: str
    settings: dict[str, Any]
    metric: str

    def open(self, eval_every: int, max_steps: int) -> tuple[Any, float]:
        """The trial itself (an optuna.Trial, on the study with its pruner), and the sign that
        orients `metric` to the study's direction."""
        import optuna

        pruner = make_pruner(self.pruner, self.settings, eval_every, max_steps)
        study = optuna.load_study(
            study_name=self.study_name, storage=storage(self.url), pruner=pruner
        )
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(
            study._study_id, self.number
        )
        direction = "maximize" if study.direction.name == "MAXIMIZE" else "minimize"
        return optuna.trial.Trial(study, trial_id), orientation(self.metric, direction)


def orientation(metric: str, study_direction: str) -> float:
    """+1 when a larger `metric` is better in the study's direction, else -1 (a loss reported
    to a maximizing study is negated)."""
    larger_better = metrics.mode(metric) == "max"
    return 1.0 if larger_better == (study_direction == "maximize") else -1.0
