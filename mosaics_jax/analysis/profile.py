"""`mosaics-bench train --profile`: where a training step's time goes, by model component, from a
JAX profiler trace.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax

from mosaics_jax.analysis import bench_train
from mosaics_jax.model import families


@dataclasses.dataclass(frozen=True)
class ProfileRow:
  """The time of one group of XLA ops per training step."""

  component: str  # The model's submodule, layer indices merged ("h_*/mlp"), or "outside model".
  direction: str  # "forward" or "backward" (ops of the gradient).
  kind: str  # "matmul" (dot products and the fusions around them) or "other".
  seconds_per_step: float  # Summed over the XLA ops of the group, all threads.


def train_profile(experiment, trace_dir: str, steps: int = 2) -> list[ProfileRow]:
  """Where a training step's time goes, by model component, from a JAX profiler trace.

  Traces `steps` steps into `trace_dir` (viewable in TensorBoard or Perfetto), then sums the
  duration of every XLA op by the Flax module that emitted it, read from the op's metadata in
  the compiled program; ops of the gradient carry a transpose(...) in their name. Layers are
  merged (h_3/mlp and h_5/mlp count as h_*/mlp).
  """
  model_name = type(families.build_model(experiment.model)).__name__
  compiled, state, batches = bench_train.compiled_train_step(experiment, steps)
  with jax.profiler.trace(trace_dir):
    state = bench_train.run_steps(compiled, state, batches)
  program = compiled.as_text()
  op_names = hlo_op_names(program)
  trace = max(pathlib.Path(trace_dir).rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
  totals: dict[tuple[str, str, str], float] = {}
  for plane in jax.profiler.ProfileData.from_file(str(trace)).planes:
    for line in plane.lines:
      for event in line.events:
        hlo_op = dict(event.stats).get("hlo_op")
        if hlo_op is None:
          continue
        key = _op_group(op_names.get(hlo_op, ""), model_name)
        totals[key] = totals.get(key, 0.0) + event.duration_ns * 1e-9 / steps
  rows = [ProfileRow(*key, seconds) for key, seconds in totals.items()]
  return sorted(rows, key=lambda r: -r.seconds_per_step)


def hlo_op_names(program: str) -> dict[str, str]:
  """The source op_name of every instruction of a compiled HLO module's text.

  Fusions that XLA forms late carry none (on CPU, the library fusions around dots and reductions,
  whose fused ops have none either): such a fusion takes the op_name of its first operand that has
  one, its producer in the same module and pass, with the op "dot_general" when it fuses a dot,
  "fusion" otherwise.
  """
  names = dict(re.findall(r'%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', program))
  bodies = dict(re.findall(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", program, re.S | re.M))
  fusions = re.findall(
      r"%?([\w.\-]+) = [^\n]*? fusion\(([^)]*)\)[^\n]*?calls=%?([\w.\-]+)", program
  )
  unnamed = [f for f in fusions if f[0] not in names]
  # A fusion's operands may be unnamed fusions too: repeat until nothing more is found.
  while unnamed:
    left = []
    for instruction, operands, computation in unnamed:
      known = [names[o] for o in re.findall(r"%([\w.\-]+)", operands) if o in names]
      if not known:
        left.append((instruction, operands, computation))
        continue
      op = "dot_general" if re.search(r"\bdot\(", bodies.get(computation, "")) else "fusion"
      names[instruction] = f"{known[0].rsplit('/', 1)[0]}/{op}"
    if len(left) == len(unnamed):
      break
    unnamed = left
  return names


def _op_group(op_name: str, model_name: str) -> tuple[str, str, str]:
  """(component, direction, kind) of an XLA op from its metadata op_name."""
  if not op_name:
    # Some fusions XLA forms late (on CPU, its library fusions) carry no source metadata.
    return "unattributed: fusions without source metadata", "-", "other"
  direction = "backward" if "transpose(" in op_name else "forward"
  kind = "matmul" if "dot_general" in op_name else "other"
  # op_name: jit(step)/.../jvp(MosaicV1)/h_3/mlp/... ; the model is the jvp(<model class>) scope.
  match = re.search(rf"jvp\({model_name}\)\)?/(.*)", op_name)
  if match is None:
    return "outside the model: loss, optimizer", "-", kind
  parts = [p for p in match.group(1).split("/") if not p.startswith(("jit(", "while", "body"))]
  parts = [re.sub(r"_\d+$", "_*", p) for p in parts[:2]]
  if len(parts) == 2 and not parts[0].endswith("_*"):
    parts = parts[:1]  # A top-level module (wte, ln_f) and the op inside it.
  return "/".join(parts), direction, kind


def format_profile(rows: list[ProfileRow], trace_dir: str) -> str:
  total = sum(r.seconds_per_step for r in rows)
  lines = [
      f"op time per step, summed over threads: {total:.3f} s (trace: {trace_dir})",
      "",
      "| component | pass | kind | ms/step | share |",
      "|---|---|---|---:|---:|",
  ]
  for r in rows:
    if r.seconds_per_step < 0.001 * total:
      continue
    lines.append(
        f"| {r.component} | {r.direction} | {r.kind} | {r.seconds_per_step * 1e3:.0f} |"
        f" {r.seconds_per_step / total:.1%} |"
    )
  return "\n".join(lines)
