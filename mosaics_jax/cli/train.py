"""`mosaics-train`: train an experiment; the same command again on the same workdir resumes.

    mosaics-train --workdir runs/quickstart                      # the embedded default experiment
    mosaics-train --experiment mm1-shakespeare-char --workdir runs/mm1 \\
        --set data.path=input.txt train.steps=2000

Fine-tuning starts from another run's parameters (a workdir or an exported directory) with a fresh
optimizer; an experiment that declares `init_from` (the *-32k context extensions) needs it, or
--from-scratch:

    mosaics-train --experiment mm2-small-32k --workdir runs/32k --init-from runs/mm2-small

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

from mosaics_jax import checkpoints, config as config_lib, distributed
from mosaics_jax.analysis import utilisation
from mosaics_jax.cli import common
from mosaics_jax.model import families
from mosaics_jax.port import layout, pretrained
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
  start = parser.add_mutually_exclusive_group()
  start.add_argument(
      "--init-from",
      metavar="PATH",
      help="fine-tune: start from the parameters of PATH (a workdir or an exported directory)"
      " with a fresh optimizer; a run that resumes ignores it",
  )
  start.add_argument(
      "--from-scratch",
      action="store_true",
      help="start an experiment that declares init_from from random parameters anyway",
  )
  parser.add_argument(
      "--restart",
      action="store_true",
      help="start over: move the workdir's previous run (checkpoints, metrics, config) aside",
  )
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


def _init_from(args, experiment: config_lib.Experiment) -> loop.InitFrom | None:
  """The parameters to start from, checked against the experiment's model; None to start from
  random ones or to resume."""
  resuming = not args.restart and bool(checkpoints.saved_steps(args.workdir))
  if args.init_from is None:
    if experiment.init_from and not args.from_scratch and not resuming:
      raise loop.TrainingError(
          f"{experiment.name} fine-tunes from {experiment.init_from}: give --init-from PATH (a"
          f" workdir or an exported directory of {experiment.init_from}), or --from-scratch"
      )
    return None
  if resuming:  # A fine-tune resumes as any run does.
    return None
  source = pretrained.load(args.init_from)
  differing = config_lib.fine_tune_mismatch(source.config, experiment.model)
  if differing:
    raise loop.TrainingError(
        f"--init-from {args.init_from} holds another model than {experiment.name}'s: "
        + ", ".join(differing)
    )
  params = families.to_layout(source.params, experiment.model)
  return loop.InitFrom(params=params, origin=str(args.init_from), step=source.step)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    experiment = common.experiment(args.experiment, args.set)
    init_from = _init_from(args, experiment)
    result = loop.train(
        experiment,
        args.workdir,
        progress=not args.no_progress,
        init_from=init_from,
        restart=args.restart,
        utilisation=utilisation.of(experiment),
    )
  except (
      config_lib.ConfigError,
      loop.TrainingError,
      data.DataError,
      layout.PortError,
      FileNotFoundError,
  ) as e:
    return common.fail("mosaics-train", e)
  except KeyboardInterrupt:  # A second Ctrl-C: the first one asked for a checkpoint.
    return common.fail("mosaics-train", "interrupted again: stopped without a checkpoint", 130)
  if jax.process_index() != 0:
    return result.stopped_by.exit_code if result.stopped_by else 0
  if result.stopped_by is not None:
    signal = result.stopped_by.signal
    print(
        f"stopped by {signal.name if signal else 'a signal to another process'}"
        f" at step {result.step}: checkpointed in {result.workdir / 'checkpoints'}; run the same"
        " command to resume"
    )
    return result.stopped_by.exit_code
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
