"""The optimizer: schedule, weight-decay mask, gradient accumulation, the long-term delay draw."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaics_jax import config as config_lib, overrides, registry
from mosaics_jax.model import families
from mosaics_jax.train import optim, step as step_lib


def test_schedule_warms_up_then_decays_to_a_hundredth():
  cfg = registry.get("mm2-large").train
  lr = optim.learning_rate(cfg)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(1000)), cfg.learning_rate / 2, rtol=1e-6)
  np.testing.assert_allclose(float(lr(2000)), cfg.learning_rate, rtol=1e-6)
  middle = 2000 + (cfg.steps - 2000) // 2
  np.testing.assert_allclose(float(lr(middle)), cfg.learning_rate * (1 + 0.01) / 2, rtol=1e-4)
  np.testing.assert_allclose(float(lr(cfg.steps)), cfg.learning_rate / 100, rtol=1e-6)


def test_weight_decay_spares_norms_scalars_and_bandwidths():
  cfg = registry.get("mm2-tiny").model
  params = jax.eval_shape(
      lambda: families.build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  )["params"]
  mask = optim.weight_decay_mask(params)
  layer = mask["layer_0"]
  assert layer["short_term"]["key"]["W_phi"]["kernel"] and mask["classifier"]["kernel"]
  assert mask["embed"]["embedding"] and layer["ffn"]["w2"]["kernel"]
  assert not layer["norm1"]["scale"] and not mask["final_norm"]["scale"]
  assert not any(jax.tree.leaves(layer["long_term"]["bandwidth"]))
  assert not layer["long_term"]["value"]["gamma"] and not layer["long_term"]["value"]["theta"]


def test_weight_decay_shrinks_only_matrices():
  cfg = config_lib.TrainConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, steps=10)
  tx = optim.make_optimizer(cfg)
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["w"]).min()) > 0
  np.testing.assert_array_equal(updates["scale"], 0)


def _batch(exp, seed):
  rng = np.random.default_rng(seed)
  shape = (exp.train.batch_size, exp.data.seq_len)
  tokens = rng.integers(0, exp.model.vocab_size, shape).astype(np.int32)
  return {
      "tokens": tokens,
      "targets": np.roll(tokens, -1, axis=1),
      "segment_ids": np.zeros(shape, np.int32),
      "loss_mask": np.ones(shape, np.float32),
      "answer_mask": np.zeros(shape, np.float32),
  }


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch():
  exp = registry.get("llama-tiny")
  exp = overrides.override(exp, "data.seq_len", 16)
  exp = overrides.override(exp, "train.batch_size", 4)
  batch = _batch(exp, 0)
  results = []
  for accum in (1, 2):
    e = overrides.override(exp, "train.grad_accum", accum)
    model = families.build_model(e.model)
    tx = optim.make_optimizer(e.train)
    state = step_lib.init_state(e, model, tx)
    new_state, stats = step_lib.make_train_step(e, model, tx)(state, batch)
    results.append((new_state["params"], stats))
  (p1, s1), (p2, s2) = results
  np.testing.assert_allclose(s1["grad_norm"], s2["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_long_term_delay_is_drawn_in_its_range_every_step():
  cfg = registry.get("mm2-tiny").model
  low, high = cfg.long_term_delay_range
  family = families.of(cfg)
  draws = [int(family.step_kwargs(cfg, jax.random.key(i))["ltm_delay"]) for i in range(200)]
  assert min(draws) == low and max(draws) == high
  assert family.step_kwargs(cfg, None) == {"ltm_delay": cfg.long_term_delay}
  no_ltm = overrides.override(registry.get("mm2-tiny"), "model.long_term_memory", False)
  assert family.step_kwargs(no_ltm.model, jax.random.key(0)) == {}


def test_grad_accum_must_divide_the_batch():
  with pytest.raises(config_lib.ConfigError, match="not a multiple of train.grad_accum"):
    config_lib.TrainConfig(batch_size=6, grad_accum=4)
