"""Small, fast training runs shared by the training tests: a 1-layer v2 on the synthetic induction
task, in process (`tiny`) or as a `mosaics-train` command (`cli`)."""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mosaics_jax import checkpoints, config as config_lib, overrides, registry
from mosaics_jax.model import families
from mosaics_jax.train import optim, step as step_lib

# A small, fast run: 1-layer v2 on the synthetic induction task.
TINY_SETS = [
    "model.num_layers=1",
    "model.width=32",
    "model.num_heads=2",
    "model.ffn_width=64",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.log_every=2",
    "train.eval_every=1000",
    "train.eval_batches=1",
]


def tiny(steps: int, **sets) -> config_lib.Experiment:
  """The tiny run of `steps` steps; `sets` override fields, "__" standing for "."."""
  exp = overrides.override(
      registry.get("mm2-tiny"),
      "data",
      config_lib.DataConfig(source="synthetic_induction", seq_len=32, task_vocab=32),
  )
  exp = overrides.apply(exp, TINY_SETS + [f"train.steps={steps}"])
  for key, value in sets.items():
    exp = overrides.override(exp, key.replace("__", "."), value)
  return exp


@functools.cache  # Shared by the tests of one worker: params are immutable arrays.
def params_near_init(cfg: config_lib.ModelConfig, seed: int = 0):
  """(model, params) of `cfg`: every parameter drawn at random around its init, so that no scalar
  sits at a special value (a zero gate, a unit scale)."""
  model = families.build_model(cfg)

  @jax.jit  # One compiled init: an eager one takes seconds.
  def draw():
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

  return model, draw()


def final_params(workdir: pathlib.Path, experiment) -> tuple[int, dict]:
  """(step, params as numpy) of the newest checkpoint."""
  model = families.build_model(experiment.model)
  tx = optim.make_optimizer(experiment.train)
  template = step_lib.init_state(experiment, model, tx)
  ckpts = checkpoints.Checkpoints(workdir / "checkpoints", 3)
  step, state, _ = ckpts.restore_latest(template)
  ckpts.close()
  return step, jax.tree.map(np.asarray, state["params"])


def cli(workdir, *sets, experiment="mm2-tiny"):
  """The argv of `mosaics-train` on `workdir` with `--set` `sets`, run as a subprocess."""
  base = [
      sys.executable,
      "-m",
      "mosaics_jax.cli.train",
      "--experiment",
      experiment,
      "--workdir",
      str(workdir),
      "--no-progress",
      "--set",
  ]
  return base + list(sets)


def cli_sets(*assignments: str) -> list[str]:
  """CLI_SETS with `assignments` replacing or adding their keys (a key may be set once)."""
  keys = {a.partition("=")[0] for a in assignments}
  return [a for a in CLI_SETS if a.partition("=")[0] not in keys] + list(assignments)


CLI_SETS = TINY_SETS + [
    "data.source=synthetic_induction",
    "data.task_vocab=32",
    "data.tokenizer=none",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=2",
]
