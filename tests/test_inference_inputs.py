"""Inputs at the edges of inference's range give the right tokens or an error, never numbers
computed from nothing: token ids outside the vocabulary are named (value, row, position) by every
entry point, and temperatures too small for float32 sample the greedy tokens."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaics_jax import config as config_lib, load, tokenizers
from mosaics_jax.cli import generate as generate_cli
from mosaics_jax.inference import generate as generate_lib, prefill, sampling as sampling_lib, score
from mosaics_jax.model import families
from mosaics_jax.port import pretrained

TEXT = "hello world, said the model."
CHARS = tokenizers.CharTokenizer.from_text(TEXT)
CONFIG = config_lib.LlamaConfig(
    vocab_size=CHARS.vocab_size, num_layers=2, width=32, num_heads=4, ffn_width=48
)
# Below float32's smallest normal (~1.2e-38: 0 or subnormal in float32), at it, and above it.
TINY_TEMPERATURES = [1e-45, 1e-40, 1.2e-38, 1e-37, 1e-30]


@functools.cache
def _model():
  """The model and its initial parameters (one compiled init: an eager one takes seconds)."""
  model = families.build_model(CONFIG)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
  return model, init(jax.random.key(0))


def _pretrained() -> pretrained.Pretrained:
  model, params = _model()
  return pretrained.Pretrained(config=CONFIG, model=model, params=params, step=None)


@pytest.mark.parametrize(
    "bad, error",
    [
        (
            5000,
            r"row 1 of the tokens holds token id 5000, outside the model's vocabulary \[0, 15\)",
        ),
        (-1, r"row 1 of the tokens holds token id -1, .* at position 2"),
    ],
)
def test_logits_name_a_token_id_outside_the_vocabulary(bad, error):
  lm = _pretrained()
  tokens = np.array([[1, 2, 3, 4], [5, 6, bad, 7]], np.int32)
  with pytest.raises(ValueError, match=error):
    lm.logits(tokens)
  tokens[1, 2] = CHARS.vocab_size - 1
  assert np.isfinite(lm.logits(tokens)).all()


def test_every_entry_point_names_the_id_and_its_position():
  model, params = _model()
  v = CHARS.vocab_size
  at = lambda name, i, j: rf"{name} holds token id {i}, outside .* \[0, {v}\), at position {j}$"
  with pytest.raises(ValueError, match=at("prompt 1", v, 1)):
    generate_lib.Generator(model)(params, [[1, 2], [3, v]], 2)
  scorer = score.Scorer(model, chunk=8, batch_size=2)
  with pytest.raises(ValueError, match=at("row 0", -3, 2)):
    scorer.token_losses(params, [[1, 2, -3]])
  with pytest.raises(ValueError, match=at("the context", v + 1, 0)):
    scorer.continuation_scores(params, [v + 1], [[1]])
  with pytest.raises(ValueError, match=at("continuation 1", -1, 1)):
    scorer.continuation_scores(params, [1], [[1], [2, -1]])


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_a_tiny_temperature_samples_the_argmax(temperature):
  """Logits of hundreds, whose quotients by the temperature overflow: the argmax of every row,
  with and without top-k and top-p, for several keys."""
  logits = 300 * jax.random.normal(jax.random.key(2), (16, 40))
  want = np.argmax(np.asarray(logits), axis=-1)
  for sampling in (
      sampling_lib.Sampling(temperature),
      sampling_lib.Sampling(temperature, top_k=5),
      sampling_lib.Sampling(temperature, top_p=0.5),
  ):
    for seed in range(3):
      got = sampling_lib.sample(logits, jax.random.key(seed), sampling)
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("temperature", [1e6, 1e30])
def test_a_huge_temperature_samples_uniformly(temperature):
  """4000 draws over 6 tokens: each within 0.04 of 1/6 (the standard error is below 0.006)."""
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
  sampling = sampling_lib.Sampling(temperature)
  keys = jax.random.split(jax.random.key(3), 4000)
  draws = jax.vmap(lambda key: sampling_lib.sample(logits, key, sampling)[0])(keys)
  np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=6) / 4000, 1 / 6, atol=0.04)


def test_an_infinite_temperature_is_named():
  with pytest.raises(ValueError, match="temperature must be >= 0 and finite.*got inf"):
    sampling_lib.Sampling(float("inf"))


@pytest.mark.slow  # The CLI test below goes through a Generator too.
def test_a_generator_at_a_tiny_temperature_generates_the_greedy_tokens():
  model, params = _model()
  generator = generate_lib.Generator(model)
  prompts = [[1, 2, 3, 4, 5], [6, 7]]
  greedy = generator(params, prompts, 10)
  for temperature in TINY_TEMPERATURES:
    sampling = sampling_lib.Sampling(temperature)
    assert generator(params, prompts, 10, sampling=sampling, seed=1) == greedy, temperature


def test_mosaics_generate_at_a_tiny_temperature_writes_the_greedy_text(tmp_path, capsys):
  _, params = _model()
  path = pretrained.save_exported(tmp_path / "model", CONFIG, params, tokenizer=CHARS)
  greedy = load(path).generate_text("hello", 12)
  args = [str(path), "--prompt", "hello", "--max-new-tokens", "12", "--temperature"]
  assert generate_cli.main([*args, "100"]) == 0
  assert capsys.readouterr().out != greedy + "\n"  # A high temperature samples.
  for temperature in ("1e-45", "1e-40"):
    assert generate_cli.main([*args, temperature]) == 0
    assert capsys.readouterr().out == greedy + "\n"


def test_chunked_calls_into_a_cache_too_small_for_the_rows_raise():
  # Generator and Scorer size their caches for the rows; a cache fed past its max_len under jit
  # is only flagged, so the one chunk loop they share checks it on the host.
  model, params = _model()
  scorer = score.Scorer(model, chunk=4, batch_size=2)
  tokens = np.ones((2, 8), np.int32)
  segment_ids = np.zeros_like(tokens)
  lengths = np.array([8, 3], np.int32)
  outs, _ = scorer._chunks(
      params, tokens, segment_ids, lengths, outputs=prefill.at_last, capacity=8
  )
  assert np.isfinite(np.asarray(outs[-1])).all()
  with pytest.raises(ValueError, match=r"row 0 went past the cache's max_len 4: it holds 8 tokens"):
    scorer._chunks(params, tokens, segment_ids, lengths, outputs=prefill.at_last, capacity=4)
