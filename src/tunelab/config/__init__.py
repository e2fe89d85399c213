"""The run's config: names, composition, the schema, validation and preflight. Nothing here
imports torch, transformers or mlflow, so config errors answer in well under a second."""

from tunelab.config.checks import ConfigError, check, resolved, validate
from tunelab.config.compose import compose, composer
from tunelab.config.naming import (
    SWEEP_ENV,
    fingerprint,
    job_name,
    key_of,
    register_resolvers,
    run_dir_name,
    run_name,
    sweep_dir_name,
)
from tunelab.config.preflight import exit_on_problems, fail, preflight, validated

register_resolvers()

__all__ = [
    "SWEEP_ENV",
    "ConfigError",
    "check",
    "compose",
    "composer",
    "exit_on_problems",
    "fail",
    "fingerprint",
    "job_name",
    "key_of",
    "preflight",
    "register_resolvers",
    "resolved",
    "run_dir_name",
    "run_name",
    "sweep_dir_name",
    "validate",
    "validated",
]
