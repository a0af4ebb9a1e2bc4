"""`mosaics-info`: the experiments of the zoo, and the size and cost of each model.

    mosaics-info --list
    mosaics-info mm2-large [--context 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from mosaics_jax import config as config_lib, flops, registry


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mosaics-info", description=__doc__.splitlines()[0])
  parser.add_argument("experiment", nargs="?", help="experiment name (see --list)")
  parser.add_argument("--list", action="store_true", help="list every experiment")
  parser.add_argument(
      "--context", type=int, default=256, help="context of the FLOP count (paper: 256)"
  )
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument(
      "--markdown", action="store_true", help="with --list: the zoo table of README.md"
  )
  return parser


def _billions(x: float) -> str:
  return f"{x / 1e9:.3f}B" if x >= 1e8 else f"{x / 1e6:.2f}M"


def zoo_table(context: int = 256) -> str:
  """The README's model zoo: one row per experiment with its size and cost."""
  rows = [
      f"| experiment | family | params | FLOPs/token (context {context}) | train context |",
      "|---|---|---:|---:|---:|",
  ]
  for name, e in registry.all_experiments().items():
    report = flops.count(e.model, context)
    rows.append(
        f"| `{name}` | {e.model.family} | {_billions(report.params)} |"
        f" {_billions(report.flops_per_token)} | {e.data.seq_len} |"
    )
  return "\n".join(rows)


def _list(as_json: bool) -> str:
  experiments = registry.all_experiments()
  if as_json:
    return json.dumps(
        {name: {"family": e.model.family, "description": e.description}
         for name, e in experiments.items()}
    )
  width = max(map(len, experiments))
  return "\n".join(
      f"{name:<{width}}  {e.model.family:<5}  {e.description}" for name, e in experiments.items()
  )


def _describe(name: str, context: int, as_json: bool) -> str:
  experiment = registry.get(name)
  report = flops.count(experiment.model, context)
  if as_json:
    return json.dumps(
        {"experiment": name, **report.to_json(), "config": config_lib.to_dict(experiment)}
    )
  model = experiment.model
  lines = [
      f"{name}: {experiment.description}",
      f"  family {model.family}, {model.num_layers} layers, width {model.width},"
      f" {model.num_heads} heads, vocab {model.vocab_size}",
      f"  parameters          {_billions(report.params)}",
      f"  FLOPs/token         {_billions(report.flops_per_token)}"
      f"   (forward, context {context}, paper convention)",
      f"  FLOPs/token (bands) {_billions(report.flops_per_token_band_exact)}"
      "   (each band's real mean number of pairs)",
      "",
      f"  {'component':<30} {'params':>12} {'share':>7} {'FLOPs/token':>12}",
  ]
  for c in report.components:
    lines.append(
        f"  {c.name:<30} {_billions(c.params):>12} {c.params / report.params:>7.1%}"
        f" {_billions(c.flops_per_token):>12}"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.context < 1:
    _parser().error(f"--context must be >= 1, got {args.context}")
  try:
    if args.list and args.markdown:
      print(zoo_table(args.context))
    elif args.list:
      print(_list(args.json))
    elif args.experiment:
      print(_describe(args.experiment, args.context, args.json))
    else:
      _parser().error("give an experiment name or --list")
  except config_lib.ConfigError as e:
    print(f"mosaics-info: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
