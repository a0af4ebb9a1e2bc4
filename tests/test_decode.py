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
import tiny_runs

import kernels_pallas
from mosaics_jax import config as config_lib, load, tokenizers
from mosaics_jax.cli import generate as generate_cli
from mosaics_jax.inference import generate as generate_lib, sampling as sampling_lib
from mosaics_jax.model import cache as cache_lib, families, family as family_lib
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


# The default suite decodes one v1 (two persistent memories), one v2 (both memories), v2 whose
# long-term memory reads selected blocks by mean (near ties flip by rounding, if anything does) and
# Llama token by token; the slow suite adds v1 with one persistent memory, v2 without long-term
# memory, selection by bound and chunks of 3 tokens.
FAST = ("mm1-pmem2", "mm2", "mm2-select-mean", "llama")


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CONFIGS)]
)
@pytest.mark.parametrize("chunk", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_decoding_gives_the_full_forward(name, chunk):
  """Teacher forcing: prefill + decode in chunks of 1 or 3 tokens equals the full forward at every
  position of both rows, in float32 within 1e-5 of the logits' scale."""
  cfg = CONFIGS[name]
  model, params = tiny_runs.params_near_init(cfg)
  tokens, segment_ids = _stream()
  if cfg.family == "mm1":  # The full forward of v1 is bounded by block_size: a longer one.
    model_full = families.build_model(dataclasses.replace(cfg, block_size=T))
  else:
    model_full = model
  full = _forward(model_full, params, tokens, segment_ids)
  decoded = _decode(model, params, tokens, segment_ids, chunk)
  scale = np.abs(full).max()
  np.testing.assert_allclose(decoded, full, atol=1e-5 * scale, rtol=0)


# Llama in the default suite: every family reads its stored pairs with the same `attend_pairs`.
@pytest.mark.parametrize(
    "name", ["llama", *(pytest.param(n, marks=pytest.mark.slow) for n in ("mm2", "mm2-select"))]
)
def test_long_streams_read_their_pairs_block_by_block(name):
  """300 tokens: the decode reads the stored pairs in blocks of 128 slots, only those below the
  chunk (or, selecting, its selected blocks of 4); the logits are still the full forward's."""
  cfg = CONFIGS[name]
  model, params = tiny_runs.params_near_init(cfg)
  tokens = np.asarray(jax.random.randint(jax.random.key(8), (2, 300), 0, 50), np.int32)
  segment_ids = np.zeros_like(tokens)
  segment_ids[1, 200:] = 1
  full = _forward(model, params, tokens, segment_ids)
  decoded = _decode(model, params, tokens, segment_ids, chunk=40, prompts=(140, 100))
  np.testing.assert_allclose(decoded, full, atol=1e-5 * np.abs(full).max(), rtol=0)


def test_decoding_with_gates_past_float32_gives_the_full_forward():
  """v2's input gates scaled to hundreds and thousands (exp overflows float32 past 88): the cache
  carries the gated recurrence as a state and its log-scale, so decoding stays finite and equal to
  the full forward, which rescales the same way."""
  model, params = tiny_runs.params_near_init(CONFIGS["mm2"])
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: 3000 * x if "w_g" in jax.tree_util.keystr(path) else x, params
  )
  tokens, segment_ids = _stream()
  full = _forward(model, params, tokens, segment_ids)
  decoded = _decode(model, params, tokens, segment_ids, 1)
  assert np.isfinite(full).all() and np.isfinite(decoded).all()
  np.testing.assert_allclose(decoded, full, atol=1e-5 * np.abs(full).max(), rtol=0)


@functools.cache  # One compiled function per model, shared by the tests of a worker.
def _apply(model):
  """The model's apply with a cache, compiled."""
  return jax.jit(lambda p, t, c, n: model.apply({"params": p}, t, cache=c, lengths=n))


def test_a_cache_fed_past_its_max_len_raises():
  """A cache for 8 tokens fed one token at a time: the first 8 are the full forward's, the 9th
  raises, naming the length it would reach and max_len (it used to wrap around silently)."""
  model, params = tiny_runs.params_near_init(CONFIGS["llama"])
  tokens = np.asarray(jax.random.randint(jax.random.key(9), (1, 12), 0, 50), np.int32)
  full = _forward(model, params, tokens, None)
  apply, one = _apply(model), np.ones((1,), np.int32)
  cache = model.init_cache(1, 8)
  for t in range(8):
    logits, cache = apply(params, tokens[:, t : t + 1], cache, one)
    np.testing.assert_allclose(logits[0, 0], full[0, t], atol=1e-5 * np.abs(full).max())
  with pytest.raises(ValueError, match=r"row 0 would hold 9 tokens, past the cache's max_len 8"):
    model.apply({"params": params}, tokens[:, 8:9], cache=cache)


# Every family's decoder (v1 has its own; v2 and Llama share one), and block selection (blocks of
# 4: 8 slots are 2 blocks).
@pytest.mark.parametrize(
    "name",
    [
        "mm1-pmem2",
        "llama",
        *(pytest.param(n, marks=pytest.mark.slow) for n in ("mm2", "mm2-select")),
    ],
)
def test_every_family_refuses_a_chunk_past_max_len(name):
  model, params = tiny_runs.params_near_init(CONFIGS[name])
  tokens = jnp.ones((2, 9), jnp.int32)
  error = r"row 1 would hold 9 tokens, past the cache's max_len 8: it holds 0 and the chunk adds 9"
  with pytest.raises(ValueError, match=error):
    model.apply(
        {"params": params}, tokens, cache=model.init_cache(2, 8), lengths=jnp.asarray([8, 9])
    )


def test_under_jit_a_row_past_max_len_is_flagged_nan_and_checked():
  """Under jit the lengths are not known: a row that goes past max_len is flagged (for good), its
  logits are NaN, and `cache.check` raises; the other row goes on as the full forward."""
  model, params = tiny_runs.params_near_init(CONFIGS["llama"])
  tokens = np.asarray(jax.random.randint(jax.random.key(10), (2, 9), 0, 50), np.int32)
  full = _forward(model, params, tokens, None)
  apply = _apply(model)
  cache = model.init_cache(2, 8)
  _, cache = apply(params, tokens[:, :6], cache, np.asarray([6, 3], np.int32))
  cache_lib.check(cache)  # Both rows fit.
  right = np.stack([tokens[0, 6:9], tokens[1, 3:6]])
  logits, cache = apply(params, right, cache, np.asarray([3, 3], np.int32))
  assert np.asarray(cache.stream.overflow).tolist() == [True, False]
  assert np.isnan(logits[0]).all()
  np.testing.assert_allclose(logits[1], full[1, 3:6], atol=1e-5 * np.abs(full).max())
  error = r"row 0 went past the cache's max_len 8: it holds 9 tokens"
  with pytest.raises(ValueError, match=error):
    cache_lib.check(cache)
  logits, cache = apply(params, tokens[:, 6:8], cache, np.asarray([0, 2], np.int32))
  assert np.asarray(cache.stream.overflow).tolist() == [True, False]
  assert np.isnan(logits[0]).all() and not np.isnan(logits[1]).any()
  with pytest.raises(ValueError, match=error):  # Outside jit too.
    model.apply({"params": params}, tokens[:, :1], cache=cache, lengths=jnp.zeros((2,), jnp.int32))


def test_a_cache_of_rings_alone_has_no_length_limit():
  """v2 without long-term memory keeps a ring of its window's 5 pairs: a cache for 8 tokens takes
  14, the full forward's logits; one for 3 tokens (a ring cut to 3) stops at 3."""
  model, params = tiny_runs.params_near_init(CONFIGS["mm2-no-ltm"])
  tokens, _ = _stream()
  full = _forward(model, params, tokens, None)
  apply, one = _apply(model), np.ones((2,), np.int32)
  cache = model.init_cache(2, 8)
  assert cache.max_len is None
  for t in range(14):
    logits, cache = apply(params, tokens[:, t : t + 1], cache, one)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5 * np.abs(full).max())
  cache_lib.check(cache)
  with pytest.raises(ValueError, match="would hold 4 tokens, past the cache's max_len 3"):
    model.apply({"params": params}, tokens[:, :4], cache=model.init_cache(2, 3))


@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_a_cache_dtype_must_be_floating(dtype):
  """An integer cache would truncate keys and values (the logits were off by 3.5)."""
  model = families.build_model(CONFIGS["llama"])
  with pytest.raises(ValueError, match=f"floating dtype, got {dtype}"):
    model.init_cache(1, 8, dtype)


def test_decoding_selects_the_forward_blocks_when_block_means_nearly_tie():
  """Blocks of 64 keys whose means differ by a few float32 ulps: block 0 holds 1 and 63 keys of
  2^-24, whose sum rounds by the order of the adds; block 1 holds one key of 1 + 2^-20. Queries of
  block 2 choose one of the two by mean: token by token through the cache they choose the block
  the forward chooses, as their outputs show (block 0's values are +1, block 1's -1)."""
  size, length, prompt = 64, 136, 128
  selection = kernels_pallas.BlockSelection(blocks=1, block_size=size, recent=1)
  band = family_lib.Band(lo=1, hi=None, selection=selection)
  k = np.zeros((1, length, 1, 4), np.float32)
  k[0, 0, 0, 0] = 1.0
  k[0, 1:size, 0, 0] = 2.0**-24
  k[0, size, 0, 0] = 1.0 + 2.0**-20
  v = np.zeros((1, length, 1, 1), np.float32)
  v[0, :size], v[0, size : 2 * size] = 1.0, -1.0
  q = np.zeros_like(k)
  q[..., 0] = 1.0
  retrieve = functools.partial(kernels_pallas.retrieve_selected, selection=selection)
  forward = np.asarray(retrieve(q, k, v, lo=1, hi=None, segment_ids=None))
  # From t = 129 on, blocks 0 and 1 compete (block 2 is the recent one): block 0 wins.
  assert forward[0, prompt + 1 :, 0, 0].min() > 0.5
  slots = cache_lib.capacity(band, length)
  cache = cache_lib.empty_memory(
      1, slots, 1, 4, 1, jnp.float32, pending=False, key_state=False, selection=selection
  )

  @functools.partial(jax.jit, static_argnames="fresh")
  def step(cache, q, k, v, positions, fresh):
    zeros = jnp.zeros_like(positions)
    chunk = cache_lib.Chunk(
        positions=positions,
        doc_positions=positions,
        segment_ids=zeros,
        starts=positions == 0,
        lengths=jnp.full((1,), positions.shape[1], jnp.int32),
        doc_starts=zeros,
        fresh=fresh,
    )
    return cache_lib.step(q, k, v, cache, chunk, band, retrieve)

  decoded = []
  for start, stop in [(0, prompt), *((t, t + 1) for t in range(prompt, length))]:
    part = lambda x, start=start, stop=stop: x[:, start:stop]
    positions = np.arange(start, stop, dtype=np.int32)[None]
    y, cache = step(cache, part(q), part(k), part(v), positions, fresh=start == 0)
    decoded.append(np.asarray(y))
  np.testing.assert_allclose(np.concatenate(decoded, axis=1), forward, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mm2", "mm1", "llama"])
def test_bfloat16_decoding_stays_close(name):
  """In bfloat16 the cache holds bfloat16 pairs: the logits stay within 5% of the scale."""
  cfg = dataclasses.replace(CONFIGS[name], dtype="bfloat16")
  _, params = tiny_runs.params_near_init(CONFIGS[name])  # Parameters are float32 in either dtype.
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
  model, params = tiny_runs.params_near_init(cfg)
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
  model, params = tiny_runs.params_near_init(CONFIGS["llama"])
  generator = generate_lib.Generator(model)
  free = generator(params, [[1, 2, 3], [4]], 10)
  stop = free[0][2]  # A token row 0 produces: it ends row 0 at its first occurrence.
  stopped = generator(params, [[1, 2, 3], [4]], 10, stop_tokens=[stop])
  assert len(stopped[0]) <= 3
  for full_row, row in zip(free, stopped):
    ends = [i for i, t in enumerate(full_row) if t == stop]
    assert row == (full_row[: ends[0] + 1] if ends else full_row)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
  model, params = tiny_runs.params_near_init(CONFIGS["mm2"])
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
  model, params = tiny_runs.params_near_init(CONFIGS["llama"])
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
  model, params = tiny_runs.params_near_init(CONFIGS["llama"])
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
  model, params = tiny_runs.params_near_init(cfg)
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
