"""The memory plan of `mosaics-info --mesh`: per-device shards as the rules say, from shapes."""

from __future__ import annotations

import json
import math
import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mosaics_jax import build_model, config as config_lib, overrides, registry, sharding
from mosaics_jax.analysis import flops, memory_plan
from mosaics_jax.cli import info

FAMILIES = ("mm1-tiny", "mm2-tiny", "llama-tiny", "gpt2-tiny")
MESH_222 = {"data": 2, "fsdp": 2, "tensor": 2}


def _boxed_params(name: str):
  model = build_model(registry.get(name).model)
  return jax.eval_shape(
      lambda: model.init_boxed(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  )


def _shard_elements(names, shape, rules, axis_sizes) -> int:
  """Elements of one shard by the documented rule semantics, independently of flax and jax: in
  order, a logical name takes its rule's mesh axes unless the array already uses one of them."""
  splits = [1] * len(names)
  used: set[str] = set()
  for logical, axes in rules:
    axes = [axes] if isinstance(axes, str) else list(axes or ())
    if logical in names and splits[names.index(logical)] == 1 and not used & set(axes):
      splits[names.index(logical)] = math.prod(axis_sizes[a] for a in axes)
      used |= set(axes)
  assert all(n % s == 0 for n, s in zip(shape, splits)), (names, shape)
  return math.prod(n // s for n, s in zip(shape, splits))


@pytest.mark.parametrize("name", FAMILIES)
def test_parameter_bytes_are_the_sum_of_the_shards(name):
  """On (data=2, fsdp=2, tensor=2) each parameter holds its shard: e.g. (embed, mlp) a quarter."""
  rules = config_lib.DEFAULT_AXIS_RULES
  leaves = jax.tree_util.tree_leaves(
      _boxed_params(name), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  expected = sum(
      4 * _shard_elements(tuple(leaf.names), leaf.value.shape, rules, MESH_222) for leaf in leaves
  )
  whole = sum(4 * math.prod(leaf.value.shape) for leaf in leaves)
  plan = memory_plan.plan(registry.get(name), MESH_222)
  assert plan.param_bytes == expected
  assert whole / 4 <= plan.param_bytes < whole / 2  # Matrices are split 4 ways, norms are whole.
  assert plan.gradient_bytes == plan.param_bytes
  assert plan.device_batch == registry.get(name).train.batch_size // 4


def test_an_embed_mlp_matrix_holds_a_quarter():
  ffn = _boxed_params("mm2-tiny")["layer_0"]["ffn"]["w1"]["kernel"]
  assert tuple(ffn.names) == ("embed", "mlp")
  elements = _shard_elements(ffn.names, ffn.value.shape, config_lib.DEFAULT_AXIS_RULES, MESH_222)
  assert elements * 4 == math.prod(ffn.value.shape)


@pytest.mark.parametrize("name", ("mm2-tiny", "llama-tiny"))
def test_one_device_holds_every_parameter(name, capsys):
  assert info.main([name, "--json", "--mesh", "data=1,fsdp=1,tensor=1"]) == 0
  out = json.loads(capsys.readouterr().out)
  plan = out["memory_plan"]
  assert plan["devices"] == 1 and plan["params"] == out["params"]
  assert plan["bytes_per_device"]["parameters"] == 4 * out["params"]


@pytest.mark.parametrize("mesh", ({}, MESH_222))
def test_adamw_state_is_two_moments(mesh):
  plan = memory_plan.plan(registry.get("mm2-tiny"), mesh)
  # mu and nu like the parameters, plus int32 step counts (Adam's and the schedule's).
  assert 2 * plan.param_bytes < plan.optimizer_bytes <= 2 * plan.param_bytes + 16


def test_gradient_accumulation_keeps_an_accumulator():
  experiment = overrides.override(registry.get("mm2-tiny"), "train.grad_accum", 2)
  plan = memory_plan.plan(experiment, MESH_222)
  assert plan.gradient_bytes == 2 * plan.param_bytes
  assert plan.device_batch == experiment.train.batch_size // 2 // 4


@pytest.mark.parametrize("remat", (False, True))
def test_v2_activations_grow_linearly_in_batch_and_context(remat):
  experiment = overrides.override(registry.get("mm2-tiny"), "model.remat", remat)
  act = lambda b, t: memory_plan.plan(experiment, {}, batch=b, context=t).activation_bytes
  base = act(2, 512)
  assert act(4, 512) == 2 * base
  assert act(2, 1024) == 2 * base
  assert act(4, 2048) == 8 * base


def test_remat_keeps_one_layer_and_the_block_inputs():
  experiment = overrides.override(registry.get("mm2-tiny"), "model.num_layers", 8)
  plain = dict(memory_plan.plan(experiment, {}).activations)
  rematted = dict(
      memory_plan.plan(overrides.override(experiment, "model.remat", True), {}).activations
  )
  layer = rematted["one layer's saved tensors, recomputed"]
  assert plain["saved tensors, 8 layers"] == 8 * layer
  assert rematted["block inputs, 8 layers (remat)"] < layer


@pytest.mark.parametrize("chunk", (16, 48, 128, 1000))
def test_a_chunked_loss_plans_one_chunks_logits(chunk):
  """The logits line holds the final norm's input and output [b, t, m] and one chunk's logits and
  loss gradient [b, min(chunk, t), v]: the logits' part shrinks by t / chunk, the total with it."""
  experiment = registry.get("mm2-tiny")
  b, t, m, v = 8, 128, experiment.model.width, experiment.model.vocab_size
  assert (experiment.train.batch_size, experiment.data.seq_len, experiment.model.dtype) == (
      b,
      t,
      "float32",
  )
  whole = memory_plan.plan(experiment, {})
  chunked = memory_plan.plan(overrides.override(experiment, "train.loss_chunk", chunk), {})
  line = "final norm, logits, loss gradient"
  norms = 2 * b * t * m * 4
  logits = b * t * v * (4 + 4 + 4)  # Output, its float32 copy, its gradient.
  assert dict(whole.activations)[line] == norms + logits
  assert dict(chunked.activations)[line] == norms + logits * min(chunk, t) // t
  assert whole.total_bytes - chunked.total_bytes == logits - logits * min(chunk, t) // t
  assert f"loss in chunks of {chunk} tokens" in memory_plan.format_plan(chunked)
  assert "loss unchunked" in memory_plan.format_plan(whole)


POLICIES = typing.get_args(config_lib.RematPolicy)


@pytest.mark.parametrize("name", FAMILIES)
def test_remat_policies_order_activations_and_flops(name):
  """Saving more keeps more and recomputes less: "full" keeps the least, "none" the most."""
  experiment = registry.get(name)
  bytes_, flops_ = {}, flops.step_flops(experiment.model, 1024)
  for policy in POLICIES:
    e = overrides.override(experiment, "model.remat_policy", policy)
    bytes_[policy] = memory_plan.plan(e, {}).activation_bytes
  for low, high in (
      ("full", "save_retrieval"),
      ("full", "save_dots"),
      ("save_retrieval", "save_dots_and_retrieval"),
      ("save_dots", "save_dots_and_retrieval"),
      ("save_dots_and_retrieval", "none"),
  ):
    assert bytes_[low] < bytes_[high], (low, high, bytes_)
    assert flops_[low] > flops_[high] or high == "none", (low, high, flops_)
  # Everything but elementwise work is saved: nothing counted is recomputed.
  assert flops_["save_dots_and_retrieval"] == pytest.approx(flops_["none"])


def test_llama_saved_outputs_and_step_flops_by_hand():
  """Llama's projections are q, k, v, o (width each) and the SwiGLU's w1, w3 (ffn) and w2
  (width); its retrieval output is [b, t, width], with two float32 row statistics per head past
  one block. A step is the forward, twice it backward, and what the policy recomputes."""
  experiment = overrides.override(registry.get("llama-tiny"), "model.num_layers", 3)
  model, b, t = experiment.model, experiment.train.batch_size, 512
  m, f, h, n, v = model.width, model.ffn_width, model.num_heads, model.num_layers, model.vocab_size
  terms = lambda policy: dict(
      memory_plan.plan(
          overrides.override(experiment, "model.remat_policy", policy), {}, context=t
      ).activations
  )
  assert (
      terms("save_dots")["projection outputs, 3 layers (saved)"] == n * b * t * (5 * m + 2 * f) * 4
  )
  retrieval = n * (b * t * m * 4 + 2 * b * t * h * 4)
  assert terms("save_retrieval")["retrieval outputs, 3 layers (saved)"] == retrieval
  both = terms("save_dots_and_retrieval")
  assert both["retrieval outputs, 3 layers (saved)"] == retrieval
  assert "projection outputs, 3 layers (saved)" not in terms("save_retrieval")

  context = 1024
  dots = n * 2 * (4 * m * m + 3 * m * f)
  attention = n * 2 * 2 * m * (context + 1) / 2  # Each query reads itself and what precedes it.
  forward = dots + attention + 2 * m * v  # And the classifier.
  step = flops.step_flops(model, context)
  assert step["none"] == pytest.approx(3 * forward)
  assert step["full"] == pytest.approx(3 * forward + dots + attention)
  assert step["save_retrieval"] == pytest.approx(3 * forward + dots)
  assert step["save_dots"] == pytest.approx(3 * forward + attention)
  # A chunked loss recomputes the classifier's forward, whatever the policy.
  chunked = flops.step_flops(model, context, loss_chunk=128)
  assert all(chunked[p] == pytest.approx(step[p] + 2 * m * v) for p in step)


def test_info_prints_the_policy_and_its_step_flops(capsys):
  sets = ["--set", "model.remat_policy=save_retrieval"]
  assert info.main(["mm2-tiny", "--mesh", "fsdp=2", *sets]) == 0
  out = capsys.readouterr().out
  assert "remat on (save_retrieval)" in out and "retrieval outputs, 2 layers (saved)" in out
  assert "(this run: save_retrieval)" in out and "* save_retrieval" in out
  assert info.main(["mm2-tiny", "--json", *sets]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["remat_policy"] == "save_retrieval"
  assert set(report["step_flops_per_token"]) == set(POLICIES)
  assert info.main(["mm2-tiny", "--set", "model.remat=true", "model.remat_policy=save_dots"]) == 2
  assert "conflicts with remat_policy 'save_dots'" in capsys.readouterr().err


@pytest.mark.slow
def test_mm2_large_on_256_devices_from_shapes_only(capsys):
  """This process has one device: planning for 256 allocates nothing on them."""
  assert info.main(["mm2-large", "--mesh", "dcn_data=2,fsdp=128"]) == 0
  out = capsys.readouterr().out
  assert "on 256 devices" in out and "total" in out
  plan = memory_plan.plan(registry.get("mm2-large"), {"dcn_data": 2, "fsdp": 128})
  assert plan.axis_sizes == {"data": 2, "fsdp": 128, "tensor": 1}
  assert plan.device_batch == 1024 // 256
  # Matrices are split 128 ways over fsdp and replicated over data; norms are whole.
  assert plan.params * 4 / 128 <= plan.param_bytes < plan.params * 4 / 120
  assert plan.total_bytes > plan.activation_bytes > 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("dta=2", "unknown mesh axis 'dta'; did you mean data?"),
        ("data", "NAME=SIZE pairs"),
        ("data=two", "mesh size data='two' is not an integer"),
        ("data=2,data=4", "'data' is given twice"),
        ("", "NAME=SIZE pairs"),
    ],
)
def test_bad_mesh_strings_are_clear_errors(text, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    memory_plan.parse_mesh(text)


@pytest.mark.parametrize("size", (0, -1))
def test_mesh_sizes_must_be_given(size, capsys):
  assert info.main(["mm2-tiny", "--mesh", f"data=2,fsdp={size}"]) == 2
  assert f"mesh size fsdp={size} must be an integer >= 1" in capsys.readouterr().err


def test_non_divisible_parameters_are_errors_naming_them():
  with pytest.raises(sharding.ShardingError) as error:
    memory_plan.plan(registry.get("mm2-tiny"), {"fsdp": 3})
  message = str(error.value)
  assert "(64, 256)" in message and "'embed'" in message and "'fsdp' of size 3" in message
  assert "classifier/kernel" in message


def test_non_divisible_batch_is_an_error(capsys):
  assert info.main(["mm2-tiny", "--mesh", "data=16"]) == 2
  assert "micro-batch 8 is not divisible" in capsys.readouterr().err


def test_json_has_a_plan_only_with_a_mesh(capsys):
  info.main(["mm2-tiny", "--json"])
  assert "memory_plan" not in json.loads(capsys.readouterr().out)
  info.main(["mm2-tiny", "--json", "--mesh", "fsdp=2", "--batch", "4", "--context", "64"])
  plan = json.loads(capsys.readouterr().out)["memory_plan"]
  assert (plan["global_batch"], plan["context"], plan["device_batch"]) == (4, 64, 2)


def test_info_takes_overrides(capsys):
  assert info.main(["mm2-tiny", "--mesh", "fsdp=2", "--set", "model.remat=true"]) == 0
  assert "remat on" in capsys.readouterr().out
  assert info.main(["mm2-tiny", "--set", "model.widht=3"]) == 2
  assert "unknown key 'widht'" in capsys.readouterr().err
