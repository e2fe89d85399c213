"""Facts shared across tunelab. The ground floor: imports nothing of tunelab."""

from __future__ import annotations

# Files that unpickle on load (and so can run code): never part of an artifact, never loaded
# unless asked for.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# MLflow model URIs, which tracking resolves to a local directory before a model is loaded.
MODEL_URI_SCHEMES = ("runs:/", "models:/")

# tunelab's Optuna sweeper (hydra.sweeper._target_), its pruners, and the stores whose claims
# it can lock across workers (tunelab.sweeps.study)
OPTUNA_SWEEPER = "hydra_plugins.tunelab_optuna.OptunaSweeper"
PRUNERS = ("none", "median", "successive_halving", "hyperband")
STUDY_STORES = ("sqlite:///", "postgresql")
