"""Finds experiments by name in the `experiments` package."""

from __future__ import annotations

import difflib
import importlib
import pkgutil

import experiments as experiments_pkg
from mosaics_jax.config import ConfigError, Experiment


def all_experiments() -> dict[str, Experiment]:
  """Every experiment declared by a module of `experiments`, by name."""
  found: dict[str, Experiment] = {}
  for info in sorted(pkgutil.iter_modules(experiments_pkg.__path__), key=lambda i: i.name):
    module = importlib.import_module(f"{experiments_pkg.__name__}.{info.name}")
    for experiment in getattr(module, "EXPERIMENTS", ()):
      if experiment.name in found:
        raise ConfigError(f"experiment {experiment.name!r} is declared twice (in {info.name})")
      found[experiment.name] = experiment
  return found


def get(name: str) -> Experiment:
  """The experiment called `name`; an unknown name is an error that suggests close names."""
  known = all_experiments()
  if name not in known:
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "run `mosaics-info --list`"
    raise ConfigError(f"unknown experiment {name!r}; {hint}")
  return known[name]
