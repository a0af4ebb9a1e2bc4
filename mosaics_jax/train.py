"""The training loop: jitted steps, evaluation, metrics, and checkpoints with exact resume.

Everything random derives from `train.seed`: the parameters, the data order (Grain), and, at step
n, the dropout masks and the v2 long-term delay m from `fold_in(key, n)`. A run restarted from a
checkpoint therefore continues bit for bit as if it had never stopped.

On more than one device the run lives on the mesh of `experiment.mesh`: parameters and optimizer
state are created sharded as their logical axes and the mesh rules say (`mosaics_jax.sharding`),
batches are sharded over their batch axis, and each step is one jit with those shardings. One
device runs exactly as without a mesh. In a multi-process run (`mosaics_jax.distributed`) the mesh
spans every process's devices: each process reads its rows of every global batch, all of them save
and restore the checkpoints together, and process 0 alone writes metrics, progress and the plot.

Axis legend: b = batch, t = time, v = vocabulary, a = gradient-accumulation micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from mosaics_jax import checkpoints, config as config_lib, data, metrics, models, optim, sharding

Batch = dict[str, np.ndarray]
State = dict[str, Any]  # step, params, opt_state, rng (raw key data, so Orbax saves it as-is).


class TrainingError(RuntimeError):
  """A run that cannot start or cannot go on; the message says why and what was kept."""


@dataclasses.dataclass(frozen=True)
class RunResult:
  step: int
  workdir: pathlib.Path
  val: dict[str, float] | None  # The last evaluation.
  plot: pathlib.Path | None


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


def make_placement(
    experiment: config_lib.Experiment, model, tx, devices=None
) -> Placement | None:
  """The placement of `experiment` on the mesh of `devices` (default: all); None on one device.

  Raises `sharding.ShardingError` if the mesh does not fit the devices, or the parameters, batch
  or heads do not divide by their mesh axes.
  """
  mesh = sharding.make_mesh(experiment.mesh, devices)
  if mesh.size == 1:
    return None
  rules = experiment.mesh.rules
  boxed = jax.eval_shape(_boxed_init(experiment, model, tx))
  sharding.check_divisible(boxed["params"], mesh.shape, rules)
  cfg = experiment.train
  sharding.check_activations(experiment.model, cfg.batch_size // cfg.grad_accum, mesh.shape, rules)
  return Placement(
      mesh=mesh,
      rules=rules,
      state=sharding.logical_shardings(boxed, mesh, rules),
      batch=sharding.batch_sharding(mesh, rules),
  )


def _model_kwargs(cfg: config_lib.ModelConfig, key: jax.Array | None) -> dict[str, Any]:
  """Per-step model arguments: v2 samples the long-term delay m uniformly in its range."""
  if not isinstance(cfg, config_lib.MosaicV2Config) or not cfg.long_term_memory:
    return {}
  if key is None:  # Evaluation: the inference delay.
    return {"ltm_delay": cfg.long_term_delay}
  low, high = cfg.long_term_delay_range
  return {"ltm_delay": jax.random.randint(key, (), low, high + 1)}


def _loss(params, model, batch: Batch, kwargs, dropout_key) -> tuple[jax.Array, dict]:
  deterministic = dropout_key is None
  logits = model.apply(
      {"params": params},
      batch["tokens"],
      batch["segment_ids"],
      deterministic=deterministic,
      rngs=None if deterministic else {"dropout": dropout_key},
      **kwargs,
  )
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["loss_mask"]
  loss_sum, weight = jnp.sum(ce * mask), jnp.sum(mask)
  correct = (jnp.argmax(logits, -1) == batch["targets"]) * batch["answer_mask"]
  stats = {
      "loss_sum": loss_sum,
      "weight": weight,
      "correct": jnp.sum(correct),
      "answers": jnp.sum(batch["answer_mask"]),
  }
  return loss_sum / jnp.maximum(weight, 1.0), stats


def train_step_fn(
    experiment: config_lib.Experiment, model, tx: optax.GradientTransformation
) -> Callable[[State, Batch], tuple[State, dict]]:
  """One optimizer step over a global batch, as a pure function (not jitted)."""
  cfg = experiment.train
  schedule = optim.learning_rate(cfg)
  grad_fn = jax.value_and_grad(_loss, has_aux=True)

  def step(state: State, batch: Batch) -> tuple[State, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    dropout_key, delay_key = jax.random.split(key)
    kwargs = _model_kwargs(experiment.model, delay_key)
    dropout_key = dropout_key if experiment.model.dropout > 0 else None
    # [b t] -> [a b/a t]: the gradient is the mean over micro-batches.
    micro = jax.tree.map(
        lambda x: nn.with_logical_constraint(
            x.reshape(cfg.grad_accum, -1, *x.shape[1:]), (None, "batch", "length")
        ),
        batch,
    )

    def accumulate(grads, micro_batch):
      (loss, _), g = grad_fn(state["params"], model, micro_batch, kwargs, dropout_key)
      return jax.tree.map(jnp.add, grads, g), loss

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    grads, losses = jax.lax.scan(accumulate, zeros, micro)
    grads = jax.tree.map(lambda g: g / cfg.grad_accum, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(state["params"], updates),
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    return new_state, {
        "loss": jnp.mean(losses),
        "grad_norm": optax.tree_utils.tree_norm(grads),
        "lr": schedule(state["step"]),
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
  kwargs = _model_kwargs(experiment.model, None)
  fn = lambda params, batch: _loss(params, model, batch, kwargs, None)[1]
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
  shapes = jax.eval_shape(lambda: nn.meta.unbox(_boxed_init(experiment, model, tx)()))
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


def evaluate(experiment, eval_step, params) -> dict[str, float]:
  """Mean loss over `eval_batches` validation batches, and answer accuracy on synthetic tasks."""
  cfg = experiment.train
  it = data.make_iterator(
      experiment.data,
      split="val",
      batch_size=cfg.batch_size,
      seed=cfg.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      repeat=True,
  )
  totals = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0, "answers": 0.0}
  for _, batch in zip(range(cfg.eval_batches), it):
    for name, value in jax.device_get(eval_step(params, batch)).items():
      totals[name] += float(value)
  out = {"loss": totals["loss_sum"] / max(totals["weight"], 1.0)}
  if totals["answers"]:
    out["accuracy"] = totals["correct"] / totals["answers"]
  return out


def _prepare_workdir(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-probe-{jax.process_index()}"  # Processes may share the workdir.
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise TrainingError(f"cannot write to workdir {workdir}: {e.strerror or e}") from None


def _check_vocab(experiment: config_lib.Experiment) -> None:
  needed = data.vocab_size(experiment.data)
  if needed > experiment.model.vocab_size:
    raise TrainingError(
        f"the data has {needed} token ids but model.vocab_size is"
        f" {experiment.model.vocab_size}; set --set model.vocab_size={needed} (or larger)"
    )


def train(
    experiment: config_lib.Experiment, workdir: str | os.PathLike, *, progress: bool = True
) -> RunResult:
  """Trains `experiment` in `workdir`, resuming from its newest readable checkpoint."""
  workdir = pathlib.Path(workdir).absolute()  # Orbax wants absolute paths.
  cfg = experiment.train
  _prepare_workdir(workdir)
  _check_vocab(experiment)
  try:
    checkpoints.check_or_save_config(workdir, experiment)
  except checkpoints.CheckpointError as e:
    raise TrainingError(str(e)) from None

  model = models.build_model(experiment.model)
  tx = optim.make_optimizer(cfg)
  placement = make_placement(experiment, model, tx)
  train_step = make_train_step(experiment, model, tx, placement)
  eval_step = make_eval_step(experiment, model, placement)
  lead = jax.process_index() == 0

  train_it = data.make_iterator(
      experiment.data,
      split="train",
      batch_size=cfg.batch_size,
      seed=cfg.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  ckpts = checkpoints.Checkpoints(workdir / "checkpoints", cfg.keep_checkpoints)
  restored = ckpts.restore_latest(abstract_state(experiment, model, tx, placement))
  last_saved = None
  if restored is None:
    state = init_state(experiment, model, tx, placement)
  else:
    last_saved, state, data_state = restored
    train_it.set_state(data_state)
  start = int(state["step"])

  writer = metrics.MetricsWriter(workdir, resume_step=start) if lead else None
  bar = tqdm.tqdm(
      total=cfg.steps, initial=start, disable=not (progress and lead), unit="step", smoothing=0.1
  )
  tokens_per_step = cfg.batch_size * experiment.data.seq_len
  pending: list[tuple[int, dict]] = []  # Step stats not yet checked on the host.
  val = None
  clock, clock_step = time.perf_counter(), start

  def flush() -> dict | None:
    """Moves pending stats to the host; stops the run on a NaN or Inf loss."""
    nonlocal clock, clock_step
    if not pending:
      return None
    host = jax.device_get(pending)
    pending.clear()
    for step, stats in host:
      if not math.isfinite(float(stats["loss"])):
        ckpts.wait()
        kept = f"step {last_saved} in {ckpts.directory}" if last_saved else "none was saved"
        raise TrainingError(
            f"the loss is {float(stats['loss'])} at step {step}: stopped. The last good"
            f" checkpoint is {kept}; lower train.learning_rate or check the data."
        )
    now = time.perf_counter()
    step, stats = host[-1]
    record = {k: float(v) for k, v in stats.items()}
    record["tokens_per_sec"] = tokens_per_step * (step - clock_step) / max(now - clock, 1e-9)
    clock, clock_step = now, step
    return {"step": step, **record}

  try:
    for step in range(start + 1, cfg.steps + 1):
      state, stats = train_step(state, next(train_it))
      pending.append((step, stats))
      bar.update(1)
      if step % cfg.log_every == 0 or step == cfg.steps:
        record = flush()
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
        if writer:
          writer.write(record["step"], record)
      if step % cfg.eval_every == 0 or step == cfg.steps:
        flush()
        val = evaluate(experiment, eval_step, state["params"])
        if writer:
          writer.write(step, {"step": step, "split": "val", **val})
      if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        flush()  # Never save a diverged state.
        ckpts.save(step, state, train_it.get_state())
        last_saved = step
  finally:
    bar.close()
    ckpts.wait()
    ckpts.close()
    if writer:
      writer.close()

  if val is None:  # The run was already complete: report where it stands.
    val = evaluate(experiment, eval_step, state["params"])
  plot = None
  if lead:
    plot = _plot(workdir)
  return RunResult(step=int(state["step"]), workdir=workdir, val=val, plot=plot)


def _plot(workdir: pathlib.Path) -> pathlib.Path | None:
  try:
    from mosaics_jax import plots  # matplotlib is the optional `plots` extra.
  except ImportError:
    return None
  path = workdir / "loss.png"
  plots.plot_runs([workdir], path)
  return path
