"""The MLflow Model Registry: a run's Logged Model registered as a new version of a name, with
an alias, so `models:/NAME@ALIAS` loads it (`tunelab register`, and a sweep's
`sweep.register_as`, which registers its best trial as NAME@champion)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.errors import ModelNotFound, first_line
from tunelab.tracking import store

CHAMPION = "champion"


@dataclass
class Registered:
    name: str
    version: int
    alias: str
    model_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def logged_model_of(client: Any, run_id: str) -> str:
    """The id of the Logged Model a run produced (its last, when it logged several)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ModelNotFound(f"no run {run_id!r} in this store") from None
    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        raise ModelNotFound(
            f"run {run_id} has no model (status {run.info.status}): only a finished run's "
            "model can be registered"
        )
    return str(max(outputs, key=lambda o: o.step).model_id)


def servable(uri: str | None, ref: str) -> str:
    """The `models:/` URI MLflow's scoring server takes for `ref`: a run id or runs:/ID/...
    (the run's Logged Model), models:/m-ID, models:/NAME@ALIAS or models:/NAME/VERSION, each
    checked against the store; ModelNotFound (one line) otherwise."""
    from mlflow.exceptions import MlflowException

    client = store.client_for(uri)
    if not ref.startswith("models:/"):
        if "/" in ref.removeprefix("runs:/").strip("/").split("/", 1)[0] or ref.startswith(
            (".", "/", "~")
        ):
            raise ModelNotFound(
                f"{ref!r}: give a run id, runs:/ID or a models:/ URI (a directory is not an "
                "MLflow model; `tunelab predict|generate DIR` load one)"
            )
        run_id = ref.removeprefix("runs:/").strip("/").split("/", 1)[0]
        return f"models:/{logged_model_of(client, run_id)}"
    name = ref.removeprefix("models:/")
    try:
        if name.startswith("m-") and "@" not in name and "/" not in name:
            client.get_logged_model(name)
        elif "@" in name:
            client.get_model_version_by_alias(*name.split("@", 1))
        elif "/" in name:
            client.get_model_version(*name.split("/", 1))
        else:
            raise ModelNotFound(f"{ref!r}: say which version, models:/{name}@champion or /1")
    except MlflowException as exc:
        raise ModelNotFound(f"{ref}: not in this store ({first_line(exc)})") from None
    return ref


def register(
    uri: str | None,
    run_id: str,
    name: str,
    alias: str = CHAMPION,
    tags: dict[str, str] | None = None,
) -> Registered:
    """Register `run_id`'s Logged Model as a new version of `name` and point `alias` at it."""
    from mlflow.exceptions import MlflowException

    client = store.client_for(uri)
    model_id = logged_model_of(client, run_id)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    version = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, tags=tags or {}, model_id=model_id
    )
    client.set_registered_model_alias(name, alias, version.version)
    return Registered(name, int(version.version), alias, model_id)
