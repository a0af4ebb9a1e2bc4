"""`mosaics-bench`: benchmarks that print a table.

    mosaics-bench ops [--seq-lens 1024 4096 16384] [--impl xla] [--heads 8] [--head-dim 64]
    mosaics-bench train EXPERIMENT [--set key=value ...] [--steps 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys

import kernels_pallas
from mosaics_jax import benchmarks, config as config_lib, registry
from mosaics_jax.cli import train as train_cli


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
  train = sub.add_parser(
      "train", help="tokens/s and MFU of an experiment's jitted training step, synthetic data"
  )
  train.add_argument("experiment", help="experiment name (mosaics-info --list)")
  train.add_argument(
      "--set",
      nargs="+",
      default=[],
      metavar="KEY=VALUE",
      help="override config fields by dotted path, e.g. train.batch_size=16 model.dropout=0",
  )
  train.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
  train.add_argument("--repeats", type=int, default=3)
  train.add_argument("--matmul-size", type=int, default=2048, help="n of the fp32 n^3 yardstick")
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
  elif args.command == "train":
    if min(args.steps, args.repeats, args.matmul_size) < 1:
      print("mosaics-bench: error: --steps, --repeats and --matmul-size must be >= 1",
            file=sys.stderr)
      return 2
    try:
      experiment = train_cli.apply_overrides(registry.get(args.experiment), args.set)
    except config_lib.ConfigError as e:
      print(f"mosaics-bench: error: {e}", file=sys.stderr)
      return 2
    row = benchmarks.train_throughput(
        experiment, steps=args.steps, repeats=args.repeats, matmul_size=args.matmul_size
    )
    print(benchmarks.format_train(row))
  return 0


if __name__ == "__main__":
  sys.exit(main())
