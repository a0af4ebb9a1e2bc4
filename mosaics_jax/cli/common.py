"""What the command-line tools share: the `--set` flag, reading an experiment, and error exits."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mosaics_jax import checkpoints, config as config_lib, overrides, registry
from mosaics_jax.port import layout

# What reading a trained model or a config may raise for input the user gave: each CLI that reads
# one prints the message on one line and exits 2 (`fail`), never a traceback.
READ_ERRORS = (
    config_lib.ConfigError,
    layout.PortError,
    checkpoints.CheckpointError,
    FileNotFoundError,
)

SET_HELP = (
    "override config fields by dotted path, e.g. train.steps=100 model.num_layers=2; repeatable"
)


def add_set_flag(parser: argparse.ArgumentParser) -> None:
  """`--set KEY=VALUE ...`, which may be given several times; all assignments accumulate."""
  parser.add_argument(
      "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=SET_HELP
  )


class StoreOnce(argparse.Action):
  """Stores a flag's value and refuses the flag given twice (argparse would keep the last)."""

  def __call__(self, parser, namespace, values, option_string=None):
    if getattr(namespace, self.dest, None) is not None:
      parser.error(f"{option_string} is given more than once")
    setattr(namespace, self.dest, values)


def seed(text: str) -> int:
  """An argparse type: a random seed, an int in [0, config.SEED_LIMIT)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
  if not 0 <= value < config_lib.SEED_LIMIT:
    raise argparse.ArgumentTypeError(f"a seed is an integer in [0, 2**32), got {value}")
  return value


def refuse_repeated_keys(assignments: Sequence[str]) -> None:
  """ConfigError when `--set` gives a key twice (which value was meant is unknown)."""
  keys = [a.partition("=")[0] for a in assignments]
  repeated = sorted({k for k in keys if keys.count(k) > 1})
  if repeated:
    raise config_lib.ConfigError(f"--set gives {', '.join(repeated)} more than once")


def experiment(name: str, assignments: Sequence[str]) -> config_lib.Experiment:
  """The experiment `name` with the `--set` assignments applied; a key given twice is an error."""
  refuse_repeated_keys(assignments)
  return overrides.apply(registry.get(name), assignments)


def fail(prog: str, error: Exception | str, code: int = 2) -> int:
  """Prints `prog: error: ...` to stderr and returns the exit code."""
  print(f"{prog}: error: {error}", file=sys.stderr)
  return code
