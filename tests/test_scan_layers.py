"""model.scan_layers: the blocks under `nn.scan`, parameters and decode caches stacked on a layer
axis, against the unrolled model of the same config: initialisation, logits and gradients, decoding,
scoring, one traced block, the layout converters, exports and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mosaics_jax import checkpoints, config as config_lib, overrides
from mosaics_jax.analysis import bench_train, flops
from mosaics_jax.inference import generate as generate_lib, score as score_lib
from mosaics_jax.model import families, lm
from mosaics_jax.port import layout, pretrained
from mosaics_jax.train import loop, optim, step as step_lib

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import test_decode  # noqa: E402
import tiny_runs  # noqa: E402

import sharded_runs  # noqa: E402  (beside this file)

TINY = dict(vocab_size=50, num_layers=2, width=32, num_heads=4)
CONFIGS = {
    "mm1": config_lib.MosaicV1Config(**TINY, block_size=32, pmem_size=16, dropout=0.1),
    "mm1-library": config_lib.MosaicV1LibraryConfig(**TINY, block_size=32, pmem_size=16),
    "mm2": config_lib.MosaicV2Config(
        **TINY,
        ffn_width=48,
        short_term_window=6,
        long_term_delay=3,
        long_term_delay_range=(2, 5),
        dropout=0.1,
    ),
    "llama": config_lib.LlamaConfig(**TINY, ffn_width=48, dropout=0.1),
    "gpt2": config_lib.GPT2Config(**TINY, block_size=32, dropout=0.1),
}
T = 19
# Llama in the default suite (it compiles fastest); the others, mm2 included, in the slow one.
FAST = ("llama",)


def _marked(names):
  return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(names)]


def scanned(cfg: config_lib.ModelConfig, **changes) -> config_lib.ModelConfig:
  return dataclasses.replace(cfg, scan_layers=True, **changes)


def _batch() -> tuple[np.ndarray, np.ndarray]:
  """[2, T] tokens; row 0 holds two documents."""
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, T), 0, TINY["vocab_size"]))
  segment_ids = np.zeros((2, T), np.int32)
  segment_ids[0, 8:] = 1
  return tokens, segment_ids


def _equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
    "name", [n if n == "mm2" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CONFIGS)]
)
def test_scanned_init_is_the_unrolled_init_stacked_and_unstacks_exactly(name):
  """Same rng: the scanned parameters are the unrolled ones stacked, bit for bit, their boxed
  logical names led by the layer axis; unstacking gives the unrolled parameters back."""
  cfg = CONFIGS[name]
  tokens = jnp.zeros((1, 8), jnp.int32)
  unrolled = jax.jit(families.build_model(cfg).init)(jax.random.key(5), tokens)["params"]
  model = families.build_model(scanned(cfg))
  params = jax.jit(model.init)(jax.random.key(5), tokens)["params"]
  assert set(params) == {k for k in unrolled if not k.startswith(("layer_", "h_"))} | {"layers"}
  _equal(params, families.stack_layers(unrolled, scanned(cfg)))
  _equal(families.unstack_layers(params, cfg), unrolled)
  _equal(families.to_layout(params, cfg), unrolled)
  _equal(families.to_layout(unrolled, scanned(cfg)), params)
  boxed = jax.eval_shape(model.init_boxed, jax.random.key(5), tokens)["params"]
  flat = flax.traverse_util.flatten_dict(boxed)
  assert flat
  for path, leaf in flat.items():
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    if path[0] == "layers":
      assert leaf.names[0] == "layers" and leaf.value.shape[0] == cfg.num_layers, path
    else:
      assert "layers" not in leaf.names, path


def _loss_and_grads(cfg, params, tokens, segment_ids):
  model = families.build_model(cfg)
  kwargs = families.of(cfg).step_kwargs(cfg, jax.random.key(2))

  def loss(params):
    logits = model.apply({"params": params}, tokens, segment_ids, **kwargs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return ce.mean(), logits

  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return float(value), np.asarray(logits), grads


@pytest.mark.parametrize("name", _marked(CONFIGS))
def test_logits_and_gradients_equal_the_unrolled_model(name):
  """Scanned vs unrolled, both rematerialised (remat alone moves v1's logits by 2e-6 of their
  scale: XLA fuses the recomputed forward otherwise), parameters near init, packed documents,
  dropout set but deterministic (and v2's drawn long-term delay): logits and the gradient of the
  mean cross-entropy within 1e-6 of their scale in float32; v1's gradients within 2e-6, the
  rounding remat alone gives it (CI's CPU saw 1.2e-6 on one key_scale entry)."""
  cfg = dataclasses.replace(CONFIGS[name], remat=True)
  _, params = tiny_runs.params_near_init(cfg)
  tokens, segment_ids = _batch()
  loss, logits, grads = _loss_and_grads(cfg, params, tokens, segment_ids)
  cfg_scan = scanned(cfg)
  loss_s, logits_s, grads_s = _loss_and_grads(
      cfg_scan, families.stack_layers(params, cfg_scan), tokens, segment_ids
  )
  np.testing.assert_allclose(logits_s, logits, atol=1e-6 * np.abs(logits).max(), rtol=0)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  grads = families.stack_layers(grads, cfg_scan)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  tolerance = 2e-6 if cfg.family == "mm1" else 1e-6
  for (path, g_s), g in zip(jax.tree_util.tree_leaves_with_path(grads_s), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g_s, g, atol=tolerance * scale, rtol=0, err_msg=str(path))


@pytest.mark.parametrize("policy", ["save_retrieval", "save_dots"])
def test_a_scanned_remat_policy_keeps_the_unrolled_gradients(policy):
  """A remat policy wraps the block before the scan: the scanned model's logits and gradients
  under `policy` are the unrolled model's without remat."""
  cfg = CONFIGS["llama"]
  _, params = tiny_runs.params_near_init(cfg)
  tokens, segment_ids = _batch()
  _, logits, grads = _loss_and_grads(cfg, params, tokens, segment_ids)
  cfg_scan = scanned(cfg, remat_policy=policy)
  _, logits_s, grads_s = _loss_and_grads(
      cfg_scan, families.stack_layers(params, cfg_scan), tokens, segment_ids
  )
  np.testing.assert_allclose(logits_s, logits, atol=1e-6 * np.abs(logits).max(), rtol=0)
  grads = families.stack_layers(grads, cfg_scan)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  for (path, g_s), g in zip(jax.tree_util.tree_leaves_with_path(grads_s), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g_s, g, atol=1e-6 * scale, rtol=0, err_msg=str(path))


@pytest.mark.parametrize(
    "name", ["llama", *(pytest.param(n, marks=pytest.mark.slow) for n in ("mm2", "mm1-pmem2"))]
)
def test_decoding_equals_the_unrolled_forward(name):
  """Prefill and token-by-token decoding of the scanned model (its cache stacked on the layer
  axis) give the unrolled model's full-forward logits (test_decode's teacher forcing)."""
  cfg = dataclasses.replace(test_decode.CONFIGS[name], num_layers=3)  # Not the batch size, 2.
  model, params = tiny_runs.params_near_init(cfg)
  tokens, segment_ids = test_decode._stream()
  if cfg.family == "mm1":  # The full forward of v1 is bounded by block_size: a longer one.
    model = families.build_model(dataclasses.replace(cfg, block_size=tokens.shape[1]))
  full = test_decode._forward(model, params, tokens, segment_ids)
  model_s = families.build_model(scanned(cfg))
  cache = model_s.init_cache(2, 8)
  for memory in jax.tree.leaves(cache.layers):
    assert memory.shape[:2] == (cfg.num_layers, 2)
  params_s = families.stack_layers(params, scanned(cfg))
  decoded = test_decode._decode(model_s, params_s, tokens, segment_ids, 1)
  np.testing.assert_allclose(decoded, full, atol=1e-5 * np.abs(full).max(), rtol=0)


@pytest.mark.slow
def test_generation_and_scoring_equal_the_unrolled_model():
  """Greedy generation, and continuation scores (one context's cache copied to every row),
  are the unrolled model's."""
  cfg = CONFIGS["llama"]
  model, params = tiny_runs.params_near_init(cfg)
  model_s = families.build_model(scanned(cfg))
  params_s = families.stack_layers(params, scanned(cfg))
  prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
  new = generate_lib.Generator(model)(params, prompts, 6)
  assert generate_lib.Generator(model_s)(params_s, prompts, 6) == new
  continuations = [[4, 5], [6], [7, 8, 9]]
  scores = score_lib.Scorer(model).continuation_scores(params, [1, 2, 3], continuations)
  scores_s = score_lib.Scorer(model_s).continuation_scores(params_s, [1, 2, 3], continuations)
  np.testing.assert_allclose([s for s, _ in scores_s], [s for s, _ in scores], rtol=1e-5)
  assert [g for _, g in scores_s] == [g for _, g in scores]


def _jaxpr_size(cfg: config_lib.ModelConfig, layers: int) -> int:
  cfg = dataclasses.replace(cfg, num_layers=layers)
  model = families.build_model(cfg)
  params = families.param_shapes(cfg)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return len(str(jax.make_jaxpr(lambda p, t: model.apply({"params": p}, t))(params, tokens)))


@pytest.mark.parametrize("name", ["mm2", "llama"])
def test_the_scanned_model_traces_one_block(name):
  """Unrolled, 4 layers' forward jaxpr is 3 blocks longer than 1 layer's; scanned, about as long
  (a block: the growth of the unrolled jaxpr from 1 to 2 layers)."""
  cfg = CONFIGS[name]
  one, two, four = (_jaxpr_size(cfg, n) for n in (1, 2, 4))
  block = two - one
  assert block > 0.3 * one and four - one > 2.5 * block
  one, four = (_jaxpr_size(scanned(cfg), n) for n in (1, 4))
  assert abs(four - one) < 0.05 * block


def test_parameter_and_flop_counts_are_the_unrolled_models():
  cfg = CONFIGS["mm2"]
  assert flops.count(scanned(cfg)) == flops.count(cfg)
  assert families.param_count(scanned(cfg)) == families.param_count(cfg)


def test_converters_name_params_that_do_not_fit():
  cfg = CONFIGS["llama"]
  params = families.param_shapes(cfg)
  with pytest.raises(ValueError, match=r"no layers \['layer_2', 'layer_3'\] of a 4-layer llama"):
    families.stack_layers(params, dataclasses.replace(cfg, num_layers=4))
  stacked = families.param_shapes(scanned(cfg))
  with pytest.raises(ValueError, match="stacked layers of \\[2\\] layers do not fit a 3-layer"):
    families.unstack_layers(stacked, dataclasses.replace(cfg, num_layers=3))
  with pytest.raises(ValueError, match="no stacked layers 'layers'"):
    families.unstack_layers(params, cfg)


@pytest.mark.parametrize("name", ["mm2", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_exports_are_the_unrolled_models_and_load_into_either_layout(tmp_path, name):
  """A scanned model exports the unrolled model's files (PyTorch names and Flax layout alike), and
  either export loads into either layout."""
  cfg = CONFIGS[name]
  _, params = tiny_runs.params_near_init(cfg)
  params_s = families.stack_layers(params, scanned(cfg))
  _equal(layout.to_torch(scanned(cfg), params_s), layout.to_torch(cfg, params))
  _equal(layout.from_torch(scanned(cfg), layout.to_torch(cfg, params)), params_s)
  for kind in pretrained.LAYOUTS:
    here = pretrained.save_exported(tmp_path / f"{kind}-unrolled", cfg, params, layout=kind)
    there = pretrained.save_exported(tmp_path / f"{kind}-scan", scanned(cfg), params_s, layout=kind)
    weights = pretrained.WEIGHTS_FILE
    assert (here / weights).read_bytes() == (there / weights).read_bytes()
    _equal(pretrained.load(there).params, params_s)
    _equal(pretrained.load(here).params, params)


def test_checkpoints_convert_both_ways_and_a_resume_names_the_layout(tmp_path):
  """Unrolled params stacked, saved in a scanned run's checkpoint and read back as weights (for
  either layout) give the unrolled params bit for bit; the config check of a resume in the other
  layout raises the error that names the saved layout (the training loop converts on it)."""
  cfg = CONFIGS["llama"]
  _, params = tiny_runs.params_near_init(cfg)
  params_s = families.stack_layers(params, scanned(cfg))
  ckpts = checkpoints.Checkpoints(tmp_path / checkpoints.CHECKPOINTS_DIR, 1)
  ckpts.save(1, {"params": params_s, "step": jnp.ones((), jnp.int32)}, {"position": 0})
  ckpts.wait()
  ckpts.close()
  run = config_lib.Experiment(name="x", description="x", model=scanned(cfg))
  checkpoints.check_or_save_config(tmp_path, run, has_checkpoints=False)
  loaded = pretrained.load(tmp_path)
  _equal(loaded.params, params_s)
  _equal(families.to_layout(loaded.params, cfg), params)
  unrolled_run = dataclasses.replace(run, model=cfg)
  with pytest.raises(checkpoints.LayoutMismatch, match="saved with model.scan_layers=True") as e:
    checkpoints.check_or_save_config(tmp_path, unrolled_run, has_checkpoints=True)
  assert e.value.saved_scan_layers is True


def test_a_run_resumes_in_the_other_layout_as_if_uninterrupted(tmp_path):
  """Trained 4 steps unrolled, then resumed scanned to step 8 and back unrolled to step 10: the
  parameters are those of 10 uninterrupted unrolled steps (optimizer moments converted too), and
  config.json records the layout of the last run."""
  # A constant learning rate: the schedule then does not depend on train.steps, which each part
  # of the switched run sets to where it stops.
  exp = tiny_runs.tiny(
      10, train__checkpoint_every=2, train__warmup_steps=0, train__min_lr_ratio=1.0
  )
  loop.train(exp, tmp_path / "straight", progress=False)
  _, straight = tiny_runs.final_params(tmp_path / "straight", exp)
  run = tmp_path / "switched"
  loop.train(overrides.override(exp, "train.steps", 4), run, progress=False)
  scan_8 = overrides.apply(exp, ["model.scan_layers=true", "train.steps=8"])
  loop.train(scan_8, run, progress=False)
  saved = json.loads((run / checkpoints.CONFIG_FILE).read_text())
  assert saved["model"]["scan_layers"] is True
  assert loop.train(exp, run, progress=False).step == 10
  _, switched = tiny_runs.final_params(run, exp)
  # The layouts round float32 differently (1e-7); Adam's normalised updates turn that, in
  # near-zero gradients (v2's bandwidth scalars), into differences up to 0.6 of one step's
  # learning rate here. Moments lost in the conversion move parameters by 7 learning rates, layers
  # out of order by the parameters' own size; the exact conversion is the test below.
  tolerance = exp.train.learning_rate
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(switched), jax.tree.leaves(straight)):
    np.testing.assert_allclose(x, y, atol=tolerance, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_scanned_training_and_generation_on_a_mesh_equal_unrolled(tmp_path):
  """On (data=2, fsdp=2, tensor=2) of 8 simulated devices: the stacked parameters are sharded as
  the rules say with the layer axis whole, two train steps give the unrolled run's losses and
  parameters, and greedy generation (caches stacked and sharded) its tokens."""
  out = tmp_path / "scan.npz"
  sharded_runs.run_on_8_devices("scan", out)
  runs = np.load(out)
  np.testing.assert_array_equal(runs["tokens_scan"], runs["tokens_unrolled"])
  np.testing.assert_allclose(runs["losses_scan"], runs["losses_unrolled"], rtol=1e-5)
  keys = [k for k in runs.files if k.startswith("unrolled:")]
  assert keys
  # Adam scales each update to about the learning rate (1e-3) whatever the gradient's size, so
  # float32 rounding in a near-zero gradient moves a parameter by up to a few percent of that.
  for key in keys:
    scan = runs[key.replace("unrolled:", "scan:")]
    np.testing.assert_allclose(scan, runs[key], atol=1e-4, err_msg=key)


def test_a_train_state_converts_exactly_both_ways():
  """The resume's conversion of a train state: parameters and AdamW's moments stacked, bit for
  bit, and back; the step, rng and counts untouched."""
  exp = tiny_runs.tiny(2)
  model = families.build_model(exp.model)
  tx = optim.make_optimizer(exp.train)
  state = step_lib.init_state(exp, model, tx)
  batch = bench_train.synthetic_batch(exp, np.random.default_rng(0))
  state, _ = jax.jit(step_lib.train_step_fn(exp, model, tx))(state, batch)
  cfg_scan = scanned(exp.model)
  converted = loop._to_layout(state, cfg_scan)
  _equal(converted["params"], families.stack_layers(state["params"], cfg_scan))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(converted)]
  assert sum(p.startswith("['opt_state']") and f"['{lm.SCANNED}']" in p for p in paths) >= 2
  assert not any("['layer_0']" in p for p in paths)
  _equal(loop._to_layout(converted, exp.model), state)
