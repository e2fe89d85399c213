"""`hydra/sweeper=optuna`: hyperparameter search with Optuna's ask-and-tell API.

The released hydra-optuna-sweeper pins optuna<3 (2021), which cannot sit beside current optuna,
numpy and SQLAlchemy; this sweeper uses Optuna's supported ask-and-tell interface instead and
reads the same search-space syntax (Hydra's override grammar: `a,b,c` or `choice(...)`,
`range(lo,hi[,step])`, `interval(lo,hi)`, `tag(log, interval(lo,hi))`). Each trial is one
ordinary tunelab job, so it is a child MLflow run with its own run directory.

Each worker (a `-m` process, or one of its `n_jobs` slots with a parallel launcher) claims a
trial, launches its job alone, tells the study its outcome and claims the next: no worker waits
for another's trial. The study lives in the sweep directory (sqlite) or in
`hydra.sweeper.storage`, so the same command started again, here or on another machine sharing
that storage, is another worker of the same search (tunelab.sweeps.study: exactly `n_trials`,
one parent run, dead workers' trials asked again). A trial's job reports its metric at every
evaluation and stops when `pruner` prunes it (tunelab.sweeps.pruning).
"""

# No `from __future__ import annotations`: Hydra loads plugin modules without registering them
# in sys.modules, and dataclasses then cannot resolve string annotations.
import contextlib
import json
import logging
import math
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional  # noqa: UP035 - OmegaConf reads these

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig

from tunelab import distributed, metrics
from tunelab.config import with_preset_space
from tunelab.errors import ConfigError, TunelabError, first_line
from tunelab.sweeps import parent
from tunelab.sweeps import study as studies
from tunelab.tracking import store

log = logging.getLogger("tunelab")


@dataclass
class PruningConf:
    # What each trial reports at every evaluation (negated when the study's direction is the
    # other way); null: eval_loss, smooth from the first evaluation, where an accuracy or an
    # exact match is 0 for every trial early on (ties never prune).
    metric: Optional[str] = None  # noqa: UP045
    n_startup_trials: int = 2  # median: trials that run to the end before any is pruned
    n_warmup_steps: int = 0  # median: steps before a trial can be pruned
    min_resource: Optional[int] = None  # noqa: UP045 - halving/hyperband; null: eval_every
    max_resource: Optional[int] = None  # noqa: UP045 - hyperband; null: training.max_steps
    reduction_factor: int = 3  # halving/hyperband: 1/reduction_factor of trials go on per rung


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.tunelab_optuna.OptunaSweeper"
    n_trials: int = 8  # in all, across every worker of the study
    n_jobs: int = 1  # trials in flight (with a parallel launcher: joblib, submitit)
    # maximize | minimize; null: sweep.direction, else from sweep.objective's name (losses are
    # minimized), else maximize for the addition task's exact match.
    direction: Optional[str] = None  # noqa: UP045
    sampler: str = "tpe"  # tpe | random
    seed: int = 0
    # null: sqlite:///<sweep dir>/optuna.db (workers on this machine); postgresql://... for
    # workers on several machines (a database of the study's own, not MLflow's)
    storage: Optional[str] = None  # noqa: UP045
    study_name: str = "tunelab"
    pruner: str = "none"  # none | median | successive_halving | hyperband
    pruning: PruningConf = field(default_factory=PruningConf)
    max_retry: int = 2  # a trial whose worker died is asked again at most this often
    params: Dict[str, str] = field(default_factory=dict)  # noqa: UP006


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="tunelab"
)


def distribution(override: Override) -> Any:
    """An Optuna distribution for one sweep override."""
    import optuna.distributions as d

    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if isinstance(value, ChoiceSweep):
        choices: list[Any] = list(override.sweep_iterator())
        return d.CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        lo, hi, step = value.start, value.stop, value.step
        assert lo is not None and hi is not None and step is not None  # Hydra's parser sets them
        if isinstance(lo, int) and isinstance(hi, int) and isinstance(step, int):
            return d.IntDistribution(lo, hi - step, step=step, log=log_scale)
        return d.FloatDistribution(lo, hi - step, step=step)
    if isinstance(value, IntervalSweep):
        start, end = value.start, value.end
        assert start is not None and end is not None
        if isinstance(start, int) and isinstance(end, int):
            return d.IntDistribution(start, end, log=log_scale)
        return d.FloatDistribution(start, end, log=log_scale)
    raise ConfigError(
        [f"{override.input_line}: not a search space (use choice, range or interval)"]
    )


class OptunaSweeper(Sweeper):
    config: DictConfig
    launcher: Launcher

    def __init__(self, **conf: Any) -> None:
        given = {k: v for k, v in conf.items() if k != "_target_"}
        given["pruning"] = PruningConf(**dict(given.get("pruning") or {}))
        self.conf = OptunaSweeperConf(**given)
        self.stopping = threading.Event()

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.config_loader = hydra_context.config_loader  # validate_batch_is_legal reads it
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def direction(self) -> Literal["minimize", "maximize"]:
        """The study's direction: set here, or what the jobs' objective wants."""
        if self.conf.direction:
            return "minimize" if self.conf.direction == "minimize" else "maximize"
        sweep, cfg = self.config.sweep, self.config
        # A language model's default objective hangs on its data having completions, known
        # before any job reads its files only for generated data; other tasks' never does.
        known = cfg.data.type == "addition" or cfg.model.task != "causal_lm"
        objective = sweep.objective or (
            metrics.default_objective(cfg.model.task, True) if known else None
        )
        if objective is None and not sweep.direction:
            raise ConfigError(
                [
                    "hydra.sweeper.direction: set it (maximize or minimize), or sweep.objective, "
                    "so the study knows which way is better for this data"
                ]
            )
        mode = metrics.mode(objective or "", sweep.direction)
        return "minimize" if mode == "min" else "maximize"

    def sweep(self, arguments: list[str]) -> Any:
        """The search; an error tunelab knows (bad settings, a store it cannot use) ends the
        command with its lines and exit code, not Hydra's traceback."""
        self.parent_id: Optional[str] = None  # noqa: UP045
        try:
            return self._search(arguments)
        except TunelabError as exc:
            self._abandon(exc)
            if distributed.is_main() or not isinstance(exc, ConfigError):
                for line in exc.lines():
                    print(line, file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
        except Exception as exc:
            self._abandon(exc)  # a bug: its traceback follows, the parent is not left RUNNING
            raise

    def _abandon(self, exc: BaseException) -> None:
        """The search stopped on an error: its parent run, if it has one, ends FAILED with it
        (Hydra calls no multirun-end callback after a sweeper's error)."""
        if self.parent_id:
            try:
                parent.abandon(self.config, self.parent_id, first_line(exc))
            except Exception as lost:  # noqa: BLE001 (the store may be what failed)
                log.warning("the sweep's parent run was not ended: %s", first_line(lost))

    def _search(self, arguments: list[str]) -> Any:
        import optuna

        searched = with_preset_space(arguments, self.conf.params)
        parsed = OverridesParser.create().parse_overrides(searched)
        fixed = [str(o.input_line) for o in parsed if not o.is_sweep_override()]
        space = {o.get_key_element(): distribution(o) for o in parsed if o.is_sweep_override()}

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        url = studies.storage_url(self.conf.storage, sweep_dir)
        studies.check_storage(url)
        studies.check_own_database(url, store.resolve_uri(self.config.tracking.uri))
        training = self.config.training
        pruner = studies.make_pruner(
            self.conf.pruner, asdict(self.conf.pruning), training.eval_every, training.max_steps
        )
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with studies.claims_lock(url, self.conf.study_name):  # one worker creates it
            self.study = optuna.create_study(
                study_name=self.conf.study_name,
                storage=studies.storage(url),
                direction=self.direction(),
                pruner=pruner,
                load_if_exists=True,
            )
            # Each worker samples with a seed of its own (seed, seed+1, ...): workers seeded
            # alike would ask the same parameters.
            if distributed.is_main():  # under torchrun rank 0 alone claims, with its sampler
                joined = int(self.study.user_attrs.get(studies.WORKERS, 0))
                self.study.set_user_attr(studies.WORKERS, joined + 1)
                self.study.sampler = self._sampler(self.conf.seed + joined)
            self.parent_id = self._parent(sweep_dir)
        self.url, self.space, self.fixed = url, space, fixed
        self.painter = Painter(
            lambda: parent.draw_picture(
                self.config, self.parent_id or "", list(self.space),
                self.conf.pruning.metric or "eval_loss", self.study,
            ) if self.parent_id else None
        )  # fmt: skip
        slots = self._slots()
        try:
            if slots == 1:
                self._work()
            else:
                self._work_in_threads(slots)
        except BaseException:
            self.painter.closing = True  # interrupted: no last drawing (the store may be gone)
            raise
        self.painter.close()
        try:
            best = self.study.best_trial
            log.info("best trial %d: %s = %s", best.number, best.params, best.value)
            return best.params
        except ValueError:  # no trial completed
            return None

    def _sampler(self, seed: int) -> Any:
        import optuna

        if self.conf.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def _parent(self, sweep_dir: Path) -> Optional[str]:  # noqa: UP045
        """The sweep's parent run: the study's (another worker made it), else new (held in the
        study for the next worker). Called with the study locked."""
        if not distributed.is_main():
            return None
        overrides = parent.sweep_overrides(self.config)
        known = self.study.user_attrs.get(studies.PARENT)
        parent_id = parent.start_parent(self.config, sweep_dir, overrides, previous=known)
        if parent_id and parent_id != known:
            self.study.set_user_attr(studies.PARENT, parent_id)
        return parent_id

    def _slots(self) -> int:
        """Trials this process keeps in flight: `n_jobs` with a launcher that runs jobs in
        other processes; one with Hydra's basic launcher (it runs each job in this process)."""
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        if self.conf.n_jobs > 1 and isinstance(self.launcher, BasicLauncher):
            log.warning(
                "hydra.sweeper.n_jobs=%d: the basic launcher runs one trial at a time; use "
                "hydra/launcher=joblib (or submitit_local), or start the same command again "
                "to add a worker",
                self.conf.n_jobs,
            )
            return 1
        return max(1, self.conf.n_jobs)

    def _work_in_threads(self, slots: int) -> None:
        threads = [
            threading.Thread(target=self._work, name=f"trials-{i}", daemon=True)
            for i in range(slots)
        ]
        for thread in threads:
            thread.start()
            time.sleep(0.2)  # the claims are serial anyway; spread the launches
        try:
            while any(t.is_alive() for t in threads):
                for thread in threads:
                    thread.join(timeout=0.2)
        except KeyboardInterrupt:
            # The jobs got the same signal (one process group) and checkpoint; their trials
            # stay RUNNING under this dead worker and are asked again by the same command.
            self.stopping.set()
            raise

    def _work(self) -> None:
        """Claim a trial, run its job, tell its outcome; again until the study is done."""
        while not self.stopping.is_set():
            claim = self._claim()
            if claim is None:
                return
            if claim == studies.WAIT:
                time.sleep(studies.HEARTBEAT_S)
                continue
            assert isinstance(claim, studies.Claim)
            if claim.twin is not None:  # its parameters train now in another trial
                if distributed.is_main():
                    with studies.heartbeat(self.study, claim):
                        studies.await_twin(
                            self.study, self.url, claim, self.conf.max_retry, self.stopping
                        )
                continue
            overrides = self.fixed + [f"{k}={claim.params[k]}" for k in self.space]
            self.validate_batch_is_legal([overrides])
            with (
                studies.heartbeat(self.study, claim)
                if distributed.is_main()
                else contextlib.nullcontext()
            ):
                (ret,) = self.launcher.launch([overrides], initial_job_idx=claim.number)
            if self.stopping.is_set():
                return
            if distributed.is_main():
                self._tell(claim, ret)

    def _claim(self) -> Any:
        """The next trial (rank 0 claims it; every rank runs the same one), WAIT or None."""

        def make() -> str:
            got = studies.claim(
                self.study, self.url, self.space, self.conf.n_trials, self.conf.max_retry
            )
            return json.dumps(asdict(got) if isinstance(got, studies.Claim) else got)

        got = json.loads(distributed.decided_by_rank_zero("trial", make))
        return studies.Claim(**got) if isinstance(got, dict) else got

    def _tell(self, claim: "studies.Claim", ret: JobReturn) -> None:
        """The study learns the trial's outcome; its child run is tagged with it."""
        from optuna.trial import TrialState

        value = ret._return_value if ret.status == JobStatus.COMPLETED else None
        if isinstance(value, dict) and "pruned_at" in value:
            state = TrialState.PRUNED
            self.study.tell(claim.number, state=state)
        elif isinstance(value, (int, float)) and not math.isnan(value):
            state = TrialState.COMPLETE
            self.study.tell(claim.number, float(value))
        else:
            state = TrialState.FAIL  # it counts: a broken config would otherwise loop forever
            self.study.tell(claim.number, state=state)
        if self.parent_id:
            try:
                parent.mark_trial(self.config, self.parent_id, claim.number, state.name)
            except Exception as exc:  # noqa: BLE001 (the study holds the truth; the tag is a view)
                log.warning("trial %d: its run not tagged %s: %s", claim.number, state.name, exc)
            self.painter.paint()  # in the background: this worker claims its next trial now


class Painter:
    """Redraws the search's picture in a background thread after each trial, so a worker
    claims its next trial at once; a request while it draws is served by one more drawing."""

    def __init__(self, draw: Any) -> None:
        self.draw = draw
        self.wanted = threading.Event()
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="sweep-picture", daemon=True)
        self.thread.start()

    def paint(self) -> None:
        self.wanted.set()

    def close(self) -> None:
        """Wait for the drawing in progress, and the last one asked for."""
        self.closing = True
        self.wanted.set()
        self.thread.join(timeout=300)

    def _loop(self) -> None:
        while True:
            self.wanted.wait()
            if self.closing and not self.wanted.is_set():
                return
            self.wanted.clear()
            self.draw()
            if self.closing and not self.wanted.is_set():
                return
