"""Per-device memory of a training run on a device mesh, from shapes only (`mosaics-info --mesh`).

    plan = memory_plan.plan(registry.get("mm2-large"), {"dcn_data": 2, "fsdp": 128})
    print(memory_plan.format_plan(plan))

No device is needed and nothing is allocated: the parameters and the optimizer state are the train
state's shapes (`train.step.boxed_state_shapes`, with the experiment's optimizer), so the mesh may
be far larger than the machine. Each array's per-device shard follows its logical axis
names and the experiment's `mesh.rules` exactly as training shards it (`mosaics_jax.sharding`); a
dimension that its mesh axes do not divide is an error naming the parameter, as in training.

- parameters: float32, each leaf's shard.
- optimizer state: AdamW's two moments, sharded like their parameters, plus replicated scalars.
- gradients: one float32 gradient per parameter, sharded like it; grad_accum > 1 keeps a second
  copy, the accumulator over micro-batches.
- activations: an ESTIMATE, not a measurement (XLA fuses, schedules and frees buffers as it sees
  fit; run one step and read the profiler for the real peak). Per device, b = micro-batch rows
  (batch_size / grad_accum over the mesh axes of "batch"), t = context, widths over their axes:
    * without remat, every layer keeps the tensors its backward pass reads: the residual-stream
      input and norm outputs, the retrieval residuals (two float32 [b, t, h] row statistics, or a
      single-block call's [b, h, t, t] float32 probabilities) of each band of the family, and
      what the family lists (`Family.layer_activations`: projections, keys and values in the
      compute dtype and float32, the retrieval's q, k, v and output, the SwiGLU's three
      [b, t, ffn] tensors);
    * with a remat policy (`model.remat_policy`, or `model.remat`: "full"), every layer keeps
      its [b, t, width] input, plus one layer's tensors above while its backward recomputes
      them, plus what the policy saves (`lm.REMAT_POLICIES`): "save_retrieval" every retrieval's
      output ([b, t, h, d] in the compute dtype, float32 for the v1 persistent memory) and
      residuals (as above), "save_dots" every projection's output ([b, t, out] in the compute
      dtype, one per kernel of a layer), "save_dots_and_retrieval" both; the one layer's tensors
      recomputed are then those above less what is saved;
    * retrieval temporaries: the largest call's 4 float32 score-sized buffers of one iteration
      of the XLA path's loop (scores, probabilities, their cotangents): [b, n, h, B, B], n = t / B
      blocks, B its block size (`kernels_pallas.xla.default_block_size`): O(t * B), linear in t
      (on GPU and TPU an iteration is one chunk, `kernels_pallas.xla.chunk_slots`); not the XLA
      path's O(t * d) copies of its inputs and gradients. The Pallas kernels keep these tiles in
      on-chip memory, so on TPU and GPU this term is an upper bound. A family may
      add buffers of its own (`Family.layer_temporaries`: v1's persistent memory adds 4 float32
      [h, 256, pmem_count * pmem_size] chunk buffers);
    * the final norm's input and output, and the logits: the classifier's [b, t, vocab] output
      in the compute dtype, its float32 copy and the float32 cross-entropy gradient; with a
      chunked loss (`train.loss_chunk`), those of one chunk, [b, min(loss_chunk, t), vocab].
  Per-head scalars ([b, t, h] gates), integer inputs and the embedding lookup are ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import xla
from mosaics_jax import config as config_lib, overrides, sharding
from mosaics_jax.model import families, family as family_lib
from mosaics_jax.train import optim, step

# Keys of a mesh: the sizes of MeshConfig. The planned mesh's axis data spans data * dcn_data
# devices, fsdp spans fsdp * dcn_fsdp, tensor spans tensor.
MESH_SIZES = ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp")
# Of the estimate's retrieval temporaries: scores, probabilities and their two cotangents.
RETRIEVAL_TEMPORARIES = 4
_F32 = 4

_RESIDUAL = ("batch", "length", "embed")
_LOGITS = ("batch", "length", "vocab")
_ROW_STATS = ("batch", "length", "heads")
_CHUNK_SCORES = ("batch", None, "heads", None, None)  # [b, slots, h, B, B] of one chunk.


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device bytes of one training step of an experiment on a mesh."""

  experiment: str
  mesh: dict[str, int]  # Every key of MESH_SIZES.
  axis_sizes: dict[str, int]  # Devices along each mesh axis (data, fsdp, tensor), slices included.
  global_batch: int
  grad_accum: int
  device_batch: int  # Rows of one micro-batch on each device.
  context: int
  remat_policy: str  # `ModelConfig.effective_remat_policy`.
  loss_chunk: int  # Positions per chunk of the loss (`train.loss_chunk`); 0: the whole context.
  params: int  # Parameter count (all devices).
  param_bytes: int
  optimizer_bytes: int
  gradient_bytes: int
  activations: tuple[tuple[str, int], ...]  # (term, bytes) of the activation estimate.

  @property
  def devices(self) -> int:
    return math.prod(self.axis_sizes.values())

  @property
  def activation_bytes(self) -> int:
    return sum(b for _, b in self.activations)

  @property
  def total_bytes(self) -> int:
    return self.param_bytes + self.optimizer_bytes + self.gradient_bytes + self.activation_bytes

  def to_json(self) -> dict[str, Any]:
    return {
        "experiment": self.experiment,
        "mesh": self.mesh,
        "axis_sizes": self.axis_sizes,
        "devices": self.devices,
        "global_batch": self.global_batch,
        "grad_accum": self.grad_accum,
        "device_batch": self.device_batch,
        "context": self.context,
        "remat": self.remat_policy != "none",
        "remat_policy": self.remat_policy,
        "loss_chunk": self.loss_chunk,
        "params": self.params,
        "bytes_per_device": {
            "parameters": self.param_bytes,
            "optimizer_state": self.optimizer_bytes,
            "gradients": self.gradient_bytes,
            "activations_estimate": self.activation_bytes,
            "total": self.total_bytes,
        },
        "activation_terms": dict(self.activations),
    }


def parse_mesh(text: str) -> dict[str, int]:
  """{"data": 2, "fsdp": 4} from "data=2,fsdp=4"; names are those of MESH_SIZES."""
  sizes: dict[str, int] = {}
  for item in text.split(","):
    name, sep, value = (s.strip() for s in item.partition("="))
    if not sep or not name:
      raise config_lib.ConfigError(
          f"a mesh is NAME=SIZE pairs separated by commas, e.g. data=2,fsdp=4,tensor=1; got"
          f" {item!r} in {text!r}"
      )
    if name not in MESH_SIZES:
      close = difflib.get_close_matches(name, MESH_SIZES, n=1)
      hint = f"did you mean {close[0]}? " if close else ""
      raise config_lib.ConfigError(
          f"unknown mesh axis {name!r}; {hint}known: {', '.join(MESH_SIZES)}"
      )
    if name in sizes:
      raise config_lib.ConfigError(f"mesh axis {name!r} is given twice in {text!r}")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise config_lib.ConfigError(f"mesh size {name}={value!r} is not an integer") from None
  return sizes


def _mesh_config(sizes: Mapping[str, int], rules: config_lib.AxisRules) -> config_lib.MeshConfig:
  unknown = sorted(set(sizes) - set(MESH_SIZES))
  if unknown:
    raise config_lib.ConfigError(f"unknown mesh axes {unknown}; known: {', '.join(MESH_SIZES)}")
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      # -1 ("the rest") needs a device count, which a plan does not have.
      raise config_lib.ConfigError(
          f"mesh size {name}={size!r} must be an integer >= 1 (give every size: with no devices"
          " there is no rest for -1)"
      )
  return config_lib.MeshConfig(**{**dict.fromkeys(MESH_SIZES, 1), **sizes}, rules=rules)


def _shard_bytes(
    tensor: family_lib.Activation,
    mesh: jax.sharding.AbstractMesh,
    rules: config_lib.AxisRules,
    what: str,
) -> int:
  """Bytes of `tensor`'s shard on each device; `what` names it in the error if it does not fit."""
  spec = nn.logical_to_mesh_axes(tensor.names, rules)
  try:
    shape = jax.sharding.NamedSharding(mesh, spec).shard_shape(tensor.shape)
  except ValueError:
    raise sharding.ShardingError(
        f"{what} of shape {tensor.shape} (logical axes {tensor.names}) is not divisible by its"
        f" mesh axes {tuple(spec)} on the mesh {dict(mesh.shape)}; change the mesh sizes or"
        " mesh.rules"
    ) from None
  return tensor.count * math.prod(shape) * tensor.itemsize


def _tree_bytes(tree: Any, mesh: jax.sharding.AbstractMesh, rules: config_lib.AxisRules) -> int:
  """Per-device bytes of a tree of (boxed or plain) ShapeDtypeStructs; plain leaves replicated."""
  total = 0
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  for path, leaf in leaves:
    if isinstance(leaf, nn.LogicallyPartitioned):
      names, value = tuple(leaf.names), leaf.value
    else:
      names, value = (None,) * len(leaf.shape), leaf
    where = jax.tree_util.keystr(path)
    total += _shard_bytes(
        family_lib.Activation(names, value.shape, value.dtype.itemsize), mesh, rules, where
    )
  return total


def _retrieval_tensors(
    b: int, t: int, h: int, band: family_lib.Band
) -> tuple[family_lib.Activation, family_lib.Activation]:
  """(what one retrieval call keeps for its backward, its temporaries) on the XLA path."""
  block = xla.default_block_size(t, band.hi)
  blocks = -(-t // block)
  if blocks == 1:  # Differentiated by autodiff, which keeps the probabilities.
    scores = (b, 1, h, block, block)
    saved = family_lib.Activation(_CHUNK_SCORES, scores, _F32)
    return saved, family_lib.Activation(_CHUNK_SCORES, scores, _F32, RETRIEVAL_TEMPORARIES)
  # The recomputing backward keeps each row's max and sum.
  saved = family_lib.Activation(_ROW_STATS, (b, t, h), _F32, 2)
  # GPUs and TPUs, which the plans are for, compute a whole iteration of the loop at once.
  scores = (b, xla.chunk_slots(blocks, b * h, block, None), h, block, block)
  return saved, family_lib.Activation(_CHUNK_SCORES, scores, _F32, RETRIEVAL_TEMPORARIES)


def _layer_tensors(
    model: config_lib.ModelConfig, b: int, t: int
) -> tuple[list[family_lib.Activation], list[family_lib.Activation]]:
  """(tensors one layer keeps for its backward pass, the transient buffers of each of its calls),
  global shapes for a micro-batch of b sequences of t tokens."""
  family = families.of(model)
  c = family_lib.itemsize(model)
  retrievals = [
      _retrieval_tensors(b, t, model.num_heads, band) for band in family.bands(model).values()
  ]
  saved = [s for s, _ in retrievals]
  temporaries = [temporary for _, temporary in retrievals]
  # Each block: its input and first norm's output, then the second norm's input and output.
  saved.append(family_lib.Activation(_RESIDUAL, (b, t, model.width), c, 4))
  saved += family.layer_activations(model, b, t)
  temporaries += family.layer_temporaries(model, b, t)
  return saved, temporaries


def _layer_outputs(
    model: config_lib.ModelConfig, params: Any, b: int, t: int
) -> tuple[list[family_lib.Activation], list[family_lib.Activation]]:
  """(what "save_retrieval", what "save_dots" keeps of one layer), from the boxed parameter shapes
  of the first layer: every band's output and residuals, and each v1 persistent memory's float32
  output; the output of each projection kernel (Dense [in, out], convolution [taps, in, out])."""
  bands = families.of(model).bands(model).values()
  c = family_lib.itemsize(model)
  retrieval = [family_lib.Activation.heads(model, b, t, c, len(bands))]
  retrieval += [_retrieval_tensors(b, t, model.num_heads, band)[0] for band in bands]
  projections = []
  leaves = jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  for path, leaf in leaves:
    keys = [p.key for p in path]
    if keys[0] not in ("h_0", "layer_0"):
      continue
    if keys[-1] == "kernel":
      out = (leaf.names[-1], leaf.value.shape[-1])
      projections.append(family_lib.Activation(("batch", "length", out[0]), (b, t, out[1]), c))
    elif keys[-1] == "P_v":  # Read by `kernels_pallas.retrieve_persistent`, which names its output.
      retrieval.append(family_lib.Activation.heads(model, b, t, _F32, 1))
  return retrieval, projections


def _activations(
    model: config_lib.ModelConfig,
    params: Any,
    b: int,
    t: int,
    mesh: jax.sharding.AbstractMesh,
    rules: config_lib.AxisRules,
    loss_chunk: int,
) -> tuple[tuple[str, int], ...]:
  """(term, per-device bytes) of the activation estimate (module docstring) for a global
  micro-batch of b sequences of t tokens, the loss `loss_chunk` positions at a time (0: all);
  `params` the boxed parameter shapes."""
  size = lambda tensors, what: sum(_shard_bytes(x, mesh, rules, what) for x in tensors)
  c = jnp.dtype(model.dtype).itemsize
  saved, temporaries = _layer_tensors(model, b, t)
  layer = size(saved, "an activation")
  layers = model.num_layers
  residual = family_lib.Activation(_RESIDUAL, (b, t, model.width), c)
  policy = model.effective_remat_policy
  if policy != "none":
    block_input = _shard_bytes(residual, mesh, rules, "the residual stream")
    terms = [(f"block inputs, {layers} layers (remat)", layers * block_input)]
    retrieval, projections = _layer_outputs(model, params, b, t)
    kept = 0  # Of one layer, by the policy.
    if policy in ("save_retrieval", "save_dots_and_retrieval"):
      kept += size(retrieval, "a retrieval output")
      terms.append((f"retrieval outputs, {layers} layers (saved)", layers * kept))
    if policy in ("save_dots", "save_dots_and_retrieval"):
      dots = size(projections, "a projection's output")
      terms.append((f"projection outputs, {layers} layers (saved)", layers * dots))
      kept += dots
    if kept:
      terms.append(("one layer's other tensors, recomputed", max(layer - kept, 0)))
    else:
      terms.append(("one layer's saved tensors, recomputed", layer))
  else:
    terms = [(f"saved tensors, {layers} layers", layers * layer)]
  chunk = min(loss_chunk, t) if loss_chunk else t
  logits = family_lib.Activation(_LOGITS, (b, chunk, model.vocab_size), c + 2 * _F32)
  terms += [
      # One call runs at a time: the largest one's buffers.
      (
          "retrieval temporaries (largest call)",
          max(_shard_bytes(x, mesh, rules, "a retrieval temporary") for x in temporaries),
      ),
      (
          "final norm, logits, loss gradient",
          size([dataclasses.replace(residual, count=2), logits], "the logits"),
      ),
  ]
  return tuple(terms)


def plan(
    experiment: config_lib.Experiment,
    mesh_sizes: Mapping[str, int],
    batch: int | None = None,
    context: int | None = None,
) -> Plan:
  """Per-device memory of training `experiment` on a mesh of `mesh_sizes`.

  Args:
    experiment: the experiment; its optimizer, remat policy, grad_accum and mesh.rules apply.
    mesh_sizes: sizes of MESH_SIZES (missing ones are 1), e.g. {"dcn_data": 2, "fsdp": 128}.
    batch: the global batch size (default: train.batch_size).
    context: the sequence length (default: data.seq_len).

  Raises:
    config_lib.ConfigError: an unknown mesh axis, a size < 1, or a batch or context that does not
      fit the experiment; `sharding.ShardingError` (a ConfigError) where a parameter, the
      micro-batch or the heads do not divide by their mesh axes.
  """
  experiment = overrides.resize(experiment, batch, context)
  model, train = experiment.model, experiment.train
  t = experiment.data.seq_len
  max_length = families.of(model).max_length(model)
  if max_length is not None and t > max_length:
    raise config_lib.ConfigError(f"context {t} exceeds the model's block_size {max_length}")
  cfg = _mesh_config(mesh_sizes, experiment.mesh.rules)
  axis_sizes = {
      "data": cfg.data * cfg.dcn_data,
      "fsdp": cfg.fsdp * cfg.dcn_fsdp,
      "tensor": cfg.tensor,
  }
  mesh = jax.sharding.AbstractMesh(tuple(axis_sizes.values()), tuple(axis_sizes))
  rules = cfg.rules

  state = step.boxed_state_shapes(
      experiment, families.build_model(model), optim.make_optimizer(train)
  )
  sharding.check_divisible(state["params"], axis_sizes, rules)
  micro_batch = train.batch_size // train.grad_accum
  sharding.check_activations(model, micro_batch, axis_sizes, rules)
  batch_axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes or ()
  device_batch = micro_batch // math.prod(axis_sizes[a] for a in batch_axes)

  param_bytes = _tree_bytes(state["params"], mesh, rules)
  params = sum(np.prod(x.shape, dtype=int) for x in jax.tree.leaves(nn.meta.unbox(state["params"])))
  return Plan(
      experiment=experiment.name,
      mesh={name: getattr(cfg, name) for name in MESH_SIZES},
      axis_sizes=axis_sizes,
      global_batch=train.batch_size,
      grad_accum=train.grad_accum,
      device_batch=device_batch,
      context=t,
      remat_policy=model.effective_remat_policy,
      loss_chunk=train.loss_chunk,
      params=int(params),
      param_bytes=param_bytes,
      optimizer_bytes=_tree_bytes(state["opt_state"], mesh, rules),
      gradient_bytes=param_bytes * (2 if train.grad_accum > 1 else 1),
      activations=_activations(
          model, state["params"], micro_batch, t, mesh, rules, train.loss_chunk
      ),
  )


def human_bytes(n: int) -> str:
  """n in the largest unit of GiB, MiB and KiB that it reaches, right-aligned."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:9.2f} {unit}"
  return f"{n:9d} B  "


def _remat(policy: str) -> str:
  return "remat off" if policy == "none" else f"remat on ({policy})"


def format_plan(p: Plan) -> str:
  """The plan as a table of per-device bytes."""
  mesh = ", ".join(f"{k}={v}" for k, v in p.mesh.items() if v != 1 or k in config_lib.MESH_AXES)
  rows = [
      ("parameters (float32)", p.param_bytes),
      ("optimizer state (AdamW)", p.optimizer_bytes),
      ("gradients" + (" and accumulator" if p.grad_accum > 1 else ""), p.gradient_bytes),
      ("activations (estimate)", p.activation_bytes),
      *((f"  {name}", n) for name, n in p.activations),
      ("total", p.total_bytes),
  ]
  width = max(len(name) for name, _ in rows)
  lines = [
      f"memory per device: {p.experiment} on {p.devices} devices ({mesh})",
      f"  global batch {p.global_batch} x context {p.context}; micro-batches of {p.device_batch}"
      f" sequences per device (grad_accum {p.grad_accum}), {_remat(p.remat_policy)}",
      f"  loss {f'in chunks of {p.loss_chunk} tokens' if p.loss_chunk else 'unchunked'}"
      " (train.loss_chunk)",
      f"  {p.params:,} parameters",
  ]
  lines += [f"  {name:<{width}} {human_bytes(n)}" for name, n in rows]
  return "\n".join(lines)
