"""Hydra plugins that make `experiments/NAME.yaml` selectable as `experiment=NAME`.

Hydra maps a config group to a folder of the same name under a search-path root; tunelab keeps its
presets in a top-level `experiments/` folder, so a small config source serves that folder as the
`experiment` group. They act only when tunelab set TUNELAB_EXPERIMENTS_DIR
(tunelab.config.serve_experiments), so other Hydra apps in the same environment are untouched.
The folder travels in the environment because Hydra makes this plugin itself, in every process
that composes a job's config (launcher workers too); the plugin imports nothing of tunelab, as
Hydra loads it in every Hydra app.
"""

from __future__ import annotations

import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

GROUP = "experiment"
ENV = "TUNELAB_EXPERIMENTS_DIR"  # set by tunelab.config.serve_experiments, read here only


class ExperimentsConfigSource(ConfigSource):
    """Serves the files of one folder as the `experiment` config group."""

    @staticmethod
    def scheme() -> str:
        return "tunelab-experiments"

    def _local(self, config_path: str) -> str | None:
        parts = config_path.strip("/").split("/", 1)
        if parts[0] != GROUP:
            return None
        return os.path.join(self.path, parts[1] if len(parts) > 1 else "")

    def load_config(self, config_path: str) -> ConfigResult:
        local = self._local(self._normalize_file_name(config_path))
        if local is None or not os.path.isfile(local):
            raise ConfigLoadError(f"Config not found : {config_path}")
        with open(local, encoding="utf-8") as f:
            header = ConfigSource._get_header_dict(f.read(512))
            f.seek(0)
            cfg = OmegaConf.load(f)
        return ConfigResult(
            config=cfg, path=f"{self.scheme()}://{self.path}", provider=self.provider, header=header
        )

    def available(self) -> bool:
        return os.path.isdir(self.path)

    def is_group(self, config_path: str) -> bool:
        if config_path.strip("/") == "":
            return self.available()
        local = self._local(config_path)
        return local is not None and os.path.isdir(local)

    def is_config(self, config_path: str) -> bool:
        local = self._local(self._normalize_file_name(config_path))
        return local is not None and os.path.isfile(local)

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        if config_path.strip("/") == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        local = self._local(config_path)
        if local is None or not os.path.isdir(local):
            return []
        files: list[str] = []
        for name in os.listdir(local):
            self._list_add_result(
                files=files,
                file_path=f"{config_path.strip('/')}/{name}",
                file_name=name,
                results_filter=results_filter,
            )
        return sorted(set(files))


class ExperimentsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        folder = os.environ.get(ENV)
        if folder:
            search_path.append("tunelab", f"{ExperimentsConfigSource.scheme()}://{folder}")
