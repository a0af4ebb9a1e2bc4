"""Weight porting: JAX and PyTorch logits agree, round trips are exact, bad weights are named.

v1 is compared with `mosaics_jax.torch_models.MemoryMosaic`, written from the equations, not with
nanoMosaics' own class (no network in CI, and its code is not vendored); the nanoMosaics format
test checks the exported names and shapes against nanoMosaics' (read off its model.py) and a
strict load. The Library variant's PyTorch model is compared with ours and with the official
`StackAssoMem` (tests/test_library.py's, skipped where the official code is absent).
"""

from __future__ import annotations

import functools
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

# Imported after the skips: these need torch and safetensors.
import test_library  # noqa: E402 - the Library's cases and the official StackAssoMem
from test_library import stack_asso_mem  # noqa: E402, F401 - a fixture

from mosaics_jax import build_model, checkpoints, config as config_lib, load  # noqa: E402
from mosaics_jax.cli import port as port_cli  # noqa: E402
from mosaics_jax.port import (  # noqa: E402
    layout as port,
    library,
    nanomosaics,
    pretrained,
    torch_models,
)

TINY = dict(vocab_size=50, num_layers=2, width=32, num_heads=4)
CONFIGS = {
    "mm1-pmem1": config_lib.MosaicV1Config(**TINY, block_size=64, pmem_size=16),
    "mm1-pmem2": config_lib.MosaicV1Config(
        **TINY, block_size=64, pmem_size=16, pmem_count=2, bias=False
    ),
    "mm2": config_lib.MosaicV2Config(**TINY, ffn_width=48, short_term_window=6, long_term_delay=3),
    "mm2-no-ltm": config_lib.MosaicV2Config(
        **TINY, ffn_width=48, short_term_window=6, long_term_memory=False
    ),
    "llama": config_lib.LlamaConfig(**TINY, ffn_width=48),
    "gpt2": config_lib.GPT2Config(**TINY, block_size=64),
}
T = 37  # Not a multiple of anything.
TOKENS = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, T))
# Three documents in the first row, one in the second.
SEGMENTS = np.stack([np.repeat([0, 1, 2], [10, 20, 7]), np.zeros(T, int)])
TOLERANCE = 1e-5  # Max abs logit difference, float32.


def _random_params(cfg: config_lib.ModelConfig, seed: int) -> port.Params:
  """Every parameter drawn at random, in ranges where exp(10 s) scales stay moderate."""
  rng = np.random.default_rng(seed)
  ranges = {
      "coef": (0.0, 1.0),
      "gamma": (0.0, 1.0),
      "key_scale": (0.0, 0.1),
      "val_scale": (-0.1, 0.1),
      "out_scale": (-0.1, 0.1),
      "leaky_key_beta": (-0.3, 0.3),
      "theta": (-1.0, 1.0),
      "theta0": (0.0, 1.0),
      "theta1": (-1.0, 1.0),
      "theta_a": (-0.5, 0.5),
  }
  flat = {}
  for path, shape in port.param_shapes(cfg).items():
    name = path[-1]
    if name in ranges:
      x = rng.uniform(*ranges[name], shape)
    elif name == "kernel":
      x = rng.normal(0.0, shape[0] ** -0.5, shape)
    elif name in ("P_k", "P_v"):
      x = rng.normal(0.0, shape[-1] ** -0.5, shape)
    elif name == "scale":
      x = 1.0 + rng.normal(0.0, 0.2, shape)
    else:  # Biases, and embeddings: v1's is also its LM head, logits of order 10.
      x = rng.normal(0.0, 0.3 if name == "bias" else 0.5, shape)
    flat[path] = jnp.asarray(x, jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


def _same(a: port.Params, b: port.Params) -> bool:
  fa, fb = (flax.traverse_util.flatten_dict(x) for x in (a, b))
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def _torch_logits(cfg, params, segment_ids=None, tokens=TOKENS, **kwargs) -> np.ndarray:
  model = torch_models.build(cfg)
  torch_models.load_weights(
      model, {n: torch.tensor(x) for n, x in port.to_torch(cfg, params).items()}
  )
  segments = None if segment_ids is None else torch.as_tensor(segment_ids)
  with torch.no_grad():
    return model(torch.as_tensor(tokens), segments, **kwargs).numpy()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request):
  cfg = CONFIGS[request.param]
  params = _random_params(cfg, seed=len(request.param))
  return cfg, params, jax.jit(build_model(cfg).apply, static_argnames="ltm_delay")


def test_logits_match_pytorch(family):
  cfg, params, apply = family
  cases = [(None, {}), (SEGMENTS, {})]
  if isinstance(cfg, config_lib.MosaicV2Config) and cfg.long_term_memory:
    cases.append((SEGMENTS, {"ltm_delay": 5}))  # The delay as an argument, not the config's.
  for segments, kwargs in cases:
    ours = apply(
        {"params": params},
        jnp.asarray(TOKENS),
        None if segments is None else jnp.asarray(segments),
        **kwargs,
    )
    theirs = _torch_logits(cfg, params, segments, **kwargs)
    diff = np.abs(np.asarray(ours) - theirs).max()
    assert diff <= TOLERANCE, (cfg.family, segments is not None, kwargs, diff)


# The Library variant on test_library's configs (those that take other code paths than the default
# of the Library's own tests) and weights moved off their initial values: random ones of the ranges
# above make its softmaxes too sharp to compare.
LIBRARY_CASES = ["post_ln_conv3_linearconv_untied", "attn_only", "lowrlinearconv_keys", "v_shift_2"]


@functools.cache
def _library(case: str):
  cfg = test_library._config(case)
  params = test_library._perturbed(test_library._init(build_model(cfg)), seed=4)
  return cfg, params, test_library._tokens(cfg, seed=5)


@pytest.mark.parametrize("case", LIBRARY_CASES)
def test_library_logits_match_pytorch(case):
  cfg, params, tokens = _library(case)
  # Three documents in the first row, one in the second.
  length = tokens.shape[1]
  segments = np.stack([np.repeat([0, 1, 2], [5, 11, length - 16]), np.zeros(length, int)])
  for segment_ids in (None, segments):
    ours = test_library._ours(cfg, params, tokens, segment_ids)
    diff = np.abs(ours - _torch_logits(cfg, params, segment_ids, tokens)).max()
    assert diff <= TOLERANCE, (segment_ids is not None, diff)


@pytest.mark.parametrize("case", LIBRARY_CASES)
def test_library_pytorch_model_is_the_officials(stack_asso_mem, case):  # noqa: F811
  cfg, params, tokens = _library(case)
  state = library.to_library(cfg, params)["model"]
  official = test_library._official(stack_asso_mem, library.model_args(cfg), seed=0)
  official.load_state_dict(state, strict=True)
  model = torch_models.build(cfg)
  model.load_state_dict(state, strict=True)  # The official names, tied head included.
  with torch.no_grad():
    ours = model(torch.as_tensor(tokens)).numpy()
  assert np.abs(ours - test_library._official_logits(official, tokens)).max() <= TOLERANCE


def test_round_trips_are_exact(family, tmp_path):
  cfg, params, _ = family
  assert _same(port.from_torch(cfg, port.to_torch(cfg, params)), params)
  pretrained.save_exported(tmp_path / "flax", cfg, params, step=7)
  assert port_cli.main(["to-safetensors", str(tmp_path / "flax"), str(tmp_path / "pt")]) == 0
  assert port_cli.main(["from-safetensors", str(tmp_path / "pt"), str(tmp_path / "back")]) == 0
  back = load(tmp_path / "back")
  assert back.config == cfg and back.step == 7 and _same(back.params, params)
  # The PyTorch directory is what the PyTorch models read, and gives the same logits.
  model = torch_models.from_directory(tmp_path / "pt")
  with torch.no_grad():
    theirs = model(torch.as_tensor(TOKENS)).numpy()
  assert np.abs(back.logits(TOKENS) - theirs).max() <= TOLERANCE


# nanoMosaics' parameter names and shapes for n_layer=1, n_head=2, n_embd=8, vocab_size=11,
# block_size=16, pmem_count=3, pmem_size=5, bias=True (from nanoMosaics/mosaic_model.py).
NANO_CONFIG = dict(
    n_layer=1,
    n_head=2,
    n_embd=8,
    vocab_size=11,
    block_size=16,
    bias=True,
    dropout=0.0,
    pmem_count=3,
    pmem_size=5,
)


def _nano_names() -> dict[str, tuple[int, ...]]:
  names = {
      "mosaic.wte.weight": (11, 8),
      "lm_head.weight": (11, 8),
      "mosaic.ln_f.weight": (8,),
      "mosaic.ln_f.bias": (8,),
  }
  h = "mosaic.h.0."
  for ln in ("ln_1", "ln_2"):
    names |= {h + ln + ".weight": (8,), h + ln + ".bias": (8,)}
  for mem in ("attn", "mlp"):
    k = h + mem + ".k_featurizer."
    names |= {
        k + "W_k.weight": (8, 8),
        k + "W_k.bias": (8,),
        k + "key_scale": (1, 2, 1, 1),
        k + "leaky_avg.leaky_key_beta": (1, 2, 1, 1),
        k + "leaky_avg.coef": (16, 16),
        h + mem + ".c_proj.weight": (8, 8),
        h + mem + ".c_proj.bias": (8,),
    }
  v = h + "attn.v_featurizer."
  names |= {
      v + "W_v.weight": (8, 8),
      v + "W_v.bias": (8,),
      v + "coef": (1, 2, 1, 1),
      v + "val_scale": (1, 2, 1, 1),
      h + "attn.bias": (1, 1, 16, 16),
  }
  names |= {
      h + "mlp.P_k": (3, 1, 2, 5, 4),
      h + "mlp.P_v": (3, 1, 2, 5, 4),
      h + "mlp.out_scale": (1, 2, 1, 1),
  }
  return names


def test_nanomosaics_checkpoints(tmp_path):
  cfg = nanomosaics.config_from_model_args(NANO_CONFIG)
  params = _random_params(cfg, seed=3)
  checkpoint = nanomosaics.to_nanomosaics(cfg, params, iter_num=12)
  assert {n: tuple(x.shape) for n, x in checkpoint["model"].items()} == _nano_names()
  assert checkpoint["model_args"] == NANO_CONFIG and checkpoint["iter_num"] == 12
  assert "optimizer" in checkpoint  # nanoMosaics' train.py resumes from it.
  torch_models.build(cfg).load_state_dict(checkpoint["model"], strict=True)

  # A torch.compile'd model's names, through the CLI and back.
  checkpoint["model"] = {"_orig_mod." + n: x for n, x in checkpoint["model"].items()}
  torch.save(checkpoint, tmp_path / "ckpt.pt")
  argv = ["from-torch", "--format", "nanomosaics", str(tmp_path / "ckpt.pt"), str(tmp_path / "x")]
  assert port_cli.main(argv) == 0
  exported = load(tmp_path / "x")
  assert exported.config == cfg and exported.step == 12 and _same(exported.params, params)
  argv = ["to-torch", "--format", "nanomosaics", str(tmp_path / "x"), str(tmp_path / "out.pt")]
  assert port_cli.main(argv) == 0
  again = nanomosaics.from_nanomosaics(torch.load(tmp_path / "out.pt", weights_only=True))
  assert again.iter_num == 12 and _same(again.params, params)


def test_load_reads_a_training_workdir(tmp_path):
  cfg = CONFIGS["llama"]
  params = _random_params(cfg, seed=5)
  experiment = config_lib.Experiment(name="port", description="", model=cfg)
  checkpoints.check_or_save_config(tmp_path, experiment, has_checkpoints=False)
  ckpts = checkpoints.Checkpoints(tmp_path / "checkpoints", keep=2)
  for step in (3, 9):
    ckpts.save(step, {"step": jnp.asarray(step), "params": params}, {"position": step})
  ckpts.wait()
  ckpts.close()
  model = load(tmp_path)
  assert model.step == 9 and model.config == cfg and _same(model.params, params)
  logits = model.logits(TOKENS)
  assert isinstance(logits, np.ndarray) and logits.shape == (*TOKENS.shape, cfg.vocab_size)


def test_bad_tensors_are_listed_by_name():
  cfg = CONFIGS["mm2"]
  tensors = port.to_torch(cfg, _random_params(cfg, seed=1))
  del tensors["layer_0.w_o.weight"]
  tensors["layer_0.extra"] = np.zeros(3, np.float32)
  tensors["layer_1.ffn.w2.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(port.PortError) as e:
    port.from_torch(cfg, tensors)
  for text in (
      "missing (1): layer_0.w_o.weight",
      "unexpected (1): layer_0.extra",
      "layer_1.ffn.w2.weight: (3, 3), expected (32, 48)",
  ):
    assert text in str(e.value)


def test_wrong_family_is_refused(tmp_path, capsys):
  llama = CONFIGS["llama"]
  params = _random_params(llama, seed=2)
  with pytest.raises(port.PortError, match="a llama model's, not a mm2 model's"):
    port.from_torch(CONFIGS["mm2"], port.to_torch(llama, params))
  # A Llama export given to the nanoMosaics (v1) format.
  pretrained.save_exported(tmp_path / "llama", llama, params)
  argv = ["to-torch", "--format", "nanomosaics", str(tmp_path / "llama"), str(tmp_path / "x.pt")]
  assert port_cli.main(argv) == 2
  assert "holds Memory Mosaics v1 (mm1) models, this one is llama" in capsys.readouterr().err
  # A config.json of one family over the tensors of another.
  saved = json.loads((tmp_path / "llama" / "config.json").read_text())
  saved["model"] = {"family": "mm2", **config_lib.to_dict(CONFIGS["mm2"])}
  (tmp_path / "llama" / "config.json").write_text(json.dumps(saved))
  with pytest.raises(port.PortError, match="does not fit its mm2 config"):
    load(tmp_path / "llama")
  # nanoMosaics' GPT checkpoints have no persistent memory.
  gpt_args = {k: v for k, v in NANO_CONFIG.items() if not k.startswith("pmem")}
  with pytest.raises(port.PortError, match=r"missing \['pmem_count', 'pmem_size'\].*GPT"):
    nanomosaics.from_nanomosaics({"model": {}, "model_args": gpt_args})
  with pytest.raises(port.PortError, match=r"unknown \['n_kv_head'\]"):
    nanomosaics.config_from_model_args({**NANO_CONFIG, "n_kv_head": 2})


def test_formats(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    port_cli.main(["from-torch", "--format", "keras", "in.pt", str(tmp_path)])
  assert e.value.code == 2 and "invalid choice: 'keras'" in capsys.readouterr().err
