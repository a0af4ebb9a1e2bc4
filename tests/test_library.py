"""The mm1-library family against the official `Library/` package's `StackAssoMem` (the v1 paper's
own Memory Mosaic) and its checkpoints.

The official code is read from ../shared/official/Library (never copied here); its models are
randomly initialised, every weight then perturbed, and their logits compared with ours on the same
weights, both ways of the port. The Library has no packed documents: packing is checked on our
side, against separate runs.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

# Imported after the skip: the port needs torch.
import test_decode  # noqa: E402 - its decoding helpers

import kernels_pallas  # noqa: E402
from mosaics_jax import config as config_lib, registry  # noqa: E402
from mosaics_jax.inference import generate as generate_lib  # noqa: E402
from mosaics_jax.model import families, layers  # noqa: E402
from mosaics_jax.port import layout, library  # noqa: E402

OFFICIAL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "official" / "Library"
TOLERANCE = 1e-5  # Max abs logit difference, float32.
LENGTH = 24
# ICLL's dfa/mm.yaml (RegBench) at a short block_size: the Library builds [block, block] masks.
ICLL = dict(vocab_size=20, num_layers=2, width=128, num_heads=8, block_size=32, pmem_size=448)
TINY = dict(vocab_size=37, num_layers=2, width=32, num_heads=4, block_size=32, pmem_size=16)
CASES = {
    "icll": ICLL,
    # The options the issue names, together, with biases and two persistent memories.
    "post_ln_conv3_linearconv_untied": dict(
        TINY,
        pre_ln=False,
        k_kernel_size=3,
        v_fe_type="linearconv",
        weight_tying=False,
        bias=True,
        pmem_count=2,
    ),
    "attn_only": dict(TINY, attn_only=True),
}
SLOW_CASES = {
    "babistories": dict(
        registry.get("mm1-library-babistories").model.__dict__, vocab_size=512, block_size=32
    ),
    "post_ln": dict(TINY, pre_ln=False),
    "k_kernel_size_3": dict(TINY, k_kernel_size=3),
    "linearconv_values": dict(TINY, v_fe_type="linearconv"),
    "linearconv_values_3": dict(TINY, v_fe_type="linearconv", v_kernel_size=3),
    "untied": dict(TINY, weight_tying=False),
    "lowrlinearconv_keys": dict(TINY, k_fe_type="lowrlinearconv", k_kernel_size=2),
    "v_shift_0": dict(TINY, v_shift=0),
    "v_shift_2": dict(TINY, v_shift=2, v_fe_type="linearconv", v_kernel_size=4),
}
# Decoding: a tied and an untied post-LayerNorm model, vocabulary 50 for test_decode's stream.
DECODE_CASES = {
    "tiny": config_lib.MosaicV1LibraryConfig(**{**TINY, "vocab_size": 50, "block_size": 16}),
    "post_ln_untied": config_lib.MosaicV1LibraryConfig(
        **{**TINY, "vocab_size": 50, "block_size": 16}, pre_ln=False, weight_tying=False, bias=True
    ),
}
ALL_CASES = [
    *CASES,
    *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW_CASES),
]


@pytest.fixture(scope="module")
def stack_asso_mem():
  """The Library's StackAssoMem class."""
  if not OFFICIAL.is_dir():
    pytest.skip(f"the official code is not at {OFFICIAL}")
  sys.path.insert(0, str(OFFICIAL))
  try:
    from memory_mosaics.models import StackAssoMem  # pylint: disable=import-outside-toplevel

    yield StackAssoMem
  finally:
    sys.path.remove(str(OFFICIAL))


def _config(case: str) -> config_lib.MosaicV1LibraryConfig:
  fields = {f.name for f in dataclasses.fields(config_lib.MosaicV1LibraryConfig)}
  kwargs = {**CASES, **SLOW_CASES}[case]
  return config_lib.MosaicV1LibraryConfig(**{k: v for k, v in kwargs.items() if k in fields})


def _official(stack_asso_mem, model_args: dict, seed: int):
  """StackAssoMem as the Library initialises it, every weight then perturbed; eval mode."""
  torch.manual_seed(seed)
  model = stack_asso_mem(**model_args).eval()
  # forward() reads skip_tokens from the config object train.py passes.
  model.config = types.SimpleNamespace(skip_tokens=0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p) * (p.abs().mean() + 0.1))
  return model


def _official_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens), logits_only=True).numpy()


def _ours(config, params, tokens, segment_ids=None) -> np.ndarray:
  model = families.build_model(config)
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens), segment_ids))


def _init(model):
  return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


def _tokens(config, seed: int, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, LENGTH))


def _perturbed(params, seed: int):
  """Every leaf moved off its initial value (biases off 0, scales off 1)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      tree,
      [
          x + 0.1 * jax.random.normal(k, x.shape) * (jnp.abs(x).mean() + 0.1)
          for x, k in zip(leaves, keys)
      ],
  )


@pytest.mark.parametrize("case", ALL_CASES)
def test_library_checkpoints_port_in_with_equal_logits(stack_asso_mem, case, tmp_path):
  config = _config(case)
  args = library.model_args(config)
  official = _official(stack_asso_mem, args, seed=0)
  # train.py saves every argument of its command line: the port reads the constructor's.
  checkpoint = {
      "model": official.state_dict(),
      "optimizer": None,
      "model_args": {**args, "att_shift": 0, "learning_rate": 5e-3, "out_dir": "results"},
      "iter_num": 1234,
  }
  torch.save(checkpoint, tmp_path / "ckpt.pt")
  loaded = library.from_library(torch.load(tmp_path / "ckpt.pt", weights_only=True))
  assert loaded.config == config and loaded.iter_num == 1234
  tokens = _tokens(config, seed=1)
  diff = np.abs(_ours(config, loaded.params, tokens) - _official_logits(official, tokens)).max()
  assert diff < TOLERANCE, f"{case}: max |logit difference| {diff}"


@pytest.mark.parametrize(
    "case", ["icll", *(pytest.param(c, marks=pytest.mark.slow) for c in (*CASES, *SLOW_CASES)[1:])]
)
def test_our_params_export_to_a_strictly_loading_stack_asso_mem(stack_asso_mem, case):
  config = _config(case)
  model = families.build_model(config)
  params = _perturbed(_init(model), 1)
  checkpoint = library.to_library(config, params, iter_num=5)
  official = stack_asso_mem(**checkpoint["model_args"]).eval()
  official.config = types.SimpleNamespace(skip_tokens=0)
  official.load_state_dict(checkpoint["model"], strict=True)
  tokens = _tokens(config, seed=2)
  diff = np.abs(_ours(config, params, tokens) - _official_logits(official, tokens)).max()
  assert diff < TOLERANCE, f"{case}: max |logit difference| {diff}"
  assert checkpoint["iter_num"] == 5 and checkpoint["optimizer"] is None
  # And back: the same params.
  again = library.from_library(checkpoint)
  assert jax.tree.all(jax.tree.map(np.array_equal, again.params, params))


@pytest.mark.parametrize(
    "case", [pytest.param("icll", marks=pytest.mark.slow), "post_ln_conv3_linearconv_untied"]
)
def test_packed_documents_equal_separate_runs(case):
  config = _config(case)
  model = families.build_model(config)
  params = _perturbed(_init(model), 3)
  tokens = _tokens(config, seed=4, batch=1)
  cut = 9
  segment_ids = np.where(np.arange(LENGTH) < cut, 1, 2)[None]
  packed = _ours(config, params, tokens, segment_ids)
  first = _ours(config, params, tokens[:, :cut])
  second = _ours(config, params, tokens[:, cut:])
  np.testing.assert_allclose(packed, np.concatenate([first, second], axis=1), atol=TOLERANCE)


@pytest.mark.parametrize("lo, hi", [(0, None), (1, None), (2, None), (0, 3), (1, 1)])
def test_dropout_on_attention_weights_reads_the_same_pairs(lo, hi):
  """The dense retrieval that takes ic_dropout (and GPT-2's attn_dropout) equals the kernels'
  retrieval without it, band and documents included."""
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 12, 3, 8))
  segment_ids = jnp.asarray([[0] * 5 + [1] * 7, [0] * 12])
  dense = layers.dropped_retrieve(
      q, k, v, lo=lo, hi=hi, segment_ids=segment_ids, dropout=lambda w: w
  )
  fused = kernels_pallas.retrieve(q, k, v, lo=lo, hi=hi, segment_ids=segment_ids, impl="reference")
  np.testing.assert_allclose(dense, fused, atol=1e-6)
  # And its gradients, which training takes.
  cotangent = jax.random.normal(jax.random.key(1), dense.shape)

  def loss(retrieval):
    return lambda q, k, v: jnp.sum(retrieval(q, k, v) * cotangent)

  dense_grads = jax.grad(
      loss(
          lambda q, k, v: layers.dropped_retrieve(
              q, k, v, lo=lo, hi=hi, segment_ids=segment_ids, dropout=lambda w: w
          )
      ),
      argnums=(0, 1, 2),
  )(q, k, v)
  reference_grads = jax.grad(
      loss(
          lambda q, k, v: kernels_pallas.retrieve(
              q, k, v, lo=lo, hi=hi, segment_ids=segment_ids, impl="reference"
          )
      ),
      argnums=(0, 1, 2),
  )(q, k, v)
  for got, want in zip(dense_grads, reference_grads):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_training_applies_both_dropouts():
  config = _config("icll")
  model = families.build_model(config)
  tokens = _tokens(config, seed=5)
  params = _init(model)
  evaluated = _ours(config, params, tokens)
  train = jax.jit(
      lambda key: model.apply(
          {"params": params}, tokens, deterministic=False, rngs={"dropout": key}
      )
  )
  trained = [train(jax.random.key(seed)) for seed in (0, 1)]
  assert all(np.isfinite(t).all() for t in trained)
  assert not np.allclose(trained[0], trained[1]) and not np.allclose(trained[0], evaluated)
  no_dropout = dataclasses.replace(config, ic_dropout=0.0, hd_dropout=0.0)
  again = jax.jit(families.build_model(no_dropout).apply, static_argnames="deterministic")(
      {"params": params}, tokens, deterministic=False
  )
  np.testing.assert_allclose(again, evaluated, atol=1e-6)


@pytest.mark.parametrize("case", ["tiny", pytest.param("post_ln_untied", marks=pytest.mark.slow)])
def test_decoding_gives_the_full_forward(case):
  """Teacher forcing through the decode cache (a prefill, then token by token, a document boundary
  in each phase) equals the full forward; greedy generation is its argmax."""
  config = DECODE_CASES[case]
  model = families.build_model(config)
  params = _perturbed(_init(model), 6)
  tokens, segment_ids = test_decode._stream()
  full = _ours(dataclasses.replace(config, block_size=test_decode.T), params, tokens, segment_ids)
  decoded = test_decode._decode(model, params, tokens, segment_ids, chunk=1)
  np.testing.assert_allclose(decoded, full, atol=TOLERANCE * np.abs(full).max(), rtol=0)
  prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7]]
  for prompt, new in zip(prompts, generate_lib.Generator(model)(params, prompts, 8)):
    sequence = np.asarray([prompt + list(new)])
    logits = _ours(config, params, sequence)[0, len(prompt) - 1 : -1]
    assert list(new) == list(logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs",
    [dict(k_kernel_size=3), dict(v_fe_type="linearconv"), dict(v_shift=2)],
)
def test_decoding_what_the_cache_cannot_hold_is_refused_by_name(kwargs):
  model = families.build_model(config_lib.MosaicV1LibraryConfig(**{**TINY, **kwargs}))
  with pytest.raises(NotImplementedError, match="the mm1-library decode cache takes keys of"):
    model.init_cache(1, 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(skip_tokens=2), "skip_tokens must be 0"),
        (dict(dropout=0.1), "ic_dropout and hd_dropout"),
        (dict(v_kernel_size=3), "'lowrlinearconv' needs v_kernel_size 2"),
        (dict(k_fe_type="lowrlinearconv"), "'lowrlinearconv' needs k_kernel_size 2"),
        (dict(ic_dropout=1.0), "ic_dropout must be in"),
        (dict(v_shift=-1), "v_shift must be >= 0"),
    ],
)
def test_unsupported_options_are_config_errors(kwargs, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.MosaicV1LibraryConfig(**{**TINY, **kwargs})


def test_port_refusals_are_named():
  args = library.model_args(_config("attn_only"))
  with pytest.raises(layout.PortError, match="att_shift=1"):
    library.config_from_model_args({**args, "att_shift": 1})
  with pytest.raises(layout.PortError, match="missing \\['vocab_size'\\]"):
    library.config_from_model_args({"n_layer": 2})
  with pytest.raises(layout.PortError, match="skip_tokens must be 0"):
    library.config_from_model_args({**args, "skip_tokens": 1})
  with pytest.raises(layout.PortError, match="hard-codes .*kernel_beta_max"):
    library.model_args(dataclasses.replace(_config("attn_only"), kernel_beta_max=6.0))
  with pytest.raises(layout.PortError, match="holds Library Memory Mosaics"):
    library.model_args(registry.get("mm1-regbench-cpu").model)
  with pytest.raises(layout.PortError, match="no 'model_args' entry"):
    library.from_library({"model": {}})
  # A tied model's head.weight is its embedding, or not its checkpoint.
  state = {"emb.weight": torch.zeros(3, 2), "head.weight": torch.ones(3, 2)}
  with pytest.raises(layout.PortError, match="unexpected .*head.weight"):
    library.from_library({"model": state, "model_args": args})


def test_regbench_experiment_is_icll_mm_yaml(stack_asso_mem):
  """The ICLL size: the StackAssoMem that mm.yaml builds has our parameter count."""
  config = registry.get("mm1-library-regbench").model
  official = stack_asso_mem(
      vocab_size=20,
      n_embd=128,
      n_head=8,
      n_layer=2,
      pmem_size=7 * 64,
      block_size=8,
      ic_dropout=0.05,
      hd_dropout=0.05,
  )
  assert library.config_from_model_args(
      {**library.model_args(config), "block_size": 8}
  ) == dataclasses.replace(config, block_size=8)
  # The tied classifier is one tensor.
  assert families.param_count(config) == sum(p.numel() for p in official.parameters())


def test_a_model_trained_here_goes_to_the_library_and_back_through_the_cli(
    stack_asso_mem, tmp_path, capsys
):
  # The scenario: train here, `mosaics-port to-torch --format library`, and the official
  # StackAssoMem loads the file strictly and gives our logits; `from-torch` brings it back.
  import tiny_runs  # pylint: disable=import-outside-toplevel

  from mosaics_jax import load  # pylint: disable=import-outside-toplevel
  from mosaics_jax.cli import port as port_cli  # pylint: disable=import-outside-toplevel
  from mosaics_jax.train import loop  # pylint: disable=import-outside-toplevel

  # No dropout: training then takes the fused retrieval (the dropped one has its own tests).
  model = config_lib.MosaicV1LibraryConfig(**TINY, ic_dropout=0.0, hd_dropout=0.0)
  experiment = dataclasses.replace(tiny_runs.tiny(2), model=model)
  loop.train(experiment, tmp_path / "run", progress=False)
  ckpt = tmp_path / "ckpt.pt"
  assert port_cli.main(["to-torch", "--format", "library", str(tmp_path / "run"), str(ckpt)]) == 0
  assert "Library StackAssoMem, iter_num 2" in capsys.readouterr().out
  checkpoint = torch.load(ckpt, weights_only=True)
  official = stack_asso_mem(**checkpoint["model_args"]).eval()
  official.config = types.SimpleNamespace(skip_tokens=0)
  official.load_state_dict(checkpoint["model"], strict=True)
  tokens = _tokens(experiment.model, seed=3)
  ours = load(tmp_path / "run").logits(tokens)
  assert np.abs(ours - _official_logits(official, tokens)).max() < TOLERANCE
  args = ["from-torch", "--format", "library", str(ckpt), str(tmp_path / "back")]
  assert port_cli.main(args) == 0
  np.testing.assert_array_equal(load(tmp_path / "back").logits(tokens), ours)
