"""Composing conf/train.yaml with overrides, exactly as `tunelab train` would, for preflight,
tests and tools that need the config without running Hydra's app."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig

from tunelab import paths

# The folder Hydra's `experiment` group is served from (hydra_plugins.tunelab_experiments reads it,
# in this process and in the launcher workers it starts, which inherit it): set only here.
EXPERIMENTS_ENV = "TUNELAB_EXPERIMENTS_DIR"


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose `conf/train.yaml` with overrides."""
    with composer(return_hydra_config) as compose_one:
        return compose_one(list(overrides))


def serve_experiments() -> None:
    """Serve `experiments/` as Hydra's `experiment` group (`experiment=NAME`), in this process
    and the launcher workers it starts; a folder TUNELAB_EXPERIMENTS_DIR names is kept."""
    os.environ.setdefault(EXPERIMENTS_ENV, str(paths.project_root() / "experiments"))


class composer:
    """Compose `conf/train.yaml` again and again inside one Hydra context (initialising Hydra
    costs more than a composition)."""

    def __init__(self, return_hydra_config: bool = False) -> None:
        self.return_hydra_config = return_hydra_config

    def __enter__(self) -> Callable[[list[str]], DictConfig]:
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        serve_experiments()
        GlobalHydra.instance().clear()
        self._context = initialize_config_dir(config_dir=str(paths.conf_dir()), version_base="1.3")
        self._context.__enter__()
        return self.compose

    def __exit__(self, *exc: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        self._context.__exit__(*exc)
        GlobalHydra.instance().clear()

    def compose(self, overrides: list[str]) -> DictConfig:
        from hydra import compose as hydra_compose

        return hydra_compose(
            "train", overrides=overrides, return_hydra_config=self.return_hydra_config
        )
