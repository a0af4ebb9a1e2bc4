"""The GPT-2 family against nanoGPT's own `GPT` (nanoMosaics' gpt_model.py) and its checkpoints.

The official code is read from ../shared/official/nanoMosaics (never copied here); its models are
randomly initialised, their weights perturbed so that no bias is zero and no scale one, and their
logits compared with ours on the same weights, both ways of the port.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

# Imported after the skip: the port needs torch.
from mosaics_jax import config as config_lib, load, overrides, registry  # noqa: E402
from mosaics_jax.analysis import flops, memory_plan  # noqa: E402
from mosaics_jax.analysis.bench_train import synthetic_batch  # noqa: E402
from mosaics_jax.cli import port as port_cli  # noqa: E402
from mosaics_jax.inference import generate as generate_lib  # noqa: E402
from mosaics_jax.model import families  # noqa: E402
from mosaics_jax.port import nanogpt, nanomosaics, pretrained  # noqa: E402
from mosaics_jax.train import optim, step as step_lib  # noqa: E402

OFFICIAL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "official" / "nanoMosaics"
TOLERANCE = 1e-5  # Max abs logit difference, float32.
TINY = dict(vocab_size=65, num_layers=2, width=32, num_heads=4, block_size=16)


@pytest.fixture(scope="module")
def gpt_model():
  """nanoMosaics' gpt_model module (nanoGPT's GPT)."""
  if not OFFICIAL.is_dir():
    pytest.skip(f"the official code is not at {OFFICIAL}")
  sys.path.insert(0, str(OFFICIAL))
  try:
    import gpt_model  # pylint: disable=import-outside-toplevel

    yield gpt_model
  finally:
    sys.path.remove(str(OFFICIAL))


def _official(gpt_model, cfg: config_lib.GPT2Config, seed: int, noise: float):
  """nanoGPT's GPT of `cfg` as nanoGPT initialises it, every weight then perturbed; eval mode."""
  torch.manual_seed(seed)
  args = nanogpt.model_args(cfg)
  model = gpt_model.GPT(gpt_model.GPTConfig(**args)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(noise * torch.randn_like(p))
  return model


def _their_logits(model, tokens: np.ndarray) -> np.ndarray:
  """nanoGPT's logits at every position (with targets, GPT.forward gives them all)."""
  idx = torch.as_tensor(tokens, dtype=torch.long)
  with torch.no_grad():
    logits, _ = model(idx, targets=torch.zeros_like(idx))
  return logits.numpy()


def _our_params(cfg: config_lib.GPT2Config, seed: int, noise: float = 0.1):
  """Our init, every parameter perturbed as `_official` perturbs nanoGPT's."""
  model = families.build_model(cfg)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return model, tree.unflatten(
      [p + noise * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  )


def _our_logits(model, params, tokens, segment_ids=None) -> np.ndarray:
  segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
  return np.asarray(model.apply({"params": params}, jnp.asarray(tokens), segment_ids))


def _same(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _check_both_ways(gpt_model, cfg: config_lib.GPT2Config, seq_len: int, noise: float) -> None:
  """Logits of ours and nanoGPT's on one's weights ported to the other, each way; weights perturbed
  by `noise` (less at larger sizes: logits stay small enough for 1e-5 to be float32 rounding)."""
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, seq_len))
  # Ours -> nanoGPT: its strict load of our export gives our logits.
  model, params = _our_params(cfg, seed=1, noise=noise)
  official = _official(gpt_model, cfg, seed=2, noise=noise)
  official.load_state_dict(nanogpt.to_nanogpt(cfg, params)["model"], strict=True)
  diff = np.abs(_our_logits(model, params, tokens) - _their_logits(official, tokens)).max()
  assert diff <= TOLERANCE, ("ours -> nanoGPT", cfg.bias, diff)
  # nanoGPT -> ours, as train.py saves it from a torch.compile'd model.
  official = _official(gpt_model, cfg, seed=3, noise=noise)
  checkpoint = {
      "model": {"_orig_mod." + n: x for n, x in official.state_dict().items()},
      "model_args": nanogpt.model_args(cfg),
      "iter_num": 5,
      "best_val_loss": 1.5,
  }
  read = nanogpt.from_nanogpt(checkpoint)
  assert read.config == cfg and read.iter_num == 5 and read.best_val_loss == 1.5
  diff = np.abs(_our_logits(model, read.params, tokens) - _their_logits(official, tokens)).max()
  assert diff <= TOLERANCE, ("nanoGPT -> ours", cfg.bias, diff)


@pytest.mark.parametrize("bias", [True, False])
def test_logits_equal_nanogpt_both_ways(gpt_model, bias):
  _check_both_ways(gpt_model, config_lib.GPT2Config(**TINY, bias=bias), seq_len=16, noise=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("bias", [True, False])
def test_logits_equal_nanogpt_at_shakespeare_char_size(gpt_model, bias):
  cfg = dataclasses.replace(registry.get("gpt2-shakespeare-char").model, dropout=0.0, bias=bias)
  _check_both_ways(gpt_model, cfg, seq_len=cfg.block_size, noise=0.02)


def test_nanogpt_checkpoint_round_trip_through_the_cli(gpt_model, tmp_path):
  cfg = config_lib.GPT2Config(**TINY, bias=True, dropout=0.1)
  model, params = _our_params(cfg, seed=4)
  pretrained.save_exported(tmp_path / "ours", cfg, params, step=9)
  out = tmp_path / "ckpt.pt"
  assert port_cli.main(["to-torch", "--format", "nanogpt", str(tmp_path / "ours"), str(out)]) == 0
  checkpoint = torch.load(out, weights_only=True)
  assert checkpoint["model_args"] == dict(
      n_layer=2, n_head=4, n_embd=32, vocab_size=65, block_size=16, bias=True, dropout=0.1
  )
  assert checkpoint["iter_num"] == 9 and checkpoint["config"]["model_type"] == "gpt"
  # What nanoGPT's train.py does on resume: a strict load, and its optimizer's state.
  official = gpt_model.GPT(gpt_model.GPTConfig(**checkpoint["model_args"])).eval()
  official.load_state_dict(checkpoint["model"], strict=True)
  optimizer = official.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
  optimizer.load_state_dict(checkpoint["optimizer"])
  tokens = np.random.default_rng(5).integers(0, 65, (2, 16))
  diff = np.abs(_our_logits(model, params, tokens) - _their_logits(official, tokens)).max()
  assert diff <= TOLERANCE
  argv = ["from-torch", "--format", "nanogpt", str(out), str(tmp_path / "back")]
  assert port_cli.main(argv) == 0
  back = load(tmp_path / "back")
  assert back.config == cfg and back.step == 9 and _same(back.params, params)


def test_nanogpt_format_refuses_other_models(tmp_path, capsys):
  mm1 = config_lib.MosaicV1Config(**TINY, pmem_size=8)
  with pytest.raises(nanogpt.layout.PortError, match="use --format nanomosaics"):
    nanogpt.config_from_model_args(nanomosaics.model_args(mm1))
  params = families.build_model(mm1).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  pretrained.save_exported(tmp_path / "mm1", mm1, params["params"])
  argv = ["to-torch", "--format", "nanogpt", str(tmp_path / "mm1"), str(tmp_path / "x.pt")]
  assert port_cli.main(argv) == 2
  assert "holds GPT-2 (gpt2) models, this one is mm1" in capsys.readouterr().err


def test_packed_documents_equal_separate_runs():
  cfg = config_lib.GPT2Config(**TINY)
  model, params = _our_params(cfg, seed=6)
  rng = np.random.default_rng(7)
  lengths = [5, 9, 2]
  documents = [rng.integers(0, 65, (1, n)) for n in lengths]
  packed = _our_logits(
      model, params, np.concatenate(documents, axis=1), np.repeat([0, 1, 2], lengths)[None]
  )
  starts = np.cumsum([0, *lengths])
  for doc, start, end in zip(documents, starts, starts[1:]):
    alone = _our_logits(model, params, doc)
    np.testing.assert_allclose(packed[:, start:end], alone, atol=1e-6, rtol=0)


@pytest.mark.slow  # The default suite decodes token by token (greedy generation).
def test_decoding_in_chunks_equals_the_full_forward():
  """Through the decode cache, chunk by chunk, positions continue the cache's and restart in each
  document: the logits are the full forward's."""
  cfg = config_lib.GPT2Config(**TINY)
  model, params = _our_params(cfg, seed=10)
  tokens = np.random.default_rng(11).integers(0, 65, (2, 16))
  segment_ids = np.stack([np.repeat([0, 1], [7, 9]), np.zeros(16, int)])
  full = _our_logits(model, params, tokens, segment_ids)
  cache = model.init_cache(2, 16)
  decoded = []
  for start in range(0, 16, 5):
    part = slice(start, start + 5)
    logits, cache = model.apply(
        {"params": params},
        jnp.asarray(tokens[:, part]),
        jnp.asarray(segment_ids[:, part]),
        cache=cache,
    )
    decoded.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(decoded, axis=1), full, atol=1e-5, rtol=0)


def test_greedy_generation_is_the_full_forward_argmax():
  cfg = config_lib.GPT2Config(**TINY)
  model, params = _our_params(cfg, seed=8)
  prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7]]
  new = generate_lib.Generator(model)(params, prompts, 6)
  forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens)[0])
  for prompt, tokens in zip(prompts, new):
    assert len(tokens) == 6
    sequence = list(prompt)
    for token in tokens:
      # The logits at t do not depend on what follows t: one compiled forward of 16 positions.
      logits = forward(jnp.asarray([sequence + [0] * (16 - len(sequence))]))
      assert int(jnp.argmax(logits[len(sequence) - 1])) == token
      sequence.append(token)


def test_inputs_past_block_size_are_named_errors(tmp_path):
  cfg = config_lib.GPT2Config(**TINY)
  model, params = _our_params(cfg, seed=9)
  long = np.zeros((1, 17), np.int32)
  with pytest.raises(ValueError, match="sequence length 17 exceeds the model's block_size 16"):
    model.apply({"params": params}, jnp.asarray(long))
  pretrained.save_exported(tmp_path / "gpt2", cfg, params)
  exported = load(tmp_path / "gpt2")
  with pytest.raises(ValueError, match="exceeds the model's block_size 16"):
    exported.logits(long)
  # Scoring and generation run through the decode cache, which holds block_size tokens a row.
  with pytest.raises(ValueError, match="past the cache's max_len 16"):
    exported.token_losses([np.zeros(17, np.int32)])
  with pytest.raises(ValueError, match="past the cache's max_len 16"):
    generate_lib.Generator(model)(params, [[1, 2, 3, 4]], 13)
  assert len(exported.token_losses([np.zeros(16, np.int32)])[0]) == 15
  with pytest.raises(
      config_lib.ConfigError, match="context 129 exceeds the model's block_size 128"
  ):
    memory_plan.plan(registry.get("gpt2-tiny"), {}, context=129)


def test_flops_count_the_matmuls_and_attention_not_the_position_lookup():
  cfg = registry.get("gpt2-shakespeare-char").model
  m, n, v, context = cfg.width, cfg.num_layers, cfg.vocab_size, 256
  # Per layer: c_attn 3 m^2, c_proj m^2, c_fc and its c_proj 4 m^2 each; the tied classifier v m.
  matmul_weights = n * 12 * m * m + v * m
  report = flops.count(cfg, context)
  assert report.flops_per_token == 2 * matmul_weights + n * 2 * 2 * m * context / 2
  # No biases: each layer's matrices and two LayerNorm scales; wte, wpe (block_size rows), ln_f.
  params = n * (12 * m * m + 2 * m) + v * m + cfg.block_size * m + m
  assert report.params == params == families.param_count(cfg) == 10_745_088


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gpt2_tiny_trains(dropout):
  exp = registry.get("gpt2-tiny")
  exp = overrides.apply(
      exp,
      ["data.seq_len=32", "train.batch_size=4", "train.warmup_steps=1", f"model.dropout={dropout}"],
  )
  model = families.build_model(exp.model)
  tx = optim.make_optimizer(exp.train)
  state = step_lib.init_state(exp, model, tx)
  step = jax.jit(step_lib.make_train_step(exp, model, tx))
  batch = synthetic_batch(exp, np.random.default_rng(0))
  losses = []
  for _ in range(8):  # One batch again and again: the loss falls.
    state, stats = step(state, batch)
    losses.append(float(stats["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5, losses
