"""The three moons: data set, context memory, training, evaluation and the `three-moons` plan."""

from __future__ import annotations

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaics_jax import config as config_lib, moons, registry
from mosaics_jax.cli import repro as repro_cli
from mosaics_jax.eval import moons as eval_moons
from mosaics_jax.model import context_memory
from mosaics_jax.repro import declaration as decl, plan as plan_lib
from mosaics_jax.train import moons as train_moons


def _joint_by_search(periods):
  """The smallest positive multiple of 0.1 that every period divides, found by counting."""
  tenths = [round(p * 10) for p in periods]
  t = 1
  while any(t % p for p in tenths):
    t += 1
  return t / 10


def test_combinations_follow_the_official_selection():
  every = list(itertools.combinations((0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5), 3))
  assert len(every) == 35
  joint = {c: _joint_by_search(c) for c in every}
  train, held_out = moons.combinations()
  kept = (*train, held_out)
  assert len(kept) == 35 // 4 + 1 == 9 and len(set(kept)) == 9
  # Every combination of a smaller joint period than the largest kept is kept.
  cut = max(joint[c] for c in kept)
  assert cut == 6.0
  assert {c for c in every if joint[c] < cut} <= set(kept)
  assert all(moons.joint_period(c) == joint[c] for c in every)
  # The held-out one is last, of the largest joint period; numpy's tie-break picks (1, 2, 3).
  assert joint[held_out] == cut and held_out == (1.0, 2.0, 3.0)


def test_positions_inputs_and_targets():
  data = moons.Moons(block_size=800, min_periods_in_block_size=3)
  assert data.spacing == pytest.approx(6.0 * 3 / 800)
  periods, joint = moons.Moons(split="heldout").periods_in_steps((1.0, 2.0, 3.0))
  assert periods == pytest.approx((800 / 18, 1600 / 18, 2400 / 18))
  assert joint == pytest.approx(4800 / 18)
  p = (0.5, 1.0, 2.0)
  got = data.positions(p, start=7, length=5)
  u = (7 + np.arange(5)) * 0.0225
  for m in range(3):
    np.testing.assert_allclose(got[:, 2 * m], np.sin(2 * math.pi * u / p[m] + 0.3), atol=1e-12)
    np.testing.assert_allclose(got[:, 2 * m + 1], np.cos(2 * math.pi * u / p[m] + 0.3), atol=1e-12)
  planet = moons.Moons(observer="planet").positions(p, start=7, length=5)
  np.testing.assert_allclose(planet[:, :4], got[:, :4] - np.tile(got[:, 4:], 2), atol=1e-12)
  np.testing.assert_allclose(planet[:, 4:], got[:, 4:])
  x, y = data.batch(np.random.default_rng(0), 4)
  assert x.shape == y.shape == (4, 800, 6) and x.dtype == np.float32
  np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
  # Each row turns each moon by 2 pi spacing / period per step, for a training combination.
  angles = np.unwrap(np.arctan2(x[:, :, 0::2], x[:, :, 1::2]), axis=1)
  steps = (angles[:, 1:] - angles[:, :-1]).mean(1)
  turns = {tuple(2 * math.pi * 0.0225 / np.asarray(c)) for c in moons.combinations()[0]}
  for row in steps:
    assert any(np.allclose(row, t, atol=1e-6) for t in turns)


def test_dataset_refuses_a_short_block():
  with pytest.raises(ValueError, match="points per unit"):
    moons.Moons(block_size=60)


def _official_complexify(w):
  """ThreeMoons/model.py's in-place complexify, in numpy."""
  w = np.array(w, dtype=np.float64) * 0.5
  w[0::2, 0::2] += w[1::2, 1::2]
  w[0::2, 1::2] -= w[1::2, 0::2]
  w[1::2, 0::2] = -w[0::2, 1::2]
  w[1::2, 1::2] = w[0::2, 0::2]
  return w


def test_complexify_is_the_official_projection():
  rng = np.random.default_rng(0)
  w, other = rng.normal(size=(2, 6, 4))
  got = np.asarray(context_memory.complexify(jnp.asarray(w)))
  np.testing.assert_allclose(got, _official_complexify(w), atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(context_memory.complexify(jnp.asarray(got))), got, atol=1e-6
  )
  # An orthogonal projection: the residual is orthogonal to every complex-structured matrix.
  structured = np.asarray(context_memory.complexify(jnp.asarray(other)))
  assert abs(((w - got) * structured).sum()) < 1e-5
  np.testing.assert_allclose(got[0::2, 0::2], got[1::2, 1::2])
  np.testing.assert_allclose(got[0::2, 1::2], -got[1::2, 0::2])


def _dense_reference(config, params, x, observed=None):
  """The context memory written out: a softmax over s <= t - 1 per head, the first row 0; with
  `observed`, the values of s >= observed - 1 are 0."""
  c = config
  proj = context_memory.complexify if c.complex else (lambda w: w)
  w_k, w_v = proj(params["key"]), proj(params["value"])
  b, t, _ = x.shape
  k = (x @ w_k).reshape(b, t, c.n_head, c.h_dim)
  v = jnp.concatenate([x[:, 1:] @ w_v, jnp.zeros((b, 1, w_v.shape[1]))], 1)
  if observed is not None:
    v = v.at[:, observed - 1 :].set(0.0)
  v = v.reshape(b, t, c.n_head, c.h_dim)
  scores = c.attn_scale * jnp.einsum("bthd,bshd->bhts", k, k)
  mask = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None] - 1
  weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  weights = jnp.where(mask.any(-1)[:, None], weights, 0.0)
  y = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, -1)
  w_z = proj(params["out"]) if c.out_proj else jnp.eye(c.n_head * c.h_dim)
  return y @ w_z


@pytest.mark.parametrize(
    "fields",
    [
        dict(n_head=1, h_dim=6),
        dict(n_head=3, h_dim=2, retrieve_impl="reference"),
        dict(n_head=3, h_dim=2, out_proj=False, complex=False, attn_scale=3.0),
    ],
)
def test_context_memory_matches_a_dense_reference(fields):
  config = config_lib.ContextMemoryConfig(retrieve_block_size=4, **fields)
  model = context_memory.ContextMemory(config)
  x = jnp.asarray(moons.Moons().positions((0.5, 1.0, 1.5), 3, 11)[None].repeat(2, 0))
  x = x + 0.1 * jax.random.normal(jax.random.key(1), x.shape)
  params = model.init(jax.random.key(0), x)["params"]
  out, heads = model.apply({"params": params}, x)
  want = _dense_reference(config, params, x)
  np.testing.assert_allclose(out, want, atol=1e-5)
  np.testing.assert_allclose(heads.sum(2), out, atol=1e-5)
  assert not np.asarray(out[:, 0]).any()  # No pair before the first step.
  weight = jax.random.normal(jax.random.key(2), out.shape)
  got = jax.grad(lambda p: (model.apply({"params": p}, x)[0] * weight).sum())(params)
  ref = jax.grad(lambda p: (_dense_reference(config, p, x) * weight).sum())(params)
  for name in params:
    np.testing.assert_allclose(got[name], ref[name], atol=1e-4, rtol=1e-4)
  partial = model.apply({"params": params}, x, jnp.asarray(4))[0]
  np.testing.assert_allclose(partial, _dense_reference(config, params, x, 4), atol=1e-5)
  np.testing.assert_allclose(partial[:, :4], out[:, :4], atol=1e-6)  # Rows up to 3 read s <= 2.
  # The first row's output takes no gradient; the others' do.
  first = jax.grad(lambda p: model.apply({"params": p}, x)[0][:, 0].sum())(params)
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(first))


def test_rollout_feeds_its_predictions_back_as_queries():
  config = config_lib.ContextMemoryConfig(n_head=3, h_dim=2, retrieve_block_size=4)
  model = context_memory.ContextMemory(config)
  x = jnp.asarray(moons.Moons().positions((0.5, 1.0, 1.5), 0, 16)[None].repeat(2, 0))
  params = model.init(jax.random.key(0), x)["params"]
  for observed in (1, 5):
    got = context_memory.rollout(config, params, x, jnp.asarray(observed), 4)
    seq, want = x[:, :observed], []
    for _ in range(4):
      step = _dense_reference(config, params, seq, observed)[:, -1]
      want.append(step)
      seq = jnp.concatenate([seq, step[:, None]], 1)
    np.testing.assert_allclose(got, jnp.stack(want, 1), atol=1e-5)


def _tiny(steps, **model):
  return config_lib.MoonsExperiment(
      name="tiny",
      description="",
      model=config_lib.ContextMemoryConfig(retrieve_block_size=16, **model),
      data=config_lib.MoonsData(seq_len=96),
      train=config_lib.MoonsTrain(batch_size=8, steps=steps, log_every=10, checkpoint_every=15),
  )


@pytest.mark.slow  # Compiles training, checkpoints and generation: a minute.
def test_training_lowers_the_loss_and_resumes(tmp_path):
  experiment = _tiny(steps=40)
  state = train_moons.init_state(experiment)
  data = train_moons.dataset(experiment, "train")
  x, y = map(jnp.asarray, data.batch(np.random.default_rng(9), 16))
  model = context_memory.ContextMemory(experiment.model)
  loss = lambda s: float(
      train_moons.clipped_loss(model.apply({"params": s["params"]}, x)[0], y, 0.5)
  )
  before = loss(state)
  trained = train_moons.train(experiment, tmp_path)
  assert loss(trained) < 0.8 * before
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [10, 20, 30, 40]
  # A finished run trains no more: the same state back.
  again = train_moons.train(experiment, tmp_path)
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_clipped_loss():
  pred = jnp.asarray([[[0.0, 1.0, -2.0]]])
  assert float(train_moons.clipped_loss(pred, jnp.zeros_like(pred), 0.5)) == pytest.approx(
      (0 + 0.25 + 0.25) / 3
  )


def test_steps_to_threshold():
  grid = [1, 11, 21, 31]
  assert eval_moons.steps_to_threshold(grid, [0.5, 0.05, 0.2, 0.01], 0.1) == 31
  assert eval_moons.steps_to_threshold(grid, [0.5, 0.05, 0.02, 0.01], 0.1) == 11
  assert eval_moons.steps_to_threshold(grid, [0.5, 0.05, 0.02, 0.3], 0.1) == 32


def test_head_moon_shares_find_each_heads_moon():
  data = moons.Moons()
  target = data.positions((1.0, 2.0, 3.0), 0, 500)[None]
  rng = np.random.default_rng(0)
  heads = np.stack(
      [target[..., 2 * m : 2 * m + 2] @ rng.normal(size=(2, 6)) for m in (2, 0, 1)], axis=2
  )
  shares = eval_moons.head_moon_shares(heads, target)
  np.testing.assert_array_equal(shares.argmax(1), [2, 0, 1])
  assert shares.max(1).min() > 0.99 and np.sort(shares, 1)[:, :2].max() < 0.05


@pytest.mark.slow  # Compiles training, checkpoints and generation: a minute.
def test_evaluation_of_a_tiny_run(tmp_path):
  experiment = _tiny(steps=2, n_head=3, h_dim=2)
  train_moons.train(experiment, tmp_path)
  settings = eval_moons.Settings(batch_size=2, stride=30, analysis_from=40, bucket=32)
  results, model = eval_moons.run(experiment, tmp_path, settings)
  by = {}
  for r in results:
    by.setdefault(r.metric, []).append(r)
  assert [r.row["length"] for r in by["error"]] == [1, 31, 61]
  assert len(by["head_moon_share"]) == 9 and model.step == 2
  assert by["steps_to_threshold"][0].value in (1, 31, 61, 62)
  # Block 96 holds 3 joint periods of 6 (spacing 0.1875): periods 1, 2, 3 in steps.
  assert [r.value for r in by["period_steps"]] == pytest.approx([96 / 18, 192 / 18, 288 / 18])


def test_three_moons_plan_and_dry_run(capsys):
  repro = registry.get_reproduction("three-moons")
  planned = plan_lib.plan(repro)
  assert [(p.run.name, p.params, p.tokens) for p in planned] == [
      ("1head", 108, 500 * 64 * 800),
      ("3heads", 108, 500 * 64 * 800),
  ]
  assert planned[1].experiment.model.n_head == 3 and repro.seeds >= 3
  assert repro_cli.main(["three-moons", "--dry-run"]) == 0
  assert "moons-3heads" in capsys.readouterr().out
  wrong = decl.Reproduction(
      name="x",
      claim="",
      source="",
      scale="cpu",
      runs=(decl.Run(name="a", experiment="moons-1head"),),
      evaluations=(decl.Evaluation(task="perplexity"),),
  )
  with pytest.raises(plan_lib.ReproError, match="evaluates three-moons runs"):
    plan_lib.validate(wrong)
