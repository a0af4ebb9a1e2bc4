"""`mosaics-bench`: benchmarks that print a table.

mosaics-bench kernels [--seq-lens 4096 ... 65536] [--impls ...] [--bands short long]
    [--heads 16] [--head-dims 64 128] [--dtype bfloat16] [--max-dense-gb GB]
    [--compile-for TOPOLOGY] [--select-blocks K ... [--select-block-size 64]]
mosaics-bench train EXPERIMENT [--set key=value ...] [--steps 5] [--repeats 3] [--profile DIR]
    [--official PATH]
mosaics-bench decode EXPERIMENT [--set key=value ...] [--batch 1] [--prompt-len 256]
    [--new-tokens 2048] [--bucket 256]
mosaics-bench accelerator --out DIR [--dry-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

import kernels_pallas
from mosaics_jax import config as config_lib
from mosaics_jax.analysis import (
    accelerator,
    aot,
    bench_decode,
    bench_kernels,
    bench_train,
    profile,
    timing,
)
from mosaics_jax.cli import common
from mosaics_jax.port import official


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mosaics-bench", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  json_flag = dict(metavar="PATH", help="also write the table's rows to PATH as JSON")
  kernels = sub.add_parser(
      "kernels",
      help="every retrieval implementation side by side: time, useful TFLOP/s and peak memory",
  )
  kernels.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
  kernels.add_argument(
      "--impls",
      nargs="+",
      choices=sorted(kernels_pallas.IMPLEMENTATIONS),
      help="default: every implementation this backend runs natively",
  )
  kernels.add_argument(
      "--bands", nargs="+", choices=list(bench_kernels.KERNEL_BANDS), default=["short", "long"]
  )
  kernels.add_argument("--batch", type=int, default=1)
  kernels.add_argument("--heads", type=int, default=16)
  kernels.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  kernels.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
  kernels.add_argument(
      "--select-blocks",
      type=int,
      nargs="+",
      action="extend",
      default=[],
      metavar="K",
      help="also time retrieve_selected reading the R newest and the K best blocks per query, on"
      " the unbounded bands (design.md, 'Block selection')",
  )
  kernels.add_argument("--select-block-size", type=int, default=64, metavar="B")
  kernels.add_argument("--select-recent", type=int, default=1, metavar="R")
  kernels.add_argument("--select-summary", choices=["mean", "bound"], default="mean")
  kernels.add_argument("--repeats", type=int, default=3)
  kernels.add_argument("--json", **json_flag)
  kernels.add_argument(
      "--max-dense-gb",
      type=float,
      help="memory a dense (T x T) implementation may use; default: the device's memory, or"
      f" {bench_kernels.DEFAULT_MAX_DENSE_GB:g} where the device reports none",
  )
  kernels.add_argument(
      "--matmul-size", type=int, default=4096, help="n of the n^3 yardstick matmul in --dtype"
  )
  kernels.add_argument(
      "--compile-for",
      metavar="TOPOLOGY",
      help="compile every implementation for one device of this TPU slice with libtpu (pip"
      " install 'jax[tpu]'), on any host, and print XLA's planned peak memory instead of timing;"
      f" e.g. {aot.TOPOLOGY_EXAMPLES}",
  )
  train = sub.add_parser(
      "train", help="tokens/s and MFU of an experiment's jitted training step, synthetic data"
  )
  train.add_argument("experiment", help="experiment name (mosaics-info --list)")
  common.add_set_flag(train)
  train.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
  train.add_argument("--repeats", type=int, default=3)
  train.add_argument("--json", **json_flag)
  train.add_argument(
      "--matmul-size",
      type=int,
      default=timing.MATMUL_SIZE,
      help="n of the n^3 matmul timed here: the peak where the table has none (a CPU)",
  )
  train.add_argument(
      "--profile",
      metavar="DIR",
      help="also trace two steps into DIR and print where the time goes, by model component",
  )
  train.add_argument(
      "--official",
      metavar="PATH",
      help="also time the official nanoMosaics step (PyTorch, pip install -e '.[torch]') at the"
      " mm1 experiment's sizes, interleaved with ours; PATH: a checkout of"
      " github.com/facebookresearch/MemoryMosaics",
  )
  decode = sub.add_parser(
      "decode",
      help="prefill and decode tokens/s with caches, µs/token by position, against re-running"
      " the full context per token",
  )
  decode.add_argument("experiment", help="experiment name (mosaics-info --list)")
  common.add_set_flag(decode)
  decode.add_argument("--batch", type=int, default=1)
  decode.add_argument("--prompt-len", type=int, default=256)
  decode.add_argument("--new-tokens", type=int, default=2048)
  decode.add_argument("--bucket", type=int, default=256, help="new tokens per timed dispatch")
  decode.add_argument("--repeats", type=int, default=3)
  decode.add_argument("--json", **json_flag)
  decode.add_argument(
      "--no-rerun", action="store_true", help="skip the full re-run baseline (long streams)"
  )
  accelerator_check = sub.add_parser(
      "accelerator",
      help="the prepared check of a GPU or TPU in about 8 minutes: device-only tests, every"
      " implementation against the reference, the kernels sweep, a train and a decode benchmark;"
      " markdown and JSON tables into --out (docs/accelerators.md)",
  )
  accelerator_check.add_argument("--out", required=True, metavar="DIR")
  accelerator_check.add_argument(
      "--dry-run", action="store_true", help="every step at tiny sizes, on any backend (CPU too)"
  )
  return parser


def _accelerator(args: argparse.Namespace) -> int:
  """Runs the check, prints its summary; exit 1 when a step failed or overran its budget."""
  backend = jax.default_backend()
  if backend == "cpu" and not args.dry_run:
    return common.fail(
        "mosaics-bench", "accelerator: JAX sees no GPU or TPU here; --dry-run checks the steps"
    )
  out = pathlib.Path(args.out)
  summary = accelerator.check(out, backend, dry_run=args.dry_run)
  print((out / "summary.md").read_text(), end="")
  return 0 if all(step["status"] == "ok" for step in summary["steps"]) else 1


def _kernels(args: argparse.Namespace) -> int:
  """Prints the `kernels` table row by row as the sweep measures it."""
  sizes = (args.repeats, args.matmul_size, args.batch, args.heads, *args.seq_lens, *args.head_dims)
  if min(sizes) < 1:
    return common.fail("mosaics-bench", "sizes and --repeats must be >= 1")
  try:
    selections = tuple(
        kernels_pallas.BlockSelection(
            blocks=k,
            block_size=args.select_block_size,
            recent=args.select_recent,
            summary=args.select_summary,
        )
        for k in args.select_blocks
    )
  except ValueError as e:
    return common.fail("mosaics-bench", e)
  target = None
  if args.compile_for is not None:
    try:
      target = aot.topology_devices(args.compile_for)[0]
    except aot.AotError as e:
      return common.fail("mosaics-bench", e)
  backend = jax.default_backend() if target is None else target.platform
  impls = args.impls or bench_kernels.available_impls(backend, args.dtype)
  for impl in impls:
    if reason := bench_kernels.impl_unavailable_reason(impl, backend, args.dtype):
      return common.fail("mosaics-bench", f"{impl} is not benchmarked on {backend}: {reason}")
  device_bytes = (
      bench_kernels.device_memory_bytes() if target is None else aot.hbm_per_device([target])
  )
  max_dense_bytes = (
      args.max_dense_gb * 2**30
      if args.max_dense_gb is not None
      else device_bytes or bench_kernels.DEFAULT_MAX_DENSE_GB * 2**30
  )
  dtype = jnp.dtype(args.dtype)
  rate, target_name = None, None
  if target is None:
    rate = timing.matmul_flops_per_second(args.matmul_size, args.repeats, dtype)
  else:
    target_name = f"one {target.device_kind} of {args.compile_for}"
  print(
      bench_kernels.kernels_header(
          rate, args.matmul_size, args.dtype, args.batch, args.heads, target_name
      )
  )
  rows = bench_kernels.kernels(
      impls,
      matmul_rate=rate,
      seq_lens=tuple(args.seq_lens),
      head_dims=tuple(args.head_dims),
      bands=tuple(args.bands),
      batch=args.batch,
      heads=args.heads,
      dtype=dtype,
      repeats=args.repeats,
      max_dense_bytes=max_dense_bytes,
      target=target,
      selections=selections,
  )
  measured = []
  for row in rows:
    print(bench_kernels.format_kernel_row(row), flush=True)
    measured.append(row)
    _write_json(args.json, measured)  # Row by row: a run stopped early keeps what it measured.
  print(bench_kernels.kernels_footer(backend, max_dense_bytes, args.dtype))
  return 0


def _write_json(path: str | None, rows) -> None:
  """The rows (dataclasses) as a JSON list at `path`, when given, replacing it atomically."""
  if path is None:
    return
  partial = pathlib.Path(f"{path}.partial")
  partial.write_text(
      json.dumps([dataclasses.asdict(r) for r in rows], indent=1, default=float) + "\n"
  )
  partial.replace(path)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.command == "kernels":
    return _kernels(args)
  elif args.command == "accelerator":
    return _accelerator(args)
  elif args.command == "decode":
    sizes = (args.batch, args.prompt_len, args.new_tokens, args.bucket, args.repeats)
    if min(sizes) < 1:
      return common.fail("mosaics-bench", "sizes and --repeats must be >= 1")
    try:
      experiment = common.experiment(args.experiment, args.set)
    except config_lib.ConfigError as e:
      return common.fail("mosaics-bench", e)
    try:
      report = bench_decode.measure(
          experiment,
          batch=args.batch,
          prompt_len=args.prompt_len,
          new_tokens=args.new_tokens,
          bucket=args.bucket,
          repeats=args.repeats,
          rerun=not args.no_rerun,
      )
    except ValueError as e:
      return common.fail("mosaics-bench", e)
    print(bench_decode.format_report(report))
    _write_json(args.json, [report])
  elif args.command == "train":
    if min(args.steps, args.repeats, args.matmul_size) < 1:
      return common.fail("mosaics-bench", "--steps, --repeats and --matmul-size must be >= 1")
    try:
      experiment = common.experiment(args.experiment, args.set)
    except config_lib.ConfigError as e:
      return common.fail("mosaics-bench", e)
    baseline = None
    if args.official:
      try:
        step, device = official.train_step(experiment, args.official)
      except official.OfficialError as e:
        return common.fail("mosaics-bench", e)
      baseline = (f"official nanoMosaics (torch {official.torch_version()}, {device})", step)
    row = bench_train.train_throughput(
        experiment,
        steps=args.steps,
        repeats=args.repeats,
        matmul_size=args.matmul_size,
        baseline=baseline,
    )
    print(bench_train.format_train(row))
    _write_json(args.json, [row])
    if args.profile:
      rows = profile.train_profile(experiment, args.profile)
      print()
      print(profile.format_profile(rows, args.profile))
  return 0


if __name__ == "__main__":
  sys.exit(main())
