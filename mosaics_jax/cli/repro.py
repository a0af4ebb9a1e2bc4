"""`mosaics-repro`: re-run a claim of the papers (runs, evaluations, report with a verdict).

    mosaics-repro --list
    mosaics-repro induction --workdir repro/induction              # trains, evaluates, reports
    mosaics-repro regbench-short --workdir repro/regbench-short --seeds 3
    mosaics-repro v2-table-12 --workdir gs://.../t12 --dry-run      # the plan and its cost
    mosaics-repro v2-table-3 --workdir DIR --set data.path=tokens.bin

Every run trains in DIR/runs/<run>-seed<k> (a workdir: `mosaics_jax.load` reads it) and resumes
from its newest checkpoint; evaluations that are done are not run again. The same command after an
interruption (Ctrl-C, SIGTERM) goes on where it stopped. DIR/report.md has the verdict, the
tables (means over the command's seeds beside the paper's numbers), the plots and the wall time;
DIR/results.jsonl every result, of these seeds and of any earlier command's others (a command
with fewer --seeds removes none). `--set KEY=VALUE` changes every run's experiment (e.g. the data
path of the paper-scale runs).
"""

from __future__ import annotations

import argparse
import sys

from mosaics_jax import registry
from mosaics_jax.analysis import timing
from mosaics_jax.cli import common
from mosaics_jax.eval import harness as harness_lib
from mosaics_jax.repro import plan as plan_lib, report as report_lib, runner
from mosaics_jax.train import data, loop


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="mosaics-repro",
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n".join(__doc__.splitlines()[1:]),
  )
  parser.add_argument("name", nargs="?", help="the reproduction (see --list)")
  parser.add_argument("--list", action="store_true", help="list the reproductions")
  parser.add_argument("--workdir", help="the reproduction's directory (runs, results, report)")
  parser.add_argument(
      "--seeds", type=int, help="seeds per run (default: the reproduction's, at least 2)"
  )
  parser.add_argument(
      "--dry-run", action="store_true", help="print the plan: runs, tokens, FLOPs and cost"
  )
  common.add_set_flag(parser)
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  return parser


def _list() -> str:
  found = registry.all_reproductions()
  width = max(map(len, found), default=0)
  return "\n".join(
      f"{name:<{width}}  {r.scale:<5}  {r.claim} ({r.source})" for name, r in found.items()
  )


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.list:
    print(_list())
    return 0
  if args.name is None:
    parser.error("give a reproduction's NAME (--list shows them)")
  if args.workdir is None and not args.dry_run:
    parser.error("--workdir is required (except with --dry-run)")
  if args.seeds is not None and args.seeds < 1:
    parser.error(f"--seeds must be >= 1, got {args.seeds}")
  assignments = tuple(args.set)
  try:
    common.refuse_repeated_keys(assignments)
    repro = registry.get_reproduction(args.name)
    seeds = args.seeds or repro.seeds
    if args.dry_run:
      planned = plan_lib.plan(repro, assignments)
      print(plan_lib.format_plan(repro, planned, seeds, timing.matmul_flops_per_second()))
      return 0
    report_lib.read_results(args.workdir)  # Before any work: a damaged one would stop the report.
    progress = runner.run(
        repro, args.workdir, seeds=seeds, assignments=assignments, progress=not args.no_progress
    )
    report = report_lib.write(repro, args.workdir, seeds=seeds, assignments=assignments)
  except (
      plan_lib.ReproError,
      loop.TrainingError,
      data.DataError,
      harness_lib.EvalError,
      *common.READ_ERRORS,
  ) as e:
    return common.fail("mosaics-repro", e)
  except KeyboardInterrupt:  # A second Ctrl-C: the first one asked for a checkpoint.
    return common.fail("mosaics-repro", "interrupted again: stopped without a checkpoint", 130)
  if progress.stopped_by is not None:
    signal = progress.stopped_by.signal
    print(
        f"stopped by {signal.name if signal else 'a signal'} while training {progress.stopped_run}"
        " (checkpointed); run the same command to go on"
    )
    return progress.stopped_by.exit_code
  print(
      f"{repro.name}: {report.verdict} ({report_lib.held(report.outcomes)}); trained"
      f" {progress.trained} run(s), ran"
      f" {progress.evaluated} evaluation(s)\n  report:  {report.path} (seeds"
      f" {report_lib.seed_ranges(repro.train_seeds(seeds))})\n  results:"
      f" {report.path.parent / report_lib.RESULTS} (seeds"
      f" {report_lib.seed_ranges(report.recorded)})"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
