"""Sharding on device meshes: same training on 8 devices as on one, every parameter sharded as the
rules say, checkpoints restored onto other meshes, and clear errors for meshes that do not fit.

The 8-device halves run tests/sharded_runs.py in a subprocess: the device count must be set before
jax starts, and the other tests share these workers with one device.
"""

from __future__ import annotations

import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaics_jax import (
    build_model,
    checkpoints,
    config as config_lib,
    overrides,
    registry,
    sharding,
)
from mosaics_jax.train import optim, step as step_lib

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import sharded_runs  # noqa: E402  (beside this file)

FAMILIES = ("mm1-tiny", "mm2-tiny", "llama-tiny")


# "pallas": the Pallas kernels (interpreted on CPU) run per (batch, heads) shard in shard_map.
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, impl",
    [
        ("llama-tiny", "auto"),
        ("mm1-tiny", "auto"),
        ("mm2-tiny", "auto"),
        ("mm2-tiny", "pallas"),
    ],
)
def test_training_on_a_mesh_matches_one_device(tmp_path, name, impl):
  """Three steps on (data=2, fsdp=2, tensor=2) give the losses and parameters of one device."""
  out = tmp_path / "steps.npz"
  sharded_runs.run_on_8_devices("steps", out, name, impl)
  runs = np.load(out)
  np.testing.assert_allclose(runs["losses_mesh"], runs["losses_one"], rtol=1e-5)
  params = [k for k in runs.files if k.startswith("one:")]
  assert params
  for key in params:
    np.testing.assert_allclose(
        runs[key.replace("one:", "mesh:", 1)], runs[key], atol=1e-5, err_msg=key
    )


@pytest.mark.slow
def test_grad_accum_on_a_mesh_gives_the_batch_mean_and_its_gradient(tmp_path):
  """On (data=2, fsdp=2, tensor=2), with 1, 2 or 4 micro-batches that count 0 to 128 targets, the
  step's loss and gradient are the global batch's mean over its masked targets, computed
  directly on one device."""
  out = tmp_path / "grad_accum.npz"
  sharded_runs.run_on_8_devices("grad_accum", out)
  runs = np.load(out)
  reference = [k for k in runs.files if k.startswith("grad:reference:")]
  assert reference
  for accum in (1, 2, 4):
    assert runs[f"loss:{accum}"] == pytest.approx(runs["loss:reference"], rel=1e-6)
    for key in reference:
      got = runs[key.replace(":reference:", f":{accum}:", 1)]
      np.testing.assert_allclose(got, runs[key], atol=1e-6, err_msg=f"{accum}: {key}")


@pytest.mark.slow
def test_chunked_loss_on_a_mesh_gives_the_whole_sequences(tmp_path):
  """On (data=2, fsdp=2, tensor=2), with 2 micro-batches and chunks of 12 of 32 positions (the
  logits' vocabulary over tensor), the first step's loss and gradient are those of the whole
  sequence's logits in one batch on one device."""
  out = tmp_path / "loss_chunk.npz"
  sharded_runs.run_on_8_devices("loss_chunk", out)
  runs = np.load(out)
  reference = [k for k in runs.files if k.startswith("grad:reference:")]
  assert reference
  assert runs["loss:chunked"] == pytest.approx(runs["loss:reference"], rel=1e-6)
  for key in reference:
    got = runs[key.replace(":reference:", ":chunked:", 1)]
    np.testing.assert_allclose(got, runs[key], atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
  out = tmp_path_factory.mktemp("specs") / "specs.json"
  sharded_runs.run_on_8_devices("specs", out)
  return json.loads(out.read_text())


def _expected_spec(names: list[str], rules) -> list[list[str]]:
  """The documented rule semantics: in order, a logical name takes its rule's mesh axes unless
  the array already uses one of them."""
  spec: list[list[str]] = [[] for _ in names]
  used: set[str] = set()
  for logical, axes in rules:
    axes = [axes] if isinstance(axes, str) else list(axes or ())
    if logical in names and not spec[names.index(logical)] and not used & set(axes):
      spec[names.index(logical)] = axes
      used |= set(axes)
  return spec


@pytest.mark.parametrize("name", FAMILIES)
def test_every_parameter_is_sharded_as_the_rules_say(specs, name):
  report = specs[name]
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  rules = config_lib.DEFAULT_AXIS_RULES
  for path, leaf in report["params"].items():
    assert len(leaf["names"]) == len(leaf["shape"]), path
    assert leaf["spec"] == _expected_spec(leaf["names"], rules), path
  # The optimizer moments are sharded like their parameters; scalars are replicated.
  for path, leaf in report["opt_state"].items():
    owner = [p for p in report["params"] if path.endswith("/" + p)]
    if owner:
      assert leaf["spec"] == report["params"][owner[0]]["spec"], path
    else:
      assert leaf["shape"] == [] and leaf["spec"] == [], path


def test_key_parameters_have_the_expected_logical_axes(specs):
  tensor, fsdp, whole = ["tensor"], ["fsdp"], []
  expected = {
      "mm1-tiny": {
          "wte/embedding": [tensor, fsdp],
          "h_0/attn/k_featurizer/W_k/kernel": [fsdp, tensor],
          "h_0/attn/c_proj/kernel": [tensor, fsdp],
          "h_0/mlp/P_k": [whole, tensor, whole, whole],
          "h_0/mlp/out_scale": [tensor],
          "h_0/ln_1/scale": [whole],
      },
      "mm2-tiny": {
          "embed/embedding": [tensor, fsdp],
          "classifier/kernel": [fsdp, tensor],
          "layer_0/short_term/key/W_phi/kernel": [fsdp, tensor],
          "layer_0/long_term/key/w_lambda/kernel": [fsdp, tensor],
          "layer_0/short_term/value/gamma": [tensor],
          "layer_0/long_term/bandwidth/theta_a": [tensor],
          "layer_0/w_o/kernel": [tensor, fsdp],
          "layer_0/ffn/w1/kernel": [fsdp, tensor],
          "layer_0/ffn/w2/kernel": [tensor, fsdp],
          "layer_0/norm1/scale": [whole],
      },
      "llama-tiny": {
          "layer_0/attention/wq/kernel": [fsdp, tensor],
          "layer_0/attention/wo/kernel": [tensor, fsdp],
          "layer_0/ffn/w3/kernel": [fsdp, tensor],
      },
  }
  for name, params in expected.items():
    for path, spec in params.items():
      assert specs[name]["params"][path]["spec"] == spec, (name, path)


@pytest.mark.slow
def test_generation_on_a_mesh_matches_one_device(tmp_path):
  """Greedy tokens of every family on (data=4, tensor=2), batch and heads sharded, are those of
  one device."""
  out = tmp_path / "generate.json"
  sharded_runs.run_on_8_devices("generate", out)
  for name, runs in json.loads(out.read_text()).items():
    assert runs["mesh"] == runs["one"], name
    assert all(len(row) == 20 for row in runs["one"])


@pytest.mark.slow
def test_checkpoint_restores_onto_other_meshes_and_one_device(tmp_path):
  """Saved on fsdp=8; restored onto fsdp=8, (data=2, tensor=4) and one device in the 8-device
  process (checked there), and here, in a process with its own device count."""
  sharded_runs.run_on_8_devices("restore", tmp_path)
  saved = np.load(tmp_path / "saved_params.npz")
  exp = overrides.override(
      sharded_runs.tiny("mm2-tiny", **{"model.num_layers": 1}), "mesh", config_lib.MeshConfig()
  )
  model = build_model(exp.model)
  tx = optim.make_optimizer(exp.train)
  placement = step_lib.make_placement(exp, model, tx)
  ckpts = checkpoints.Checkpoints(tmp_path / "checkpoints", 3)
  step, state, _ = ckpts.restore_latest(step_lib.abstract_state(exp, model, tx, placement))
  ckpts.close()
  assert step == 1
  restored = {
      sharded_runs._path(p): x for p, x in jax.tree_util.tree_leaves_with_path(state["params"])
  }
  assert sorted(restored) == sorted(saved.files)
  for path, value in restored.items():
    np.testing.assert_array_equal(value, saved[path], err_msg=path)


def test_bad_mesh_sizes_are_clear_errors():
  with pytest.raises(
      sharding.ShardingError, match=r"data=2, fsdp=2, tensor=2.*has 8 devices but" r" there are 1"
  ):
    sharding.make_mesh(config_lib.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:1])
  with pytest.raises(sharding.ShardingError, match="at most one of"):
    sharding.mesh_shape(config_lib.MeshConfig(data=-1, fsdp=-1), 8)
  with pytest.raises(sharding.ShardingError, match="8 is not a multiple of 3"):
    sharding.mesh_shape(config_lib.MeshConfig(data=-1, tensor=3), 8)
  assert sharding.mesh_shape(config_lib.MeshConfig(data=-1, tensor=2), 8) == ((4, 1, 2), (1, 1, 1))
  assert sharding.mesh_shape(config_lib.MeshConfig(fsdp=2, dcn_data=2), 8) == ((2, 2, 1), (2, 1, 1))
  with pytest.raises(config_lib.ConfigError, match="mesh.tensor must be >= 1 or -1"):
    config_lib.MeshConfig(tensor=0)
  with pytest.raises(config_lib.ConfigError, match="unknown mesh axes.*'model'"):
    config_lib.MeshConfig(rules=(("heads", "model"),))


def _boxed_params(cfg: config_lib.ModelConfig):
  tokens = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(build_model(cfg).init_boxed, jax.random.key(0), tokens)["params"]


def test_indivisible_dimensions_name_the_parameter():
  cfg = config_lib.MosaicV2Config(vocab_size=64, num_layers=1, width=48, num_heads=3, ffn_width=64)
  axes = {"data": 1, "fsdp": 1, "tensor": 2}
  with pytest.raises(
      sharding.ShardingError,
      match=r"parameter layer_0/long_term/bandwidth/theta0 of shape \(3,\): dimension 0"
      r" \('heads', 3\) is not divisible by mesh axis 'tensor' of size 2",
  ):
    sharding.check_divisible(_boxed_params(cfg), axes, config_lib.DEFAULT_AXIS_RULES)
  llama = config_lib.LlamaConfig(vocab_size=64, num_layers=1, width=48, num_heads=3, ffn_width=64)
  sharding.check_divisible(_boxed_params(llama), axes, config_lib.DEFAULT_AXIS_RULES)
  with pytest.raises(sharding.ShardingError, match="model.num_heads 3 is not divisible"):
    sharding.check_activations(llama, 8, axes, config_lib.DEFAULT_AXIS_RULES)
  with pytest.raises(
      sharding.ShardingError,
      match="micro-batch 6 is not divisible by mesh axis" r" \('data', 'fsdp'\) of size 4",
  ):
    sharding.check_activations(
        llama, 6, {"data": 2, "fsdp": 2, "tensor": 1}, config_lib.DEFAULT_AXIS_RULES
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_init_gives_plain_params_and_init_boxed_names_every_one(name):
  cfg = registry.get(name).model
  boxed = _boxed_params(cfg)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  plain = jax.eval_shape(build_model(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(plain["params"]))
  assert jax.tree.structure(plain["params"]) == jax.tree.structure(nn.meta.unbox(boxed))


def test_mesh_is_set_like_any_field_and_round_trips():
  exp = overrides.apply(
      registry.get("mm2-tiny"),
      [
          "mesh.data=2",
          "mesh.fsdp=2",
          "mesh.tensor=2",
          'mesh.rules=[["batch", ["data", "fsdp"]], ["heads", "tensor"]]',
      ],
  )
  assert (exp.mesh.data, exp.mesh.fsdp, exp.mesh.tensor) == (2, 2, 2)
  assert exp.mesh.rules == (("batch", ("data", "fsdp")), ("heads", "tensor"))
  saved = json.loads(json.dumps(config_lib.to_dict(exp)))
  assert config_lib.from_dict(config_lib.Experiment, saved) == exp
  del saved["mesh"]  # A config.json written before meshes existed.
  assert config_lib.from_dict(config_lib.Experiment, saved).mesh == config_lib.MeshConfig()


@pytest.mark.skipif(jax.device_count() != 1, reason="needs a process with one device")
def test_one_device_needs_no_placement():
  exp = registry.get("mm2-tiny")
  model = build_model(exp.model)
  assert step_lib.make_placement(exp, model, optim.make_optimizer(exp.train)) is None
