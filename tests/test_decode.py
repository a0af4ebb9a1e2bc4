"""Decoding with caches: prefill and token-by-token decode give the full forward's logits (every
family, ragged prompts, document boundaries, past the short-term window, m and the training
context), greedy generation is the full forward's argmax, sampling is reproducible and unbiased,
and bad input is named."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaics_jax import config as config_lib, load, tokenizers
from mosaics_jax.cli import generate as generate_cli
from mosaics_jax.inference import generate as generate_lib, sampling as sampling_lib
from mosaics_jax.model import cache as cache_lib, families
from mosaics_jax.port import pretrained

TINY = dict(vocab_size=50, num_layers=2, width=32, num_heads=4)
CONFIGS = {
    # block_size 16: decoding goes past the training context (nanoMosaics refuses that).
    "mm1": config_lib.MosaicV1Config(**TINY, block_size=16, pmem_size=16),
    "mm1-pmem2": config_lib.MosaicV1Config(**TINY, block_size=16, pmem_size=8, pmem_count=2),
    # A window of 6 and m = 3: a 30-token stream goes far past both.
    "mm2": config_lib.MosaicV2Config(
        **TINY, ffn_width=48, short_term_window=6, long_term_delay=3, long_term_delay_range=(2, 5)
    ),
    "mm2-no-ltm": config_lib.MosaicV2Config(
        **TINY, ffn_width=48, short_term_window=6, long_term_memory=False
    ),
    "llama": config_lib.LlamaConfig(**TINY, ffn_width=48),
}
# The long-term memory reads its 1 newest block of 4 pairs and the best older one by bound, or
# its 2 newest and the 2 best by mean.
CONFIGS["mm2-select"] = dataclasses.replace(
    CONFIGS["mm2"],
    long_term_select_blocks=1,
    long_term_select_block_size=4,
    long_term_select_summary="bound",
)
CONFIGS["mm2-select-mean"] = dataclasses.replace(
    CONFIGS["mm2"],
    long_term_select_blocks=2,
    long_term_select_block_size=4,
    long_term_select_recent=2,
)
T = 30
PROMPTS = (11, 4)  # Prompt lengths of the two rows.


@functools.cache  # Shared by the tests of one worker: params are immutable arrays.
def _random_params(cfg, seed=0):
  """Every parameter drawn at random around its init, so no scalar sits at a special value."""
  model = families.build_model(cfg)

  @jax.jit  # One compiled init: an eager one takes seconds.
  def draw():
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, noisy)

  return model, draw()


def _forward(model, params, tokens, segment_ids):
  """The full forward's logits, compiled."""
  apply = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s))
  return np.asarray(apply(params, tokens, segment_ids))


def _stream():
  """[2, T] tokens and segment ids; row 0 has a document boundary inside its prompt (at 7) and
  another while decoding (at 20)."""
  tokens = np.asarray(jax.random.randint(jax.random.key(7), (2, T), 0, 50), np.int32)
  segment_ids = np.zeros((2, T), np.int32)
  segment_ids[0, 7:] = 1
  segment_ids[0, 20:] = 2
  return tokens, segment_ids


def _decode(model, params, tokens, segment_ids, chunk: int, dtype="float32", prompts=PROMPTS):
  """Logits [2, T, v] from a prefill of each row's prompt, then chunks of `chunk` tokens."""
  apply = jax.jit(lambda p, t, s, c, n: model.apply({"params": p}, t, s, cache=c, lengths=n))
  T = tokens.shape[1]  # noqa: N806 - the stream's length, as everywhere here.
  cache = model.init_cache(2, T, dtype)
  width = max(prompts)
  lengths = np.asarray(prompts, np.int32)
  # Right-padded prompts; the padding is a document of its own.
  prompt = np.where(np.arange(width) < lengths[:, None], tokens[:, :width], 0)
  prompt_ids = np.where(np.arange(width) < lengths[:, None], segment_ids[:, :width], 99)
  logits, cache = apply(params, prompt, prompt_ids, cache, lengths)
  out = np.zeros((2, T, logits.shape[-1]), np.float32)
  for row, n in enumerate(prompts):
    out[row, :n] = logits[row, :n]
  position = lengths.copy()
  while position.min() < T:
    steps = np.minimum(chunk, T - position)
    index = np.minimum(position[:, None] + np.arange(chunk), T - 1)
    chunk_tokens, chunk_ids = (np.take_along_axis(x, index, axis=1) for x in (tokens, segment_ids))
    logits, cache = apply(params, chunk_tokens, chunk_ids, cache, steps.astype(np.int32))
    for row in range(2):
      out[row, position[row] : position[row] + steps[row]] = logits[row, : steps[row]]
    position += steps
  return out


# The default suite decodes one v1 (two persistent memories), one v2 (both memories), one v2 whose
# long-term memory reads selected blocks and Llama token by token; the slow suite adds v1 with one
# persistent memory, v2 without long-term memory, v2 selecting with mean summaries and chunks of 3
# tokens.
FAST = ("mm1-pmem2", "mm2", "mm2-select", "llama")


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CONFIGS)]
)
@pytest.mark.parametrize("chunk", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_decoding_gives_the_full_forward(name, chunk):
  """Teacher forcing: prefill + decode in chunks of 1 or 3 tokens equals the full forward at every
  position of both rows, in float32 within 1e-5 of the logits' scale."""
  cfg = CONFIGS[name]
  model, params = _random_params(cfg)
  tokens, segment_ids = _stream()
  if cfg.family == "mm1":  # The full forward of v1 is bounded by block_size: a longer one.
    model_full = families.build_model(dataclasses.replace(cfg, block_size=T))
  else:
    model_full = model
  full = _forward(model_full, params, tokens, segment_ids)
  decoded = _decode(model, params, tokens, segment_ids, chunk)
  scale = np.abs(full).max()
  np.testing.assert_allclose(decoded, full, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize(
    "name", ["mm2", "llama", pytest.param("mm2-select", marks=pytest.mark.slow)]
)
def test_long_streams_read_their_pairs_block_by_block(name):
  """300 tokens: the decode reads the stored pairs in blocks of 128 slots, only those below the
  chunk (or, selecting, its selected blocks of 4); the logits are still the full forward's."""
  cfg = CONFIGS[name]
  model, params = _random_params(cfg)
  tokens = np.asarray(jax.random.randint(jax.random.key(8), (2, 300), 0, 50), np.int32)
  segment_ids = np.zeros_like(tokens)
  segment_ids[1, 200:] = 1
  full = _forward(model, params, tokens, segment_ids)
  decoded = _decode(model, params, tokens, segment_ids, chunk=40, prompts=(140, 100))
  np.testing.assert_allclose(decoded, full, atol=1e-5 * np.abs(full).max(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mm2", "mm1", "llama"])
def test_bfloat16_decoding_stays_close(name):
  """In bfloat16 the cache holds bfloat16 pairs: the logits stay within 5% of the scale."""
  cfg = dataclasses.replace(CONFIGS[name], dtype="bfloat16")
  _, params = _random_params(CONFIGS[name])  # Parameters are float32 in either dtype.
  model = families.build_model(cfg)
  tokens, segment_ids = _stream()
  full_cfg = dataclasses.replace(cfg, block_size=T) if cfg.family == "mm1" else cfg
  full = _forward(families.build_model(full_cfg), params, tokens, segment_ids)
  decoded = _decode(model, params, tokens, segment_ids, chunk=1, dtype="bfloat16")
  scale = np.abs(full).max()
  np.testing.assert_allclose(decoded, full, atol=0.05 * scale, rtol=0)


@pytest.mark.parametrize(
    "name", ["mm2", *(pytest.param(n, marks=pytest.mark.slow) for n in ("mm1", "llama"))]
)
def test_greedy_generation_is_the_full_forward_argmax(name):
  cfg = CONFIGS[name]
  model, params = _random_params(cfg)
  prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7]]
  new = generate_lib.Generator(model)(params, prompts, 12)
  full_cfg = dataclasses.replace(cfg, block_size=64) if cfg.family == "mm1" else cfg
  full_model = families.build_model(full_cfg)
  # One compiled forward of 20 positions: the logits at t do not depend on what follows t.
  forward = jax.jit(lambda tokens: full_model.apply({"params": params}, tokens)[0])
  for prompt, tokens in zip(prompts, new):
    assert len(tokens) == 12
    sequence = list(prompt)
    for token in tokens:
      logits = forward(jnp.asarray([sequence + [0] * (20 - len(sequence))]))
      assert int(jnp.argmax(logits[len(sequence) - 1])) == token
      sequence.append(token)


def test_stop_tokens_end_each_row_and_are_included():
  model, params = _random_params(CONFIGS["llama"])
  generator = generate_lib.Generator(model)
  free = generator(params, [[1, 2, 3], [4]], 10)
  stop = free[0][2]  # A token row 0 produces: it ends row 0 at its first occurrence.
  stopped = generator(params, [[1, 2, 3], [4]], 10, stop_tokens=[stop])
  assert len(stopped[0]) <= 3
  for full_row, row in zip(free, stopped):
    ends = [i for i, t in enumerate(full_row) if t == stop]
    assert row == (full_row[: ends[0] + 1] if ends else full_row)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
  model, params = _random_params(CONFIGS["mm2"])
  generator = generate_lib.Generator(model)
  prompts = [[1, 2, 3], [4, 5]]
  hot = sampling_lib.Sampling(temperature=1.5, top_p=0.9)
  first = generator(params, prompts, 8, sampling=hot, seed=4)
  assert generator(params, prompts, 8, sampling=hot, seed=4) == first
  assert generator(params, prompts, 8, sampling=hot, seed=5) != first
  top1 = sampling_lib.Sampling(temperature=2.0, top_k=1)
  assert generator(params, prompts, 8, sampling=top1, seed=4) == generator(params, prompts, 8)


def test_temperature_one_samples_follow_the_softmax():
  """20000 draws of one step: each token's frequency within 0.015 of its softmax probability
  (the standard error is below 0.0036), with a fixed seed."""
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
  draws = jax.vmap(
      lambda key: sampling_lib.sample(logits, key, sampling_lib.Sampling(temperature=1.0))[0]
  )(jax.random.split(jax.random.key(0), 20000))
  frequencies = np.bincount(np.asarray(draws), minlength=6) / 20000
  np.testing.assert_allclose(frequencies, jax.nn.softmax(logits[0]), atol=0.015)


def test_top_p_and_top_k_never_draw_outside_their_set():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(1), 2000)
  draw = lambda s: np.asarray(jax.vmap(lambda k: sampling_lib.sample(logits, k, s)[0])(keys))
  assert set(draw(sampling_lib.Sampling(1.0, top_p=0.75)).tolist()) == {0, 1}
  assert set(draw(sampling_lib.Sampling(1.0, top_k=3)).tolist()) == {0, 1, 2}


def test_the_cache_without_long_term_memory_does_not_grow():
  model = families.build_model(CONFIGS["mm2-no-ltm"])
  short, long = (cache_lib.nbytes(model.init_cache(2, n)) for n in (64, 65536))
  assert short == long
  with_ltm = families.build_model(CONFIGS["mm2"])
  assert cache_lib.nbytes(with_ltm.init_cache(2, 65536)) > cache_lib.nbytes(
      with_ltm.init_cache(2, 64)
  )


@pytest.mark.parametrize(
    "prompts, kwargs, error",
    [
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1, 50]], {}, "prompt 0 holds token id 50, outside the model's vocabulary"),
        ([[1, -2]], {}, "token id -2"),
        ([[1, 2, 3]], {"max_len": 4}, "needs max_len >= 8"),
        ([[1]], {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ([[1]], {"stop_tokens": [77]}, r"stop tokens \[77\] are outside"),
    ],
)
def test_bad_input_is_named(prompts, kwargs, error):
  model, params = _random_params(CONFIGS["llama"])
  kwargs = {"max_new_tokens": 5, **kwargs}
  with pytest.raises(ValueError, match=error):
    generate_lib.Generator(model)(params, prompts, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": 0}, "top_k must be an int >= 1"),
    ],
)
def test_bad_sampling_is_named(kwargs, error):
  with pytest.raises(ValueError, match=error):
    sampling_lib.Sampling(**kwargs)


# The API of loaded models and mosaics-generate ---------------------------------------------------

TEXT = "hello world, said the model."


def _export(directory, tokenizer=True):
  """An exported llama with random parameters and a char tokenizer of TEXT."""
  model, params = _random_params(CONFIGS["llama"])
  chars = tokenizers.CharTokenizer.from_text(TEXT) if tokenizer else None
  pretrained.save_exported(directory, CONFIGS["llama"], params, tokenizer=chars)
  return directory


def test_generate_text_uses_the_run_tokenizer(tmp_path):
  lm = load(_export(tmp_path))
  assert lm.decode(lm.encode("hello")) == "hello"
  text = lm.generate_text("hello", 10)
  assert len(text) == 10  # One character per token, and no stop token.
  assert lm.decode(lm.generate([lm.encode("hello")], 10)[0]) == text
  pair = lm.generate_text(["hello", "world"], 5, temperature=1.0, seed=2)
  assert isinstance(pair, list) and [len(t) for t in pair] == [5, 5]
  with pytest.raises(ValueError, match="characters outside the vocabulary.*'x'"):
    lm.encode("xyz")


def test_a_model_without_tokenizer_takes_ids(tmp_path):
  lm = load(_export(tmp_path, tokenizer=False))
  assert len(lm.generate([[1, 2, 3]], 4)[0]) == 4
  with pytest.raises(ValueError, match="has no tokenizer"):
    lm.generate_text("hello", 4)


def test_mosaics_generate_streams_text_and_sums_up(tmp_path, capsys):
  path = _export(tmp_path / "model")
  args = [str(path), "--max-new-tokens", "12", "--temperature", "0"]
  assert generate_cli.main([*args, "--prompt", "hello"]) == 0
  out, err = capsys.readouterr()
  assert out == load(path).generate_text("hello", 12) + "\n"
  assert "5 prompt tokens x 1, 12 new tokens; prefill" in err and "decode" in err
  (tmp_path / "prompt.txt").write_text("hello")
  assert generate_cli.main([*args, "--prompt-file", str(tmp_path / "prompt.txt")]) == 0
  assert capsys.readouterr().out == out
  assert generate_cli.main([*args, "--prompt", "hello", "--num-samples", "2"]) == 0
  out = capsys.readouterr().out
  assert "--- sample 0" in out and "--- sample 1" in out


@pytest.mark.parametrize(
    "args, error",
    [
        (["--prompt", "hello", "--top-p", "2"], r"top_p must be in \(0, 1\]"),
        (["--prompt", "hello", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", "xyz"], "outside the vocabulary"),
        (["--prompt", ""], "prompt 0 is empty"),
        (["--prompt", "hello", "--max-len", "3"], "needs max_len >= "),
        (["--prompt-file", "/no/such/file"], "cannot read the prompt file"),
    ],
)
def test_mosaics_generate_names_bad_input(tmp_path, capsys, args, error):
  path = _export(tmp_path / "model")
  assert generate_cli.main([str(path), *args]) == 2
  assert re.search(error, capsys.readouterr().err)


@pytest.mark.parametrize("flag", ["--prompt", "--prompt-file"])
def test_mosaics_generate_refuses_a_prompt_given_twice(tmp_path, capsys, flag):
  with pytest.raises(SystemExit) as exit_info:
    generate_cli.main([str(tmp_path), flag, "a", flag, "b"])
  assert exit_info.value.code == 2
  assert f"{flag} is given more than once" in capsys.readouterr().err


@pytest.mark.slow
def test_long_term_selection_reads_fewer_pairs_and_all_of_them_with_a_large_k():
  """The same parameters: selecting 1 + 1 blocks of 4 changes the logits of a 30-token stream;
  selecting more blocks than there are gives the full memory's."""
  cfg = CONFIGS["mm2"]
  model, params = _random_params(cfg)
  tokens, segment_ids = _stream()
  full = _forward(model, params, tokens, segment_ids)
  few = families.build_model(CONFIGS["mm2-select"])
  every = families.build_model(
      dataclasses.replace(CONFIGS["mm2-select"], long_term_select_blocks=T)
  )
  assert not np.allclose(_forward(few, params, tokens, segment_ids), full, atol=1e-3)
  np.testing.assert_allclose(
      _forward(every, params, tokens, segment_ids), full, atol=1e-5 * np.abs(full).max(), rtol=0
  )
