"""`mosaics-bench`: benchmarks that print a table.

    mosaics-bench ops [--seq-lens 1024 4096 16384] [--impl xla] [--heads 8] [--head-dim 64]
"""

from __future__ import annotations

import argparse
import sys

import kernels_pallas
from mosaics_jax import benchmarks


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mosaics-bench", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  ops = sub.add_parser("ops", help="time and peak memory of the retrieval op, forward+backward")
  ops.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
  ops.add_argument("--impl", default="xla", choices=sorted(kernels_pallas.IMPLEMENTATIONS))
  ops.add_argument("--batch", type=int, default=1)
  ops.add_argument("--heads", type=int, default=8)
  ops.add_argument("--head-dim", type=int, default=64)
  ops.add_argument("--repeats", type=int, default=3)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.command == "ops":
    rows, rate = benchmarks.ops(
        seq_lens=tuple(args.seq_lens),
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        impl=args.impl,
        repeats=args.repeats,
    )
    print(benchmarks.format_ops(rows, rate, args.impl))
  return 0


if __name__ == "__main__":
  sys.exit(main())
