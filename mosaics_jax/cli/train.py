"""`mosaics-train`: train an experiment; the same command again on the same workdir resumes.

    mosaics-train --workdir runs/quickstart                      # the embedded default experiment
    mosaics-train --experiment mm1-shakespeare-char --workdir runs/mm1 \\
        --set data.path=input.txt train.steps=2000

On several hosts, every process runs the same command with its own --process-id (or sets
MOSAICS_COORDINATOR_ADDRESS, MOSAICS_NUM_PROCESSES and MOSAICS_PROCESS_ID); on TPU VMs, Slurm and
Open MPI the processes find each other without them:

    mosaics-train --workdir runs/big --coordinator-address host0:1234 --num-processes 2 \\
        --process-id 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import Any

import jax

from mosaics_jax import config as config_lib, data, distributed, registry, train

DEFAULT_EXPERIMENT = "quickstart"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="mosaics-train",
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n".join(__doc__.splitlines()[1:]),
  )
  parser.add_argument(
      "--experiment", default=DEFAULT_EXPERIMENT, help="experiment name (mosaics-info --list)"
  )
  parser.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics")
  parser.add_argument(
      "--set",
      nargs="+",
      default=[],
      metavar="KEY=VALUE",
      help="override config fields by dotted path, e.g. train.steps=100 model.num_layers=2",
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument(
      "--coordinator-address",
      metavar="HOST:PORT",
      help=f"multi-process runs: process 0's coordinator service"
      f" (or ${distributed.ENV_COORDINATOR_ADDRESS})",
  )
  parser.add_argument(
      "--num-processes",
      type=int,
      help=f"multi-process runs: the number of processes (or ${distributed.ENV_NUM_PROCESSES})",
  )
  parser.add_argument(
      "--process-id",
      type=int,
      help=f"multi-process runs: this process, from 0 (or ${distributed.ENV_PROCESS_ID})",
  )
  return parser


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


def _field_hint(config: Any, path: str) -> Any:
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


def apply_overrides(experiment: config_lib.Experiment, assignments: list[str]):
  for assignment in assignments:
    key, sep, text = assignment.partition("=")
    if not sep:
      raise config_lib.ConfigError(f"--set takes KEY=VALUE, got {assignment!r}")
    experiment = config_lib.override(experiment, key, parse_value(text, _field_hint(experiment, key)))
  return experiment


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    experiment = apply_overrides(registry.get(args.experiment), args.set)
    result = train.train(experiment, args.workdir, progress=not args.no_progress)
  except (config_lib.ConfigError, train.TrainingError, data.DataError) as e:
    print(f"mosaics-train: error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() != 0:
    return 0
  summary = [f"trained {experiment.name} to step {result.step} in {result.workdir}"]
  if result.val:
    summary += [f"  validation {k}: {v:.4f}" for k, v in result.val.items()]
  summary.append(f"  checkpoints: {result.workdir / 'checkpoints'}")
  summary.append(f"  metrics:     {result.workdir / 'metrics.jsonl'}")
  if result.plot:
    summary.append(f"  loss plot:   {result.plot}")
  print("\n".join(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
