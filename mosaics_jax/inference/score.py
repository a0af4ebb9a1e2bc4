"""Scoring sequences of any length: the log-probability of every next token, in fixed-size chunks.

    scorer = Scorer(model, chunk=512, batch_size=8)
    losses = scorer.token_losses(params, [ids_a, ids_b])   # -log p(x[i+1] | x[:i+1]) per row

Rows go through the model `chunk` tokens at a time: the first chunk through the training path
into a fresh decode cache, the others through the cache (as a long prompt's prefill does). Shapes
are bucketed so that scoring many lengths compiles a few functions, not one per length: a batch
is always `batch_size` rows (short batches are padded with one-token rows), rows are padded to
whole chunks, and the cache holds the next power of two of tokens (at least one chunk). Memory
Mosaics v1 refuse inputs longer than their block_size in one call, but its chunks bound only the
chunk: through the cache, no model here has a length limit beyond memory.

On a mesh (`mesh=`), batches are split over the data axes and parameters sharded as their
logical axes say; results are those of one device.

Axis legend: b = batch, c = chunk, t = row length, v = vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from mosaics_jax import config as config_lib, sharding
from mosaics_jax.inference import placement, prefill
from mosaics_jax.model import cache as cache_lib, families

Rows = Sequence[Sequence[int] | np.ndarray]


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """What scoring or generating rows of one length holds at once, in bytes (an estimate)."""

  params: int
  cache: int
  activations: int

  @property
  def total(self) -> int:
    return self.params + self.cache + self.activations


class Scorer(prefill.Chunked):
  """Compiled chunked scoring of one model (module docstring)."""

  def __init__(
      self,
      model: nn.Module,
      *,
      chunk: int = 512,
      batch_size: int = 8,
      mesh: jax.sharding.Mesh | None = None,
      rules: config_lib.AxisRules = config_lib.DEFAULT_AXIS_RULES,
      model_kwargs: dict[str, Any] | None = None,
  ):
    """`chunk` is capped by the model's longest input (v1's block_size); `model_kwargs` go to
    every call of the model (v2's `ltm_delay`)."""
    if chunk < 1 or batch_size < 1:
      raise ValueError(f"chunk and batch_size must be >= 1, got {chunk} and {batch_size}")
    super().__init__(model, chunk=chunk, mesh=mesh, rules=rules, model_kwargs=model_kwargs)
    self.batch_size = batch_size

  def capacity(self, length: int) -> int:
    """The tokens a row's cache holds to score rows of up to `length` tokens (bucketed)."""
    return max(self.chunk, 1 << max(0, math.ceil(math.log2(max(length, 1)))))

  def memory_estimate(self, length: int, params: Any = None) -> MemoryEstimate:
    """Bytes to score (or generate) a batch of rows of `length` tokens: parameters, the decode
    cache of `capacity(length)` tokens, and a chunk's largest activations (its logits in float32,
    the training path's scores of a chunk against itself, the layer's hidden states)."""
    cfg = self.model.config
    if params is None:
      param_bytes = 4 * families.param_count(cfg)
    else:
      param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    # Leaves only: shapes need not rebuild the cache's dataclasses.
    cache = jax.eval_shape(
        lambda: jax.tree.leaves(self.model.init_cache(self.batch_size, self.capacity(length)))
    )
    cache_bytes = sum(x.size * x.dtype.itemsize for x in cache)
    b, c = self.batch_size, self.chunk
    # Logits, log-softmax and the outputs kept: three [b, c, v] float32 arrays; per head, a
    # chunk's scores against itself; a layer's hidden states several times over.
    activations = 4 * b * c * (3 * cfg.vocab_size + cfg.num_heads * c + 16 * cfg.width)
    return MemoryEstimate(param_bytes, cache_bytes, activations)

  def check_memory(self, length: int, params: Any = None) -> MemoryEstimate:
    """The estimate for `length`; ValueError when it exceeds the memory of the devices here."""
    estimate = self.memory_estimate(length, params)
    available = sharding.memory_available()
    if estimate.total > available:
      gib = 2**30
      raise ValueError(
          f"rows of {length} tokens need about {estimate.total / gib:.1f} GiB (parameters"
          f" {estimate.params / gib:.1f}, cache {estimate.cache / gib:.1f}, activations"
          f" {estimate.activations / gib:.1f}) in batches of {self.batch_size}, more than the"
          f" {available / gib:.1f} GiB here: use a shorter length or a smaller batch size"
      )
    return estimate

  def token_losses(self, params: Any, rows: Rows) -> list[Float[np.ndarray, " t"]]:
    """Per row of n >= 2 tokens, the n - 1 losses -log p(row[i + 1] | row[: i + 1]) in nats."""
    return [out[: len(row) - 1] for out, row in zip(self._score(params, rows, False), rows)]

  def next_log_probs(self, params: Any, rows: Rows) -> list[Float[np.ndarray, "t v"]]:
    """Per row of n tokens, log p(next token | row[: i + 1]) over the vocabulary, [n, v]."""
    return [out[: len(row)] for out, row in zip(self._score(params, rows, True), rows)]

  def continuation_scores(
      self, params: Any, context: Sequence[int] | np.ndarray, continuations: Rows
  ) -> list[tuple[float, bool]]:
    """Per continuation, (log p(continuation | context) summed over its tokens, whether it is the
    greedy continuation: every token the argmax).

    The context goes through the model once (one row); its cache is copied to every row of a
    batch of continuations, which then go through the cache together: scoring C answers to one
    question costs one context, not C (multiple-choice tasks, class labels).
    """
    context = np.asarray(context, np.int32).reshape(-1)
    rows = [np.asarray(c, np.int32).reshape(-1) for c in continuations]
    vocab = self.model.config.vocab_size
    if context.size < 1 or any(r.size < 1 for r in rows):
      raise ValueError("a context and every continuation need at least one token")
    prefill.check_token_ids(context, vocab, "the context")
    for i, row in enumerate(rows):
      prefill.check_token_ids(row, vocab, f"continuation {i}")
    # Short continuations (answers, labels) in a power-of-two width, long ones in whole chunks.
    longest = max(r.size for r in rows)
    width = min(self.chunk, 1 << math.ceil(math.log2(longest)))
    width = width * -(-longest // width)
    capacity = self.capacity(context.size + width)
    out = []
    with placement.mesh_context(self.mesh, self.rules):
      params = placement.put_params(self.model, params, self.mesh, self.rules, self.batch_size)
      first, cache = self._prefill_one(params, context, capacity)
      for start in range(0, len(rows), self.batch_size):
        batch = rows[start : start + self.batch_size]
        out += self._continue(params, first, cache, batch, width)
    return out

  def _prefill_one(self, params, context: np.ndarray, capacity: int):
    """(log p of the token after the context [v], the cache of the context): one row, or on a
    mesh a whole batch of copies (one row could not be split over the data axes)."""
    rows = 1 if self.mesh is None else self.batch_size
    width = self.chunk * -(-context.size // self.chunk)
    tokens = np.zeros((rows, width), np.int32)
    tokens[:, : context.size] = context
    segment_ids = np.broadcast_to(np.arange(width) >= context.size, (rows, width)).astype(np.int32)
    lengths = np.full(rows, context.size, np.int32)
    last, cache = self._ends(
        params, tokens, segment_ids, lengths, capacity=capacity, outputs=_last_log_probs
    )
    return np.asarray(last[0]), cache

  def _continue(self, params, first, cache, rows: list[np.ndarray], width: int):
    """The scores of up to batch_size continuations of one cached context."""
    b = self.batch_size
    tokens = np.zeros((b, width), np.int32)
    lengths = np.zeros(b, np.int32)
    for i, row in enumerate(rows):
      tokens[i, : row.size], lengths[i] = row, row.size
    # Every row goes on from the context's cache, a copy: the chunks update it in place.
    repeat = lambda axis, x: jnp.repeat(x, b // x.shape[axis], axis=axis)
    cache = jax.tree_util.tree_map_with_path(
        lambda path, x: repeat(cache_lib.row_axis(path), x), cache
    )
    segment_ids = np.zeros_like(tokens)
    parts, _ = self._chunks(params, tokens, segment_ids, lengths, outputs=_log_probs, cache=cache)
    # Position j predicts token j + 1; the context's last position predicts token 0.
    log_probs = np.concatenate([np.broadcast_to(first, (b, 1, first.size)), *parts], axis=1)
    scores = []
    for i, row in enumerate(rows):
      picked = log_probs[i, np.arange(row.size), row]
      greedy = bool((log_probs[i, : row.size].argmax(-1) == row).all())
      scores.append((float(picked.sum()), greedy))
    return scores

  def _score(self, params: Any, rows: Rows, full: bool) -> list[np.ndarray]:
    rows = [np.asarray(r, np.int32).reshape(-1) for r in rows]
    vocab = self.model.config.vocab_size
    for i, row in enumerate(rows):
      if row.size < (1 if full else 2):
        raise ValueError(f"row {i} has {row.size} tokens; scoring needs {1 if full else 2}")
      prefill.check_token_ids(row, vocab, f"row {i}")
    outs = []
    with placement.mesh_context(self.mesh, self.rules):
      params = placement.put_params(self.model, params, self.mesh, self.rules, self.batch_size)
      for start in range(0, len(rows), self.batch_size):
        batch = rows[start : start + self.batch_size]
        outs.extend(self._batch(params, batch, full)[: len(batch)])
    return outs

  def _batch(self, params: Any, rows: list[np.ndarray], full: bool) -> list[np.ndarray]:
    """The outputs of up to batch_size rows, padded to batch_size rows of whole chunks."""
    lengths = np.ones(self.batch_size, np.int32)
    lengths[: len(rows)] = [row.size for row in rows]
    width = -(-int(lengths.max()) // self.chunk) * self.chunk
    tokens = np.zeros((self.batch_size, width + 1), np.int32)  # One more: the last target.
    for i, row in enumerate(rows):
      tokens[i, : row.size] = row
    targets = tokens[:, 1:]
    tokens = tokens[:, :-1]
    # Padding is a document of its own, after the row's document 0.
    segment_ids = (np.arange(width)[None] >= lengths[:, None]).astype(np.int32)
    parts, _ = self._chunks(
        params,
        tokens,
        segment_ids,
        lengths,
        () if full else (targets,),
        outputs=_log_probs if full else _losses,
        capacity=self.capacity(width),
    )
    return list(np.concatenate([np.asarray(p) for p in parts], axis=1))


def _log_probs(logits: Float[Array, "b c v"], lengths: Int[Array, " b"]) -> Float[Array, "b c v"]:
  del lengths  # Positions past a row's length are padding, cut off later.
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _losses(
    logits: Float[Array, "b c v"], lengths: Int[Array, " b"], targets: Int[Array, "b c"]
) -> Float[Array, "b c"]:
  log_probs = _log_probs(logits, lengths)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _last_log_probs(
    logits: Float[Array, "b c v"], lengths: Int[Array, " b"]
) -> Float[Array, "b v"]:
  return prefill.at_last(_log_probs(logits, lengths), lengths)
