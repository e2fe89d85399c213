"""`hydra/sweeper=optuna`: hyperparameter search with Optuna's ask-and-tell API.

The released hydra-optuna-sweeper pins optuna<3 (2021), which cannot sit beside current optuna,
numpy and SQLAlchemy; this sweeper uses Optuna's supported ask-and-tell interface instead and
reads the same search-space syntax (Hydra's override grammar: `a,b,c` or `choice(...)`,
`range(lo,hi[,step])`, `interval(lo,hi)`, `tag(log, interval(lo,hi))`). Each trial is one
ordinary tunelab job, so it is a child MLflow run with its own run directory. The study lives
in the sweep directory (sqlite), so rerunning the same command continues it: finished trials
count, and a trial left running by a crash is asked again with the same parameters, whose job
then resumes from its checkpoints.
"""

# No `from __future__ import annotations`: Hydra loads plugin modules without registering them
# in sys.modules, and dataclasses then cannot resolve string annotations.
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional  # noqa: UP035 - OmegaConf reads these

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig

from tunelab import metrics

log = logging.getLogger("tunelab")


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.tunelab_optuna.OptunaSweeper"
    n_trials: int = 8
    n_jobs: int = 1  # trials launched together (with a parallel launcher)
    # maximize | minimize; null: sweep.direction, else from sweep.objective's name (losses are
    # minimized), else maximize for the addition task's exact match.
    direction: Optional[str] = None  # noqa: UP045
    sampler: str = "tpe"  # tpe | random
    seed: int = 0
    storage: Optional[str] = None  # noqa: UP045 - null: sqlite:///<sweep dir>/optuna.db
    study_name: str = "tunelab"
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
    raise ValueError(f"{override.input_line}: not a search space (use choice, range or interval)")


class OptunaSweeper(Sweeper):
    config: DictConfig
    launcher: Launcher

    def __init__(self, **conf: Any) -> None:
        self.conf = OptunaSweeperConf(**{k: v for k, v in conf.items() if k != "_target_"})

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
        # Only generated data is known to have completions before any job reads its files.
        objective = sweep.objective or (
            metrics.default_objective(cfg.model.task, True) if cfg.data.type == "addition" else None
        )
        if objective is None and not sweep.direction:
            raise ValueError(
                "hydra.sweeper.direction: set it (maximize or minimize), or sweep.objective, "
                "so the study knows which way is better for this data"
            )
        mode = metrics.mode(objective or "", sweep.direction)
        return "minimize" if mode == "min" else "maximize"

    def sweep(self, arguments: list[str]) -> Any:
        import optuna

        parser = OverridesParser.create()
        lines = [*arguments, *(f"{k}={v}" for k, v in self.conf.params.items())]
        parsed = parser.parse_overrides(lines)
        fixed = [str(o.input_line) for o in parsed if not o.is_sweep_override()]
        space = {o.get_key_element(): distribution(o) for o in parsed if o.is_sweep_override()}

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sampler = (
            optuna.samplers.RandomSampler(seed=self.conf.seed)
            if self.conf.sampler == "random"
            else optuna.samplers.TPESampler(seed=self.conf.seed)
        )
        study = optuna.create_study(
            study_name=self.conf.study_name,
            storage=self.conf.storage or f"sqlite:///{sweep_dir.resolve() / 'optuna.db'}",
            direction=self.direction(),
            sampler=sampler,
            load_if_exists=True,
        )
        for trial in study.get_trials(states=[optuna.trial.TrialState.RUNNING]):
            # Left running by a crash: ask again with the same parameters (its job resumes).
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params)
        finished = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
        done = len(study.get_trials(states=finished))
        job_idx = len(study.trials)
        while done < self.conf.n_trials:
            asked = [
                study.ask(space) for _ in range(min(self.conf.n_jobs, self.conf.n_trials - done))
            ]
            batch = [fixed + [f"{k}={t.params[k]}" for k in space] for t in asked]
            self.validate_batch_is_legal(batch)
            returns = self.launcher.launch(batch, initial_job_idx=job_idx)
            job_idx += len(batch)
            for asked_trial, ret in zip(asked, returns, strict=True):
                value = ret.return_value if ret.status == JobStatus.COMPLETED else None
                if isinstance(value, (int, float)) and not math.isnan(value):
                    study.tell(asked_trial, float(value))
                    done += 1
                else:
                    study.tell(asked_trial, state=optuna.trial.TrialState.FAIL)
                    done += 1  # a failed trial counts, or a broken config would loop forever
        try:
            best = study.best_trial
            log.info("best trial %d: %s = %s", best.number, best.params, best.value)
            return best.params
        except ValueError:  # no trial completed
            return None
