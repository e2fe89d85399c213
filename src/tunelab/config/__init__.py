"""The run's config: composed (`compose`), named (`naming`: run, sweep and job directories),
its values validated (`schema`, `validation`), and the jobs of a command line composed with
Hydra's errors as problem lines (`jobs`). Config looks at values only: what a config points at
on disk is tunelab.preflight's to check, and printing or exiting is the CLI's. Nothing here
imports torch, transformers or mlflow, so config errors answer in well under a second.

Environment variables tunelab hands to its own processes (launcher workers compose and name
jobs in processes of their own), each set and read by one module only:
- `TUNELAB_EXPERIMENTS_DIR`: the folder served as the `experiment` group: set by
  `serve_experiments` (`compose`) unless a user did, read by the Hydra plugin that serves it
  (hydra_plugins.tunelab_experiments, which Hydra loads in every process that composes).
- `TUNELAB_SWEEP`: the sweep directory's name and the keys the sweep varies (`naming`, set by
  `set_sweep` when a sweep starts).
- `TUNELAB_VALIDATED`: digests of the configs preflight found valid, so a job does not check its
  config again (tunelab.preflight).
"""

from tunelab.config.compose import compose, composer, serve_experiments
from tunelab.config.jobs import compose_job, job_overrides, trains, with_preset_space
from tunelab.config.naming import (
    digest,
    display_name,
    job_display_name,
    job_name,
    key_of,
    own_fresh_suffix,
    register_resolvers,
    run_dir_name,
    run_name,
    set_fresh_suffix,
    set_sweep,
    sweep_dir_name,
    swept_keys,
)
from tunelab.config.validation import check_values, problems, resolved
from tunelab.errors import ConfigError

register_resolvers()

__all__ = [
    "ConfigError",
    "check_values",
    "compose",
    "compose_job",
    "composer",
    "digest",
    "display_name",
    "job_display_name",
    "job_name",
    "job_overrides",
    "key_of",
    "own_fresh_suffix",
    "problems",
    "register_resolvers",
    "resolved",
    "run_dir_name",
    "run_name",
    "serve_experiments",
    "set_fresh_suffix",
    "set_sweep",
    "sweep_dir_name",
    "swept_keys",
    "trains",
    "with_preset_space",
]
