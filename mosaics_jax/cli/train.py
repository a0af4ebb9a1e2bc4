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
import sys

import jax

from mosaics_jax import config as config_lib, distributed
from mosaics_jax.cli import common
from mosaics_jax.train import data, loop

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
  common.add_set_flag(parser)
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


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    experiment = common.experiment(args.experiment, args.set)
    result = loop.train(experiment, args.workdir, progress=not args.no_progress)
  except (config_lib.ConfigError, loop.TrainingError, data.DataError) as e:
    return common.fail("mosaics-train", e)
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
