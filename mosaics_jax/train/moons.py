"""Trains a context memory on the three moons (`config.MoonsExperiment`): the v1 paper's recipe
(the official `train_planets-*.py`), resumable.

AdamW (b1, b2, no weight decay), the learning rate linear from `learning_rate` to
`final_learning_rate` over the steps, the loss the mean of clip(prediction - target, -clip,
clip) ** 2 over every position and feature. Batches are drawn from a generator seeded with
(seed, step), so a resumed run sees the batches it would have seen. The workdir holds config.json
(the experiment; a workdir of another model is refused), metrics.jsonl (`loss` and `lr` every
`log_every` steps) and checkpoints of the parameters, the optimizer state and the step every
`checkpoint_every` steps and at the end; a finished run is not trained again.

Axis legend: b = batch, t = time, f = features.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from mosaics_jax import checkpoints, config as config_lib, moons
from mosaics_jax.model import context_memory
from mosaics_jax.train import metrics


def dataset(experiment: config_lib.MoonsExperiment, split: str) -> moons.Moons:
  """The experiment's sequences of `split` ("train" or "heldout")."""
  return moons.Moons(
      block_size=experiment.data.seq_len,
      min_periods_in_block_size=experiment.data.min_periods_in_block_size,
      observer=experiment.data.observer,
      split=split,
  )


def clipped_loss(
    prediction: Float[Array, "b t f"], target: Float[Array, "b t f"], clip: float
) -> Float[Array, ""]:
  """The mean of clip(prediction - target, -clip, clip) ** 2 (the official loss)."""
  return jnp.mean(jnp.clip(prediction - target, -clip, clip) ** 2)


def schedule(experiment: config_lib.MoonsExperiment) -> optax.Schedule:
  t = experiment.train
  return optax.linear_schedule(t.learning_rate, t.final_learning_rate, t.steps)


def optimizer(experiment: config_lib.MoonsExperiment) -> optax.GradientTransformation:
  t = experiment.train
  return optax.adamw(schedule(experiment), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)


def init_state(experiment: config_lib.MoonsExperiment) -> dict:
  """{"params", "opt_state"} at step 0, from the experiment's seed."""
  model = context_memory.ContextMemory(experiment.model)
  x = jnp.zeros((1, 2, experiment.model.input_dim), jnp.float32)
  params = model.init(jax.random.key(experiment.train.seed), x)["params"]
  return {"params": params, "opt_state": optimizer(experiment).init(params)}


def train_step(
    experiment: config_lib.MoonsExperiment,
    state: dict,
    x: Float[Array, "b t f"],
    y: Float[Array, "b t f"],
) -> tuple[dict, Float[Array, ""]]:
  """One optimizer step: (new state, loss before it). Pure; jit it with `experiment` static."""
  model = context_memory.ContextMemory(experiment.model)

  def loss_fn(params):
    return clipped_loss(model.apply({"params": params}, x)[0], y, experiment.train.clip)

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = optimizer(experiment).update(grads, state["opt_state"], state["params"])
  return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss


def batch_rng(experiment: config_lib.MoonsExperiment, step: int) -> np.random.Generator:
  return np.random.default_rng([experiment.train.seed, step])


def train(experiment: config_lib.MoonsExperiment, workdir: str | os.PathLike) -> dict:
  """Trains (or resumes) `experiment` in `workdir` to its last step; the final state."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  manager = checkpoints.Checkpoints(workdir / checkpoints.CHECKPOINTS_DIR, keep=2)
  checkpoints.check_or_save_config(workdir, experiment, has_checkpoints=bool(manager.steps()))
  state = init_state(experiment)
  restored = manager.restore_latest(state)
  start = 0 if restored is None else restored[0]
  if restored is not None:
    state = restored[1]
  data = dataset(experiment, "train")
  step_fn = jax.jit(lambda s, x, y: train_step(experiment, s, x, y))
  learning_rate = schedule(experiment)
  with metrics.MetricsWriter(
      workdir, resume_step=None if restored is None else start, tensorboard=False
  ) as writer:
    for step in range(start, experiment.train.steps):
      x, y = data.batch(batch_rng(experiment, step), experiment.train.batch_size)
      state, loss = step_fn(state, x, y)
      done = step + 1
      if done % experiment.train.log_every == 0 or done == experiment.train.steps:
        writer.write(done, {"loss": float(loss), "lr": float(learning_rate(step))})
      if done % experiment.train.checkpoint_every == 0 or done == experiment.train.steps:
        manager.save(done, state, {"step": done})
  manager.wait()
  manager.close()
  return state
