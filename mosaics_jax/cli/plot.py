"""`mosaics-plot`: the train and val loss of training runs, or evaluation results, on one figure.

mosaics-plot runs/mm2-tiny runs/llama-tiny -o loss.png [--log-y] [--title T] [--smooth 0.9]
mosaics-plot results.jsonl -o eval.png    # mosaics-eval --out: metric against length or position
mosaics-plot --regbench repro/regbench-paper repro/regbench-paper-500 -o regbench.png
"""

from __future__ import annotations

import argparse
import sys

from mosaics_jax.cli import common


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mosaics-plot", description=__doc__.splitlines()[0])
  parser.add_argument(
      "dirs",
      nargs="+",
      metavar="DIR",
      help="run directory with metrics.jsonl, or results .jsonl files of mosaics-eval",
  )
  parser.add_argument(
      "-o", "--output", required=True, metavar="FILE", help="image file (.png, .pdf, .svg)"
  )
  parser.add_argument(
      "--regbench",
      action="store_true",
      help="DIRs are regbench-paper reproductions: the v1 paper's figure, accuracy and L1"
      " against training languages, ours beside the paper's",
  )
  parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
  parser.add_argument("--title", help="figure title")
  parser.add_argument(
      "--smooth",
      type=float,
      default=0.0,
      metavar="A",
      help="EMA weight of the past in [0, 1) for the train loss (default 0: raw)",
  )
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if not 0 <= args.smooth < 1:
    parser.error(f"--smooth must be in [0, 1), got {args.smooth}")
  results = [d for d in args.dirs if d.endswith(".jsonl")]
  if results and len(results) != len(args.dirs):
    parser.error("give run directories or results .jsonl files, not both")
  try:
    # matplotlib is the optional `plots` extra: without it only this command fails.
    from mosaics_jax.eval import plots as eval_plots, results as results_lib
    from mosaics_jax.repro import figures
    from mosaics_jax.train import plots
  except ImportError as e:
    return common.fail(
        "mosaics-plot", f"{e}; install the plots extra: pip install 'mosaics-jax[plots]'", 1
    )
  try:
    if args.regbench:
      path = figures.regbench(args.dirs, args.output)
    elif results:
      records = [r for f in results for r in results_lib.read_jsonl(f)]
      path = eval_plots.plot_results(records, args.output, title=args.title)
    else:
      path = plots.plot_runs(
          args.dirs, args.output, log_y=args.log_y, title=args.title, smoothing=args.smooth
      )
  except (OSError, ValueError) as e:  # ReproError is a ValueError.
    return common.fail("mosaics-plot", e)
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
