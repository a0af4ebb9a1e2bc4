"""Generation: the prompts in one parallel pass (prefill), then new tokens in a loop on device.

    generator = Generator(model)
    new = generator(params, [[5, 9, 2], [7]], max_new_tokens=16, sampling=Sampling(0.8, top_k=40))

Prompts may have different lengths (they are right-padded, each pad its own document, and each
row goes on from its own length). The prefill runs the prompts through the training path of the
model (the retrieval op, the scans) and fills a decode cache; the decode loop is one jitted
`lax.while_loop` that samples a token per row, feeds it back through the cache, and stops when
every row has produced a stop token or `max_new_tokens`. Compiled functions are kept by the
`Generator`, so calls of the same shapes compile once.

On a mesh (`mesh=`), parameters and cache are sharded as their logical axes say (batch over the
data axes, heads over tensor) and the results are those of one device.

Axis legend: b = batch, t = prompt time, n = new tokens, v = vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from mosaics_jax import config as config_lib
from mosaics_jax.inference import placement, prefill, sampling as sampling_lib
from mosaics_jax.model import cache as cache_lib

Prompts = Sequence[Sequence[int]] | np.ndarray
# The new-token slots of a row after it has stopped.
PAD = -1


def pad_prompts(
    prompts: Prompts, vocab_size: int, width: int | None = None
) -> tuple[Int[np.ndarray, "b t"], Int[np.ndarray, "b t"], Int[np.ndarray, " b"]]:
  """(tokens, segment ids, lengths) of ragged prompts right-padded to `width` (default: the
  longest); each row's padding is a document of its own (id 1 after the prompt's 0), so no prompt
  sees it. A fixed width lets prompts of many lengths share one compiled prefill.

  Raises ValueError naming an empty prompt, a token id outside [0, vocab_size), or a prompt longer
  than `width`.
  """
  rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
  if not rows:
    raise ValueError("no prompts: give at least one")
  for i, row in enumerate(rows):
    if row.size == 0:
      raise ValueError(f"prompt {i} is empty: a model needs at least one token to go on from")
    prefill.check_token_ids(row, vocab_size, f"prompt {i}")
  lengths = np.array([row.size for row in rows], np.int32)
  if width is not None and lengths.max() > width:
    raise ValueError(
        f"prompt {int(lengths.argmax())} has {lengths.max()} tokens, more than {width}"
    )
  tokens = np.zeros((len(rows), lengths.max() if width is None else width), np.int32)
  segment_ids = np.ones_like(tokens)
  for i, row in enumerate(rows):
    tokens[i, : row.size] = row
    segment_ids[i, : row.size] = 0
  return tokens, segment_ids, lengths


class Generator(prefill.Chunked):
  """The compiled prefill and decode loop of one model."""

  def __init__(
      self,
      model: nn.Module,
      *,
      mesh: jax.sharding.Mesh | None = None,
      rules: config_lib.AxisRules = config_lib.DEFAULT_AXIS_RULES,
      model_kwargs: dict[str, Any] | None = None,
      prefill_chunk: int | None = None,
  ):
    """`model_kwargs` go to every call of the model (v2's `ltm_delay`). Prompts longer than
    `prefill_chunk` tokens go in chunks of that size, the first through the training path and the
    rest through the cache (default, and at most: the longest input of the model, v1's
    block_size; else whole)."""
    if prefill_chunk is not None and prefill_chunk < 1:
      raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    super().__init__(model, chunk=prefill_chunk, mesh=mesh, rules=rules, model_kwargs=model_kwargs)
    # The cache is donated: the loop updates it in place instead of copying it per dispatch.
    self._decode = jax.jit(
        self._decode_fn,
        static_argnames=("steps", "sampling", "stop"),
        donate_argnames=("cache",),
    )

  def _decode_fn(
      self, params, logits, cache, done, key, first, steps, sampling, stop
  ) -> tuple[Int[Array, "b n"], Float[Array, "b v"], cache_lib.Cache, Array]:
    """`steps` new tokens from step `first` on (fewer when every row is done): (tokens, PAD where
    a row had stopped; the next logits; the cache; which rows are done)."""
    stop_tokens = jnp.asarray(stop, jnp.int32)

    def cond(state):
      step, _, done, _, _ = state
      return (step < steps) & ~jnp.all(done)

    def body(state):
      step, out, done, logits, cache = state
      token = sampling_lib.sample(logits, jax.random.fold_in(key, first + step), sampling)
      out = out.at[:, step].set(jnp.where(done, PAD, token))
      done = done | jnp.isin(token, stop_tokens)
      logits, cache = self._apply(params, token[:, None], None, cache)
      return step + 1, out, done, logits[:, 0], placement.constrain_cache(cache)

    out = jnp.full((logits.shape[0], steps), PAD, jnp.int32)
    state = (jnp.zeros((), jnp.int32), out, done, logits, cache)
    _, out, done, logits, cache = jax.lax.while_loop(cond, body, state)
    return out, logits, cache, done

  def stream(
      self,
      params: Any,
      prompts: Prompts,
      max_new_tokens: int,
      *,
      sampling: sampling_lib.Sampling = sampling_lib.Sampling(),
      seed: int = 0,
      stop_tokens: Sequence[int] = (),
      max_len: int | None = None,
      chunk: int | None = None,
      width: int | None = None,
  ) -> Iterator[np.ndarray]:
    """The new tokens as they come: first an array [batch, 0] once the prompts are in the cache
    (the prefill's end), then arrays [batch, n] of up to `chunk` tokens per dispatch of the decode
    loop (default all at once), PAD where a row has stopped. Arguments as for `__call__`; the
    tokens do not depend on `chunk`."""
    tokens, segment_ids, lengths, max_len = self._check(
        prompts, max_new_tokens, stop_tokens, max_len, width
    )
    chunk = max_new_tokens if chunk is None else chunk
    key = jax.random.key(seed)
    stop = tuple(int(s) for s in stop_tokens)
    with placement.mesh_context(self.mesh, self.rules):
      params = placement.put_params(self.model, params, self.mesh, self.rules, tokens.shape[0])
      logits, cache = self._ends(params, tokens, segment_ids, lengths, capacity=max_len)
      jax.block_until_ready(logits)
      yield np.zeros((len(lengths), 0), np.int32)
      done = jnp.zeros((len(lengths),), bool)
      for first in range(0, max_new_tokens, chunk):
        steps = min(chunk, max_new_tokens - first)
        out, logits, cache, done = self._decode(
            params, logits, cache, done, key, first, steps=steps, sampling=sampling, stop=stop
        )
        cache_lib.check(cache)
        yield np.asarray(out)
        if bool(jnp.all(done)):
          return

  def __call__(
      self,
      params: Any,
      prompts: Prompts,
      max_new_tokens: int,
      *,
      sampling: sampling_lib.Sampling = sampling_lib.Sampling(),
      seed: int = 0,
      stop_tokens: Sequence[int] = (),
      max_len: int | None = None,
      width: int | None = None,
  ) -> list[list[int]]:
    """The new tokens of each prompt, each row ending after its first stop token (included) or
    after `max_new_tokens`.

    Args:
      params: the model's parameters.
      prompts: token-id lists of any lengths, or an int array [batch, seq].
      max_new_tokens: the most tokens to generate per row.
      sampling: greedy by default.
      seed: the random stream of sampling; the same seed gives the same tokens.
      stop_tokens: ids that end a row.
      max_len: tokens a row's cache holds (prompt and new tokens); default the longest prompt
        plus max_new_tokens. Memory Mosaics generate past their training context.
      width: the padded width of the prompts (default the longest): calls with prompts of
        different lengths but one width and max_len share their compiled functions.

    Raises:
      ValueError: an empty prompt, a token id outside the vocabulary, max_new_tokens < 1, or a
        prompt that does not fit max_len.
    """
    parts = self.stream(
        params,
        prompts,
        max_new_tokens,
        sampling=sampling,
        seed=seed,
        stop_tokens=stop_tokens,
        max_len=max_len,
        width=width,
    )
    return [row[row != PAD].tolist() for row in np.concatenate(list(parts), axis=1)]

  def _check(self, prompts, max_new_tokens, stop_tokens, max_len, width):
    """(tokens, segment ids, lengths, max_len) of valid arguments; ValueError naming a bad one."""
    vocab = self.model.config.vocab_size
    tokens, segment_ids, lengths = pad_prompts(prompts, vocab, width)
    if self.chunk is not None and tokens.shape[1] > self.chunk:
      # Whole chunks: the last one compiles like the others.
      whole = -(-tokens.shape[1] // self.chunk) * self.chunk
      tokens, segment_ids, lengths = pad_prompts(prompts, vocab, whole)
    if isinstance(max_new_tokens, bool) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    needed = int(lengths.max()) + max_new_tokens
    # Padding is never stored (a chunk's pairs past a row's length are masked): a cache holds the
    # rows' own tokens, whatever the prompts' width.
    max_len = needed if max_len is None else max_len
    if max_len < needed:
      raise ValueError(
          f"the longest prompt has {int(lengths.max())} tokens: with {max_new_tokens} new"
          f" tokens a row needs max_len >= {needed}, got {max_len}"
      )
    bad_stops = [s for s in stop_tokens if not 0 <= s < vocab]
    if bad_stops:
      raise ValueError(f"stop tokens {bad_stops} are outside the vocabulary [0, {vocab})")
    return tokens, segment_ids, lengths, max_len
