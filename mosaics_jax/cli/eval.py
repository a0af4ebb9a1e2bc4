"""`mosaics-eval`: score a trained model on evaluation tasks; a markdown table per task.

    mosaics-eval runs/mm2-char --task perplexity --set perplexity.path=input.txt
    mosaics-eval runs/mm2-char --task niah_single --task vt --haystack essays.txt \\
        --set niah_single.lengths=[1024,2048] --out results.jsonl
    mosaics-eval runs/mm2-regbench --task regbench --set model.long_term_delay=128
    mosaics-eval --list

PATH is a training workdir or an exported directory. `--set TASK.KEY=VALUE` changes a task's
settings (`--list` shows them all); `--set model.KEY=VALUE` changes a model field that does not
shape the parameters (long_term_delay, drop_long_term_memory, retrieve_impl, ...), recorded with
the results. `--out FILE` appends one JSON line per (task, setting, metric), each task's lines
whole or not at all, to a new file or a file of such lines (checked before any work);
`mosaics-plot FILE` draws them. Greedy generation and seeded examples: the same seed gives the
same results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mosaics_jax import config as config_lib
from mosaics_jax.cli import common
from mosaics_jax.eval import harness as harness_lib, results as results_lib, tasks as tasks_lib


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="mosaics-eval",
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n".join(__doc__.splitlines()[1:]),
  )
  parser.add_argument("path", nargs="?", help="a training workdir or an exported directory")
  parser.add_argument("--list", action="store_true", help="list the tasks and their settings")
  parser.add_argument(
      "--task", action="append", default=[], metavar="NAME", help="a task to run; repeatable"
  )
  parser.add_argument(
      "--set",
      nargs="+",
      action="extend",
      default=[],
      metavar="KEY=VALUE",
      help="TASK.KEY=VALUE (a task setting) or model.KEY=VALUE (evaluation only); repeatable",
  )
  parser.add_argument("--out", metavar="FILE", help="append JSON lines of the results to FILE")
  parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
  parser.add_argument("--limit", type=int, metavar="N", help="at most N examples per setting")
  parser.add_argument("--seed", type=common.seed, default=0, help="the examples' random stream")
  parser.add_argument("--haystack", metavar="FILE", help="essay text for RULER's haystacks")
  parser.add_argument(
      "--chunk", type=int, default=512, help="tokens per forward when scoring (default 512)"
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.list:
    print(tasks_lib.describe())
    return 0
  if args.path is None or not args.task:
    parser.error("give PATH and at least one --task NAME (--list shows the tasks)")
  for name, value in (("--batch-size", args.batch_size), ("--chunk", args.chunk)):
    if value < 1:
      parser.error(f"{name} must be >= 1, got {value}")
  if args.limit is not None and args.limit < 1:
    parser.error(f"--limit must be >= 1, got {args.limit}")
  repeated = sorted({t for t in args.task if args.task.count(t) > 1})
  if repeated:
    parser.error(f"--task {', '.join(repeated)} given more than once")
  if args.out:
    try:  # Before any work: a target that cannot take the results would lose them.
      results_lib.check_target(args.out)
    except ValueError as e:
      return common.fail("mosaics-eval", f"--out {e}")
  model_sets = [a.removeprefix("model.") for a in args.set if a.startswith("model.")]
  task_sets = [a for a in args.set if not a.startswith("model.")]
  try:
    settings = tasks_lib.settings(args.task, task_sets)
    harness = harness_lib.Harness.load(
        args.path,
        model_overrides=model_sets,
        batch_size=args.batch_size,
        chunk=args.chunk,
        seed=args.seed,
        limit=args.limit,
        progress=not args.no_progress,
        haystack=args.haystack,
    )
  except (harness_lib.EvalError, *common.READ_ERRORS) as e:
    return common.fail("mosaics-eval", e)
  every = []
  for name, task_settings in settings.items():
    start = time.perf_counter()
    try:
      found = tasks_lib.get(name).run(harness, task_settings)
    except (harness_lib.EvalError, config_lib.ConfigError) as e:
      return common.fail("mosaics-eval", e)
    seconds = time.perf_counter() - start
    examples = results_lib.examples_run(found)
    print(results_lib.markdown(found) + "\n")
    print(f"{name}: {examples} examples in {seconds:.1f} s ({examples / seconds:.2f} examples/s)\n")
    if args.out:
      records = [results_lib.record(r, model=harness.info, seed=args.seed) for r in found]
      try:
        results_lib.append_jsonl(args.out, records)
      except OSError as e:
        # stdout, as a full or failing disk would fail a file beside it too.
        print("\n".join(json.dumps(r) for r in records))
        return common.fail(
            "mosaics-eval",
            f"could not append {name}'s results to {args.out} ({e.strerror or e}); the file is as"
            " it was before them, and they are printed above as JSON lines",
        )
    every += found
  if args.out:
    print(f"{len(every)} results appended to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
