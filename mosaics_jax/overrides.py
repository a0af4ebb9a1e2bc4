"""Overriding config fields by dotted path, and typing command-line values: what `--set` does.

    experiment = overrides.apply(registry.get("mm2-tiny"), ["train.steps=100", "model.remat=true"])

Every CLI that takes `--set` (`mosaics_jax.cli.common.add_set_flag`) goes through `apply`. Values
are read as JSON where they parse (numbers, true/false, null, lists) and otherwise as text, then
typed by the field's annotation: a list becomes a tuple, an int becomes a float for a float field,
and a str field keeps the text as typed (a path that looks like a number). Like the configs, this
module imports no Flax or Orbax.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from typing import Any

from mosaics_jax import config as config_lib


def override(config: Any, path: str, value: Any) -> Any:
  """`config` with the field at dotted `path` (e.g. "model.num_layers") replaced by `value`.

  An unknown key is a `ConfigError` that suggests close names.
  """
  head, _, rest = path.partition(".")
  fields = {f.name for f in dataclasses.fields(config) if f.init}
  if head not in fields:
    raise config_lib.ConfigError(config_lib.unknown_key(path, fields, type(config).__name__))
  if rest:
    child = getattr(config, head)
    if not dataclasses.is_dataclass(child):
      raise config_lib.ConfigError(f"{type(config).__name__}.{head} has no field {rest!r}")
    value = override(child, rest, value)
  return dataclasses.replace(config, **{head: value})


def resize(
    experiment: config_lib.Experiment, batch: int | None = None, context: int | None = None
) -> config_lib.Experiment:
  """`experiment` with the global batch `batch` and sequence length `context` (None: its own)."""
  if batch is not None:
    experiment = override(experiment, "train.batch_size", batch)
  if context is not None:
    experiment = override(experiment, "data.seq_len", context)
  return experiment


def apply(experiment: config_lib.Experiment, assignments: Iterable[str]) -> config_lib.Experiment:
  """`experiment` with every "KEY=VALUE" of `assignments` applied in order (`assign`), then its
  sequence lengths checked (`Experiment.check_lengths`)."""
  experiment = assign(experiment, assignments)
  experiment.check_lengths()
  return experiment


def assign(config: Any, assignments: Iterable[str]) -> Any:
  """The config dataclass `config` with every "KEY=VALUE" of `assignments` applied in order."""
  for assignment in assignments:
    key, sep, text = assignment.partition("=")
    if not sep:
      raise config_lib.ConfigError(f"--set takes KEY=VALUE, got {assignment!r}")
    try:
      config = override(config, key, parse_value(text, field_hint(config, key)))
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"{assignment}: {e}") from None
  return config


def parse_value(text: str, hint: Any) -> Any:
  """A command-line value typed by the field's annotation (JSON where it parses)."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    value = text
  options = set(_flatten_hint(hint))
  if tuple in options and isinstance(value, list):
    return config_lib.to_tuples(value)
  if float in options and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if str in options and not isinstance(value, str) and not (value is None and None in options):
    return text  # e.g. a path or a name that happens to parse as a number.
  return value


def _flatten_hint(hint: Any) -> list[Any]:
  """The plain types a field admits: str for Literal["a", ...], tuple for tuple[int, int]."""
  origin = typing.get_origin(hint)
  if origin is typing.Literal:
    return [type(a) for a in typing.get_args(hint)]
  if origin in (typing.Union, types.UnionType):
    return [t for a in typing.get_args(hint) for t in _flatten_hint(a)]
  if hint is type(None):
    return [None]
  return [origin or hint]


def field_hint(config: Any, path: str) -> Any:
  """The annotation of the field at dotted `path` (Any when the path is unknown)."""
  hint: Any = type(config)
  for part in path.split("."):
    if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
      return Any
    hints = typing.get_type_hints(hint)
    if part not in hints:
      return Any
    # A model field holds a family's config: look the rest up on the actual one.
    config = getattr(config, part, None)
    hint = type(config) if dataclasses.is_dataclass(config) else hints[part]
  return hint
