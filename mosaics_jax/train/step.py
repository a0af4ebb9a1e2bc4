"""The train step as a pure function, its jitted and sharded forms, and the train state.

    step = train_step_fn(experiment, model, tx)          # pure: (state, batch) -> (state, stats)
    jitted = make_train_step(experiment, model, tx)      # what mosaics-train runs

The state is a dict: step, params, opt_state, and rng (raw key data, so Orbax saves it as-is). At
step n the dropout masks and the model's per-step arguments (v2's long-term delay m,
`Family.step_kwargs`) derive from `fold_in(rng, n)`, so a resumed run continues bit for bit.
`mosaics_jax.analysis` compiles and times this same step (AOT compilation, benchmarks).

On more than one device a `Placement` holds the mesh and the shardings of the state and batches:
parameters and optimizer state are created sharded as their logical axes and the mesh rules say
(`mosaics_jax.sharding`), batches are sharded over their batch axis, and each step is one jit with
those shardings. One device runs exactly as without a mesh.

With `train.loss_chunk`, the loss takes the model's final hidden states and computes the logits,
cross-entropy and accuracy a chunk of positions at a time, recomputing each chunk's logits in the
backward pass: the [b, t, v] logits never exist (`_chunked_sums`).

Axis legend: b = batch, t = time, a = gradient-accumulation micro-batches, m = model width,
v = vocabulary, n = loss chunks, c = positions per loss chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from mosaics_jax import config as config_lib, sharding
from mosaics_jax.model import families
from mosaics_jax.train import optim

# The train step's statistic that says whether the updated parameters are all finite.
FINITE = "params_finite"
Batch = dict[str, np.ndarray | jax.Array]  # Host arrays, or global arrays inside the step.
State = dict[str, Any]  # step, params, opt_state, rng (raw key data, so Orbax saves it as-is).


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a multi-device run keeps its arrays."""

  mesh: jax.sharding.Mesh
  rules: config_lib.AxisRules
  state: Any  # A NamedSharding per leaf of the train state.
  batch: jax.sharding.NamedSharding  # Of every [b t] batch array.

  @contextlib.contextmanager
  def context(self):
    """The mesh and the logical axis rules, for tracing the models' sharding constraints."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def jit(self, fn, in_shardings, out_shardings, **kwargs) -> Callable:
    """`fn` jitted with these shardings, traced and run in `context`, host batches sharded."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, **kwargs)

    def run(first, batch: Batch):
      with self.context():
        return jitted(first, sharding.put_batch(batch, self.batch))

    return run


def make_placement(experiment: config_lib.Experiment, model, tx, devices=None) -> Placement | None:
  """The placement of `experiment` on the mesh of `devices` (default: all); None on one device.

  Raises `sharding.ShardingError` if the mesh does not fit the devices, or the parameters, batch
  or heads do not divide by their mesh axes.
  """
  mesh = sharding.make_mesh(experiment.mesh, devices)
  if mesh.size == 1:
    return None
  rules = experiment.mesh.rules
  boxed = boxed_state_shapes(experiment, model, tx)
  sharding.check_divisible(boxed["params"], mesh.shape, rules)
  cfg = experiment.train
  sharding.check_activations(experiment.model, cfg.batch_size // cfg.grad_accum, mesh.shape, rules)
  return Placement(
      mesh=mesh,
      rules=rules,
      state=sharding.logical_shardings(boxed, mesh, rules),
      batch=sharding.batch_sharding(mesh, rules),
  )


def _loss(
    params, model, batch: Batch, kwargs, dropout_key, loss_chunk: int
) -> tuple[jax.Array, dict]:
  """(the cross-entropy summed over the batch's `loss_mask`, the batch's sums: `loss_sum`,
  `weight` (the targets `loss_mask` counts), `correct` and `answers`); with a `loss_chunk` (0:
  none), from the logits of that many positions at a time (`_chunked_sums`)."""
  deterministic = dropout_key is None
  apply = functools.partial(
      model.apply,
      {"params": params},
      batch["tokens"],
      batch["segment_ids"],
      deterministic=deterministic,
      rngs=None if deterministic else {"dropout": dropout_key},
      **kwargs,
  )
  labels = batch["targets"], batch["loss_mask"], batch["answer_mask"]
  if loss_chunk:
    stats = _chunked_sums(params, model.config, apply(hidden_only=True), labels, loss_chunk)
  else:
    stats = _sums(apply(), *labels)
  return stats["loss_sum"], stats


def _sums(
    logits: Float[Array, "b t v"],
    targets: Int[Array, "b t"],
    loss_mask: Float[Array, "b t"],
    answer_mask: Float[Array, "b t"],
) -> dict[str, jax.Array]:
  """The loss and accuracy sums (`_loss`) of these logits."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets) * answer_mask
  return {
      "loss_sum": jnp.sum(ce * loss_mask),
      "weight": jnp.sum(loss_mask),
      "correct": jnp.sum(correct),
      "answers": jnp.sum(answer_mask),
  }


def _chunked_sums(
    params,
    config: config_lib.ModelConfig,
    hidden: Float[Array, "b t m"],
    labels: tuple[Int[Array, "b t"], Float[Array, "b t"], Float[Array, "b t"]],
    loss_chunk: int,
) -> dict[str, jax.Array]:
  """`_sums` of the logits of the final hidden states and the labels (targets, loss_mask,
  answer_mask), `loss_chunk` positions at a time.

  A scan over the chunks: each computes its logits [b, c, v] from its hidden states (the family's
  `output_logits`) and adds its sums, under `jax.checkpoint`, so the backward recomputes a chunk's
  logits rather than keeping them: no [b, t, v] array exists, forward or backward. A last chunk
  that the sequence does not fill is padded with masked targets (they add nothing). A loss_chunk
  of t or more is one chunk: the unchunked sums, up to the order of summation.
  """
  family = families.of(config)
  b, t = hidden.shape[:2]
  chunk = min(loss_chunk, t)
  n = -(-t // chunk)

  def split(x):  # [b t ...] -> [n b c ...], zero-padded to n * c positions.
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  hidden = nn.with_logical_constraint(split(hidden), (None, "batch", "length", "embed"))
  chunks = (hidden, *map(split, labels))

  @functools.partial(jax.checkpoint, prevent_cse=False)  # No CSE to prevent inside a scan.
  def chunk_sums(params, chunk):
    x, *chunk_labels = chunk
    return _sums(family.output_logits(config, params, x), *chunk_labels)

  def add(totals, chunk):
    return jax.tree.map(jnp.add, totals, chunk_sums(params, chunk)), None

  first = jax.tree.map(lambda x: x[0], chunks)
  zeros = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(chunk_sums, params, first)
  )
  return jax.lax.scan(add, zeros, chunks)[0]


def train_step_fn(
    experiment: config_lib.Experiment, model, tx: optax.GradientTransformation
) -> Callable[[State, Batch], tuple[State, dict]]:
  """One optimizer step over a global batch, as a pure function (not jitted).

  The step minimises the mean cross-entropy over every target of the global batch that
  `loss_mask` counts (0 for a batch that counts none), and reports it as `loss`. Each of the
  `train.grad_accum` micro-batches gives the gradient of its summed cross-entropy; their sum is
  divided once by the global batch's count, so micro-batches and devices that count different
  numbers of targets weigh as many targets as they hold: the objective, and so the run, do not
  depend on `grad_accum` or on the mesh.
  """
  cfg = experiment.train
  schedule = optim.learning_rate(cfg)
  grad_fn = jax.value_and_grad(_loss, has_aux=True)

  def step(state: State, batch: Batch) -> tuple[State, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    dropout_key, delay_key = jax.random.split(key)
    kwargs = families.of(experiment.model).step_kwargs(experiment.model, delay_key)
    dropout_key = dropout_key if experiment.model.dropout > 0 else None
    # [b t] -> [a b/a t]: the micro-batches' gradients and loss sums add up.
    micro = jax.tree.map(
        lambda x: nn.with_logical_constraint(
            x.reshape(cfg.grad_accum, -1, *x.shape[1:]), (None, "batch", "length")
        ),
        batch,
    )

    def accumulate(totals, micro_batch):
      (_, stats), g = grad_fn(
          state["params"], model, micro_batch, kwargs, dropout_key, cfg.loss_chunk
      )
      return jax.tree.map(jnp.add, totals, (g, stats["loss_sum"], stats["weight"])), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"]), jnp.float32(0), jnp.float32(0)
    (grads, loss_sum, weight), _ = jax.lax.scan(accumulate, zeros, micro)
    count = jnp.maximum(weight, 1.0)  # A batch that counts no target has loss and gradient 0.
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {
        "step": state["step"] + 1,
        "params": params,
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    return new_state, {
        "loss": loss_sum / count,
        "grad_norm": optax.tree_utils.tree_norm(grads),
        "lr": schedule(state["step"]),
        # Whether this update left every parameter finite: the loop never saves a state that
        # is not (a finite loss does not imply it).
        FINITE: jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])),
    }

  return step


def train_step_shardings(placement: Placement) -> tuple[Any, Any]:
  """(in_shardings, out_shardings) of the train step: (state, batch) -> (state, stats)."""
  return (placement.state, placement.batch), (placement.state, sharding.replicated(placement.mesh))


def make_train_step(
    experiment: config_lib.Experiment,
    model,
    tx: optax.GradientTransformation,
    placement: Placement | None = None,
) -> Callable[[State, Batch], tuple[State, dict]]:
  """The jitted train step; it donates the state it is given."""
  step = train_step_fn(experiment, model, tx)
  if placement is None:
    return jax.jit(step, donate_argnums=0)
  in_shardings, out_shardings = train_step_shardings(placement)
  return placement.jit(step, in_shardings, out_shardings, donate_argnums=0)


def make_eval_step(
    experiment: config_lib.Experiment, model, placement: Placement | None = None
) -> Callable[[Any, Batch], dict]:
  """The jitted evaluation step: (params, batch) -> the loss and accuracy sums of the batch."""
  kwargs = families.of(experiment.model).step_kwargs(experiment.model, None)
  loss_chunk = experiment.train.loss_chunk
  fn = lambda params, batch: _loss(params, model, batch, kwargs, None, loss_chunk)[1]
  if placement is None:
    return jax.jit(fn)
  return placement.jit(
      fn,
      in_shardings=(placement.state["params"], placement.batch),
      out_shardings=sharding.replicated(placement.mesh),
  )


def _boxed_init(experiment: config_lib.Experiment, model, tx) -> Callable[[], State]:
  """The initial state, its params and optimizer moments boxed with their logical axis names."""
  key = jax.random.key(experiment.train.seed)
  param_key, run_key = jax.random.split(key)
  tokens = jnp.zeros((1, experiment.data.seq_len), jnp.int32)

  def init():
    params = model.init_boxed(param_key, tokens)["params"]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(run_key),
    }

  return init


def boxed_state_shapes(experiment: config_lib.Experiment, model, tx) -> State:
  """The initial state as `jax.ShapeDtypeStruct`s, its params and optimizer moments boxed with
  their logical axis names (`nn.LogicallyPartitioned`); nothing is allocated."""
  return jax.eval_shape(_boxed_init(experiment, model, tx))


def init_state(
    experiment: config_lib.Experiment, model, tx, placement: Placement | None = None
) -> State:
  """The initial train state; with a placement, created sharded (never whole on one device)."""
  init = _boxed_init(experiment, model, tx)
  out_shardings = None if placement is None else placement.state
  return jax.jit(lambda: nn.meta.unbox(init()), out_shardings=out_shardings)()


def abstract_state(
    experiment: config_lib.Experiment, model, tx, placement: Placement | None = None
) -> State:
  """The train state as `jax.ShapeDtypeStruct`s with their shardings, initialising nothing."""
  shapes = nn.meta.unbox(boxed_state_shapes(experiment, model, tx))
  if placement is None:
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one_device, shapes)
  else:
    shardings = placement.state
  return jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      shapes,
      shardings,
  )
