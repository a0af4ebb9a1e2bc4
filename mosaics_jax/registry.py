"""Finds experiments and reproductions by name in the `experiments` package."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any

import experiments as experiments_pkg
from mosaics_jax.config import ConfigError, Experiment


def _declared(attribute: str, kind: str) -> dict[str, Any]:
  """What the modules of `experiments` declare in `attribute`, by name."""
  found: dict[str, Any] = {}
  for info in sorted(pkgutil.iter_modules(experiments_pkg.__path__), key=lambda i: i.name):
    module = importlib.import_module(f"{experiments_pkg.__name__}.{info.name}")
    for item in getattr(module, attribute, ()):
      if item.name in found:
        raise ConfigError(f"{kind} {item.name!r} is declared twice (in {info.name})")
      found[item.name] = item
  return found


def _named(known: dict[str, Any], name: str, kind: str, listing: str) -> Any:
  if name not in known:
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"run `{listing}`"
    raise ConfigError(f"unknown {kind} {name!r}; {hint}")
  return known[name]


def all_experiments() -> dict[str, Experiment]:
  """Every experiment declared by a module of `experiments` (`EXPERIMENTS`), by name."""
  return _declared("EXPERIMENTS", "experiment")


def get(name: str) -> Experiment:
  """The experiment called `name`; an unknown name is an error that suggests close names."""
  return _named(all_experiments(), name, "experiment", "mosaics-info --list")


def all_reproductions() -> dict[str, Any]:
  """Every reproduction (`mosaics_jax.repro.declaration.Reproduction`) declared by a module of
  `experiments` (`REPRODUCTIONS`), by name."""
  return _declared("REPRODUCTIONS", "reproduction")


def get_reproduction(name: str) -> Any:
  """The reproduction called `name`; an unknown name is an error that suggests close names."""
  return _named(all_reproductions(), name, "reproduction", "mosaics-repro --list")


def all_moons_experiments() -> dict[str, Any]:
  """Every three-moons experiment (`mosaics_jax.config.MoonsExperiment`, trained by
  `mosaics_jax.train.moons`) declared by a module of `experiments` (`EXPERIMENTS_MOONS`), by
  name."""
  return _declared("EXPERIMENTS_MOONS", "moons experiment")
