"""`mosaics-info`: the experiments of the zoo, and the size and cost of each model.

    mosaics-info --list
    mosaics-info mm2-large [--context 256] [--json]
    mosaics-info mm2-large --mesh dcn_data=2,fsdp=128 [--batch 1024] [--context 4096] \\
        [--set model.remat_policy=save_retrieval train.grad_accum=2]

With --mesh it also plans the memory of training on that mesh, per device, from shapes only: no
device is needed (`mosaics_jax.memory_plan`). With --compile-for it compiles the train step for a
TPU slice with libtpu, on any host, and prints XLA's per-device memory beside the plan
(`mosaics_jax.aot`):

    mosaics-info mm2-large --compile-for v5p:4x4x4 --mesh fsdp=-1 --batch 64 --context 4096
"""

from __future__ import annotations

import argparse
import json
import sys

from mosaics_jax import config as config_lib, overrides, registry
from mosaics_jax.analysis import aot, flops, memory_plan
from mosaics_jax.cli import common
from mosaics_jax.model import families

# The paper's context of FLOP counts.
FLOP_CONTEXT = 256


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mosaics-info", description=__doc__.splitlines()[0])
  parser.add_argument("experiment", nargs="?", help="experiment name (see --list)")
  parser.add_argument("--list", action="store_true", help="list every experiment")
  parser.add_argument(
      "--context",
      type=int,
      help=f"context of the FLOP count (default {FLOP_CONTEXT}, the paper's) and of the memory"
      " plan (default: the experiment's data.seq_len)",
  )
  parser.add_argument(
      "--mesh",
      help="plan per-device memory on this mesh, e.g. data=2,fsdp=4,tensor=1 (also dcn_data,"
      " dcn_fsdp; missing sizes are 1)",
  )
  parser.add_argument(
      "--compile-for",
      metavar="TOPOLOGY",
      help="compile the train step for this TPU slice with libtpu (pip install 'jax[tpu]') and"
      f" print XLA's memory per device; e.g. {aot.TOPOLOGY_EXAMPLES}. The mesh is --mesh (here one"
      " of data, fsdp, tensor may be -1, the rest) or else the experiment's; dcn sizes give the"
      " slice count",
  )
  parser.add_argument(
      "--batch",
      type=int,
      help="with --mesh or --compile-for: the global batch size (default: train.batch_size)",
  )
  common.add_set_flag(parser)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument(
      "--markdown", action="store_true", help="with --list: the zoo table of README.md"
  )
  return parser


def _billions(x: float) -> str:
  return f"{x / 1e9:.3f}B" if x >= 1e8 else f"{x / 1e6:.2f}M"


def zoo_table(context: int = FLOP_CONTEXT) -> str:
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
  params = {name: families.param_count(e.model) for name, e in experiments.items()}
  if as_json:
    return json.dumps(
        {
            name: {"family": e.model.family, "params": params[name], "description": e.description}
            for name, e in experiments.items()
        }
    )
  width = max(map(len, experiments))
  family_width = max(len(e.model.family) for e in experiments.values())
  return "\n".join(
      f"{name:<{width}}  {e.model.family:<{family_width}}  {_billions(params[name]):>7}"
      f"  {e.description}"
      for name, e in experiments.items()
  )


def _describe(
    experiment: config_lib.Experiment,
    context: int,
    as_json: bool,
    plan: memory_plan.Plan | None,
    compiled: aot.CompileReport | None = None,
) -> str:
  name = experiment.name
  report = flops.count(experiment.model, context)
  step = flops.step_flops(experiment.model, context, experiment.train.loss_chunk)
  if as_json:
    out = {
        "experiment": name,
        **report.to_json(),
        "remat_policy": experiment.model.effective_remat_policy,
        "step_flops_per_token": step,
        "config": config_lib.to_dict(experiment),
    }
    if plan is not None:
      out["memory_plan"] = plan.to_json()
    if compiled is not None:
      out["compiled"] = compiled.to_json()
    return json.dumps(out)
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
  policy = model.effective_remat_policy
  forward = report.flops_per_token_band_exact
  lines += ["", f"  FLOPs/token of a training step (bands), by remat policy (this run: {policy})"]
  for name, n in step.items():
    mark = "*" if name == policy else " "
    lines.append(f"  {mark} {name:<28} {_billions(n):>12}   {n / forward:.2f} x forward")
  if plan is not None:
    lines += ["", memory_plan.format_plan(plan)]
  if compiled is not None:
    lines += ["", aot.format_report(compiled)]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.context is not None and args.context < 1:
    _parser().error(f"--context must be >= 1, got {args.context}")
  planned = args.mesh is not None or args.compile_for is not None
  if args.batch is not None and (not planned or args.batch < 1):
    _parser().error("--batch takes a global batch size >= 1, with --mesh or --compile-for")
  if planned and not args.experiment:
    _parser().error("--mesh and --compile-for need an experiment name")
  flop_context = args.context or FLOP_CONTEXT
  try:
    if args.list and args.markdown:
      print(zoo_table(flop_context))
    elif args.list:
      print(_list(args.json))
    elif args.experiment:
      experiment = common.experiment(args.experiment, args.set)
      plan = compiled = None
      mesh = None if args.mesh is None else memory_plan.parse_mesh(args.mesh)
      if args.compile_for is not None:
        target = overrides.resize(experiment, args.batch, args.context)
        compiled = aot.compile_for_topology(target, args.compile_for, mesh)
        mesh = compiled.mesh  # -1 resolved, for the plan beside it.
      if mesh is not None:
        plan = memory_plan.plan(experiment, mesh, batch=args.batch, context=args.context)
      print(_describe(experiment, flop_context, args.json, plan, compiled))
    else:
      _parser().error("give an experiment name or --list")
  except config_lib.ConfigError as e:
    return common.fail("mosaics-info", e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
