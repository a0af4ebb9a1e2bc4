"""Decode caches: what a model keeps between calls, so that the next chunk of tokens goes on where
the last one stopped (design.md, "Decoding").

    cache = model.init_cache(batch, max_len)                       # empty: `fresh`
    logits, cache = model.apply(variables, prompts, segment_ids, cache=cache, lengths=lengths)
    logits, cache = model.apply(variables, next_tokens, cache=cache)   # one token per row

A `Cache` holds each row's stream (`Stream`: the tokens it has consumed, the document its last
token is in and where that document started) and, per layer, one `MemoryCache` per memory (or
attention): the pairs it has stored (`Pairs`), the pair of the last position, which waits for the
next token because a value looks one token ahead (`Pending`), and the key recurrence's state.
Pairs live in slots `position % capacity`: a memory whose band is bounded (v2's short-term memory)
keeps a ring of hi - lo + 1 slots, constant in the length; the others keep `max_len`, which is then
the most tokens a row may consume (`Cache.max_len`). A call that would take a row past it raises a
ValueError where the lengths are known; under jit, where they are not, the row is flagged
(`Stream.overflow`) and its logits are NaN, and `check` raises the same error on the host.

A fresh cache (`Cache.fresh`, static) holds nothing: the first chunk (the prompt) runs through the
training path (`kernels_pallas.retrieve`, the scans) and fills it. Later chunks read the stored
pairs with an online softmax over blocks of slots (`attend_pairs`), only the blocks that can hold
pairs, and then the chunk's own pairs. Every cache is a plain pytree of arrays.

Axis legend: b = batch, c = chunk time, s = slots, h = heads, d = key dim, e = value dim, l = the
layer axis that leads the memory caches of scanned layers (`STACKED`), absent otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

import kernels_pallas
from kernels_pallas import select as select_lib
from mosaics_jax.model import family as family_lib

# The key in `Cache.layers` of the caches of scanned layers (`model.scan_layers`), stacked on a
# leading layer axis: `row_axis` says where a leaf's rows are.
STACKED = "layers"

# Slots per step of the decode's attention over stored pairs: only the blocks that hold pairs are
# read, so a token's cost grows with its position, not with max_len.
BLOCK = 128


@flax.struct.dataclass
class Stream:
  """Where each row's stream of tokens stands."""

  length: Int[Array, " b"]  # Tokens consumed: the position of the next one.
  segment: Int[Array, " b"]  # The document id of the last token.
  doc_start: Int[Array, " b"]  # The position where that document started.
  # Whether the row went past the cache's max_len, for good: its logits are NaN since (`check`).
  overflow: Bool[Array, " b"]


@flax.struct.dataclass
class Pairs:
  """The (key, value) pairs a memory has stored, in slots `position % capacity`."""

  keys: Float[Array, "*l b s h d"]
  values: Float[Array, "*l b s h e"]
  positions: Int[Array, "*l b s"]  # -1: an empty slot.
  segments: Int[Array, "*l b s"]


@flax.struct.dataclass
class Pending:
  """The pair of a row's last position: its value needs the next token's value projection."""

  key: Float[Array, "*l b h d"]
  raw_value: Float[Array, "*l b h e"]  # The value projection v~ before mixing and normalising.
  position: Int[Array, "*l b"]  # -1: none.
  segment: Int[Array, "*l b"]


@flax.struct.dataclass
class MemoryCache:
  """One memory's (or attention's) cache; a field a memory does not need is None."""

  pairs: Pairs | None = None
  pending: Pending | None = None
  key_state: Float[Array, "*l b h d"] | None = None  # The key recurrence after the last position.
  # Of a gated recurrence (v2): the state is key_state * exp(key_log_scale), which may overflow
  # float32 where key_state does not (`kernels_pallas.scans.gated_linear_scan`).
  key_log_scale: Float[Array, "*l b h"] | None = None
  # Of a memory that reads selected blocks: the summaries of the blocks of its slots.
  summaries: select_lib.Summaries | None = None


@flax.struct.dataclass
class Cache:
  """A model's decode cache: the rows' streams and, by layer and module name, memory caches."""

  stream: Stream
  layers: dict[str, dict[str, MemoryCache]]
  # The most tokens a row may consume; None: no limit (every memory keeps a ring of its band).
  max_len: int | None = flax.struct.field(pytree_node=False)
  fresh: bool = flax.struct.field(pytree_node=False, default=True)


@flax.struct.dataclass
class Chunk:
  """Where the tokens of one call sit in each row's stream."""

  positions: Int[Array, "b c"]
  doc_positions: Int[Array, "b c"]  # Positions inside their documents.
  segment_ids: Int[Array, "b c"]
  starts: Bool[Array, "b c"]  # Where a document starts: key recurrences reset there.
  lengths: Int[Array, " b"]  # Tokens of the chunk each row consumes (the rest is padding).
  doc_starts: Int[Array, "b c"]
  fresh: bool = flax.struct.field(pytree_node=False, default=True)


def empty_stream(batch: int) -> Stream:
  zeros = jnp.zeros((batch,), jnp.int32)
  return Stream(length=zeros, segment=zeros, doc_start=zeros, overflow=jnp.zeros((batch,), bool))


def empty_memory(
    batch: int,
    capacity: int | None,
    heads: int,
    key_dim: int,
    value_dim: int,
    dtype: Any,
    *,
    pending: bool,
    key_state: bool,
    gated: bool = False,
    selection: select_lib.BlockSelection | None = None,
) -> MemoryCache:
  """The empty cache of one memory: `capacity` slots (None: no stored pairs), a pending pair if
  its values look ahead, a key state if its keys are a recurrence (and its log-scale if the
  recurrence is `gated`), and the summaries of its blocks if it reads a `selection` of them."""
  pairs = None
  if capacity is not None:
    pairs = Pairs(
        keys=jnp.zeros((batch, capacity, heads, key_dim), dtype),
        values=jnp.zeros((batch, capacity, heads, value_dim), dtype),
        positions=jnp.full((batch, capacity), -1, jnp.int32),
        segments=jnp.zeros((batch, capacity), jnp.int32),
    )
  waiting = None
  if pending:
    waiting = Pending(
        key=jnp.zeros((batch, heads, key_dim), dtype),
        raw_value=jnp.zeros((batch, heads, value_dim), jnp.float32),
        position=jnp.full((batch,), -1, jnp.int32),
        segment=jnp.zeros((batch,), jnp.int32),
    )
  state = jnp.zeros((batch, heads, key_dim), jnp.float32) if key_state else None
  log_scale = jnp.zeros((batch, heads), jnp.float32) if gated else None
  summaries = None
  if selection is not None:
    num_blocks = capacity // selection.block_size
    summaries = select_lib.empty_summaries(batch, num_blocks, heads, key_dim, selection.summary)
  return MemoryCache(
      pairs=pairs, pending=waiting, key_state=state, key_log_scale=log_scale, summaries=summaries
  )


def empty(
    batch: int,
    max_len: int,
    dtype: Any,
    layer_names: list[str],
    bands: dict[str, family_lib.Band],
    heads: int,
    head_dim: int,
    *,
    pending: bool,
    key_state: bool,
    gated: bool = False,
) -> Cache:
  """The empty cache of layers that hold one memory (or attention) per band, alike."""
  layers = {
      layer: {
          name: empty_memory(
              batch,
              capacity(band, max_len),
              heads,
              head_dim,
              head_dim,
              dtype,
              pending=pending,
              key_state=key_state,
              gated=gated,
              selection=band.selection,
          )
          for name, band in bands.items()
      }
      for layer in layer_names
  }
  return Cache(empty_stream(batch), layers, length_limit(bands.values(), max_len))


def capacity(band: family_lib.Band, max_len: int) -> int:
  """Slots a memory of this band needs: a bounded band keeps its last hi - lo + 1 pairs; the
  others hold max_len, rounded up to whole blocks of the decode's attention (`attend_pairs`), or
  of the band's block selection (`attend_selected`)."""
  if band.hi is not None:
    return min(band.hi - int(band.lo) + 1, max_len)
  if band.selection is not None:
    return -(-max_len // band.selection.block_size) * band.selection.block_size
  return -(-max_len // BLOCK) * BLOCK if max_len > BLOCK else max_len


def length_limit(bands: Iterable[family_lib.Band], max_len: int) -> int | None:
  """The most tokens a row of a cache for max_len may consume: max_len, or None (no limit) when
  every memory keeps a ring of its whole band, which holds all the pairs its queries read."""
  if all(b.hi is not None and capacity(b, max_len) == b.hi - int(b.lo) + 1 for b in bands):
    return None
  return max_len


def check(cache: Cache) -> None:
  """Raises ValueError if a row of the cache went past its max_len: under jit a call flags the
  row (`Stream.overflow`) instead of raising, so call this on the host after a jitted call."""
  overflow = np.asarray(cache.stream.overflow)
  if overflow.any():
    row = int(overflow.argmax())
    length = int(cache.stream.length[row])
    raise ValueError(
        f"row {row} went past the cache's max_len {cache.max_len}: it holds {length} tokens, and"
        f" its logits are NaN since the call that crossed max_len (make the cache with"
        f" init_cache(batch, max_len >= {length}))"
    )


def _check_room(cache: Cache, lengths: Int[Array, " b"]) -> None:
  """Raises ValueError if the chunk would take a row past the cache's max_len, where the values are
  known (under jit `advance` flags the row instead)."""
  if cache.max_len is None:
    return
  try:
    before, added = np.asarray(cache.stream.length), np.asarray(lengths)
  except jax.errors.TracerArrayConversionError:
    return
  check(cache)
  after = before + added
  rows = np.flatnonzero(after > cache.max_len)
  if rows.size:
    row = rows[0]
    raise ValueError(
        f"row {row} would hold {after[row]} tokens, past the cache's max_len {cache.max_len}: it"
        f" holds {before[row]} and the chunk adds {added[row]} (make the cache with"
        f" init_cache(batch, max_len >= {after.max()}))"
    )


def row_axis(path: tuple) -> int:
  """The batch axis of the leaf of a `Cache` at `path` (`jax.tree_util` keys): 1 in the caches of
  scanned layers, which a layer axis leads (`STACKED`), else 0."""
  keys = [getattr(k, "name", getattr(k, "key", None)) for k in path[:2]]
  return int(keys == ["layers", STACKED])


def nbytes(cache: Any) -> int:
  """Bytes of the arrays of a cache (or of any pytree)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def chunk_of(
    cache: Cache,
    segment_ids: Int[Array, "b c"] | None,
    lengths: Int[Array, " b"] | None,
    size: int,
) -> Chunk:
  """The chunk of `size` tokens that follows the cache's streams; without segment ids the rows go
  on in the document of their last token (a fresh stream starts in document 0). Raises ValueError
  if it would take a row past the cache's max_len, where the lengths are known."""
  stream, fresh = cache.stream, cache.fresh
  batch = stream.length.shape[0]
  lengths = jnp.full((batch,), size, jnp.int32) if lengths is None else lengths
  lengths = jnp.asarray(lengths, jnp.int32)
  _check_room(cache, lengths)
  positions = stream.length[:, None] + jnp.arange(size, dtype=jnp.int32)[None]
  if segment_ids is None:
    segment_ids = jnp.broadcast_to(stream.segment[:, None], (batch, size))
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  if fresh:
    previous = jnp.concatenate([segment_ids[:, :1] - 1, segment_ids[:, :-1]], axis=1)
  else:
    previous = jnp.concatenate([stream.segment[:, None], segment_ids[:, :-1]], axis=1)
  starts = segment_ids != previous
  doc_starts = jax.lax.cummax(jnp.where(starts, positions, -1), axis=1)
  doc_starts = jnp.maximum(doc_starts, stream.doc_start[:, None])
  return Chunk(
      positions=positions,
      doc_positions=positions - doc_starts,
      segment_ids=segment_ids,
      starts=starts,
      lengths=lengths,
      doc_starts=doc_starts,
      fresh=fresh,
  )


def last(x: Array, lengths: Int[Array, " b"], keep: Array) -> Array:
  """x[b, lengths[b] - 1] for each row; `keep[b]` where a row consumed nothing."""
  index = jnp.maximum(lengths - 1, 0)
  taken = jnp.take_along_axis(x, index.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]
  return jnp.where((lengths > 0).reshape(-1, *([1] * (taken.ndim - 1))), taken, keep)


def advance(
    cache: Cache,
    chunk: Chunk,
    layers: dict[str, dict[str, MemoryCache]],
    logits: Float[Array, "b c v"],
) -> tuple[Float[Array, "b c v"], Cache]:
  """The chunk's logits and the cache after it, whose layers are `layers`. A row that went past
  max_len (under jit: `chunk_of` raises otherwise) is flagged and its logits are NaN, from this
  chunk on: its slots wrapped around, so even the chunk's first tokens may have read overwritten
  pairs, and NaN cannot pass for a likelihood or a distribution if `check` is forgotten."""
  stream = cache.stream
  length = stream.length + chunk.lengths
  overflow = stream.overflow
  if cache.max_len is not None:
    overflow = overflow | (length > cache.max_len)
    logits = jnp.where(overflow[:, None, None], jnp.nan, logits)
  stream = Stream(
      length=length,
      segment=last(chunk.segment_ids, chunk.lengths, stream.segment),
      doc_start=last(chunk.doc_starts, chunk.lengths, stream.doc_start),
      overflow=overflow,
  )
  return logits, Cache(stream, layers, cache.max_len, fresh=False)


# The running softmax of a query over pairs: (row max [b, h, c], row sum [b, h, c], weighted sum
# of values [b, h, c, e]), float32.
Softmax = tuple[Array, Array, Array]


def _fold(
    state: Softmax,
    q: Float[Array, "b c h d"],
    keys: Float[Array, "b s h d"],
    values: Float[Array, "b s h e"],
    key_positions: Int[Array, "b s"],
    key_segments: Int[Array, "b s"],
    key_valid: Bool[Array, "b s"],
    chunk: Chunk,
    lo: int | jax.Array,
    hi: int | None,
) -> Softmax:
  """The running softmax after the valid pairs in each query's band and document."""
  row_max, row_sum, acc = state
  scores = jnp.einsum("bchd,bshd->bhcs", q, keys, preferred_element_type=jnp.float32)
  delta = chunk.positions[:, :, None] - key_positions[:, None, :]
  mask = key_valid[:, None, :] & (chunk.segment_ids[:, :, None] == key_segments[:, None, :])
  mask &= delta >= lo
  if hi is not None:
    mask &= delta <= hi
  scores = jnp.where(mask[:, None], scores, -jnp.inf)
  new_max = jnp.maximum(row_max, scores.max(axis=-1))
  # A row that has met no pair keeps max -inf; shifting it by 0 keeps exp() NaN-free.
  shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
  p = jnp.exp(scores - shift[..., None])
  rescale = jnp.exp(row_max - shift)
  row_sum = row_sum * rescale + p.sum(axis=-1)
  pv = jnp.einsum("bhcs,bshe->bhce", p, values.astype(jnp.float32))
  return new_max, row_sum, acc * rescale[..., None] + pv


def _start(q: Float[Array, "b c h d"], value_dim: int) -> Softmax:
  b, c, h, _ = q.shape
  return (
      jnp.full((b, h, c), -jnp.inf, jnp.float32),
      jnp.zeros((b, h, c), jnp.float32),
      jnp.zeros((b, h, c, value_dim), jnp.float32),
  )


def _finish(state: Softmax, dtype: Any) -> Float[Array, "b c h e"]:
  """The retrieval's output: 0 where a query met no pair."""
  _, row_sum, acc = state
  y = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]
  return y.transpose(0, 2, 1, 3).astype(dtype)


def attend_pairs(
    state: Softmax, q: Float[Array, "b c h d"], pairs: Pairs, chunk: Chunk, band: family_lib.Band
) -> Softmax:
  """The running softmax after the pairs of a buffer whose slot is the position (an unbounded
  band), read block by block: only the blocks below the chunk's end can hold pairs, so a token's
  cost grows with its position, not with max_len. The caller stores first and then reads: the
  buffer is never written after this read in a step, so XLA never copies it."""
  size = pairs.positions.shape[1]
  block = BLOCK if size % BLOCK == 0 else size
  end = jnp.max(chunk.positions[:, -1]) + 1

  def body(i, state):
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=1)
    positions = take(pairs.positions)
    return _fold(
        state,
        q,
        take(pairs.keys),
        take(pairs.values),
        positions,
        take(pairs.segments),
        positions >= 0,
        chunk,
        band.lo,
        band.hi,
    )

  return jax.lax.fori_loop(0, jnp.minimum(-(-end // block), size // block), body, state)


def attend_selected(
    q: Float[Array, "b c h d"],
    pairs: Pairs,
    summaries: select_lib.Summaries,
    chunk: Chunk,
    band: family_lib.Band,
) -> Softmax:
  """The softmax of each query over the pairs of the blocks it selects (`kernels_pallas.select`):
  the recent ones and the K best by summary. A token's cost is its K + R blocks and one score per
  block of the buffer, not its position times the head dim."""
  selection = band.selection
  size = selection.block_size
  batch, slots, heads, _ = pairs.keys.shape
  scores = select_lib.block_scores(q, summaries, size)
  chosen = select_lib.choose(
      scores, chunk.positions, chunk.doc_starts, lo=band.lo, hi=band.hi, selection=selection
  )
  # Advanced indices split by a slice put their dimensions first: [b, c, h, k, j, ...].
  rows = jnp.arange(batch)[:, None, None, None]
  head = jnp.arange(heads)[None, None, :, None]
  as_blocks = lambda x: x.reshape(batch, slots // size, size, *x.shape[2:])
  keys = as_blocks(pairs.keys)[rows, chosen.blocks, :, head]
  values = as_blocks(pairs.values)[rows, chosen.blocks, :, head]
  positions = as_blocks(pairs.positions)[rows, chosen.blocks]
  segments = as_blocks(pairs.segments)[rows, chosen.blocks]
  delta = chunk.positions[:, :, None, None, None] - positions
  mask = (positions >= 0) & chosen.valid[..., None] & (delta >= band.lo)
  mask &= chunk.segment_ids[:, :, None, None, None] == segments
  if band.hi is not None:
    mask &= delta <= band.hi
  logits = jnp.einsum("bchd,bchkjd->bchkj", q, keys, preferred_element_type=jnp.float32)
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = logits.max(axis=(-2, -1))
  shift = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
  p = jnp.exp(logits - shift[..., None, None])
  acc = jnp.einsum("bchkj,bchkje->bche", p, values.astype(jnp.float32))
  # In the layout of `Softmax`: heads before the chunk's time.
  row_sum = p.sum(axis=(-2, -1))
  return row_max.transpose(0, 2, 1), row_sum.transpose(0, 2, 1), acc.transpose(0, 2, 1, 3)


def store(
    pairs: Pairs,
    keys: Float[Array, "b n h d"],
    values: Float[Array, "b n h e"],
    positions: Int[Array, "b n"],
    segments: Int[Array, "b n"],
    valid: Bool[Array, "b n"],
) -> Pairs:
  """`pairs` with the valid new pairs written into their slots; of new pairs that would share a
  slot only the latest is written (a ring keeps the newest)."""
  size = pairs.positions.shape[1]
  newest = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
  keep = valid & (positions > newest - size)
  slots = jnp.where(keep, positions % size, size)  # Out of range: dropped.
  rows = jnp.arange(positions.shape[0])[:, None]
  put = lambda old, new: old.at[rows, slots].set(new.astype(old.dtype), mode="drop")
  return Pairs(
      keys=put(pairs.keys, keys),
      values=put(pairs.values, values),
      positions=put(pairs.positions, positions),
      segments=put(pairs.segments, segments),
  )


ValueMix = Callable[[Array, Array], Array]  # (v~_t, v~_{t+1}) -> v_t, per head.


def step(
    q: Float[Array, "b c h d"],
    k: Float[Array, "b c h d"],
    v: Float[Array, "b c h e"],
    cache: MemoryCache,
    chunk: Chunk,
    band: family_lib.Band,
    retrieve: Callable[..., Array],
    *,
    raw: Float[Array, "b c h e"] | None = None,
    mix: ValueMix | None = None,
    kbar: Float[Array, "b c h d"] | None = None,
    kbar_log_scale: Float[Array, "b c h"] | None = None,
) -> tuple[Float[Array, "b c h e"], MemoryCache]:
  """A memory's output on a chunk and its cache after it.

  Args:
    q, k: the chunk's queries and keys.
    v: the chunk's values; the last position's may be provisional when values look ahead (no
      query of the chunk reads it, and the pending pair completes it next time).
    cache: the memory's cache before the chunk.
    chunk: where the chunk sits.
    band: the memory's band.
    retrieve: `layers.retrieve` with the memory's settings bound, for a fresh cache (the training
      path over the chunk alone).
    raw, mix: the value projection v~ and its mixing, for memories whose values look ahead: the
      pending pair of the previous call is completed with the chunk's first v~.
    kbar: the key recurrence over the chunk, whose last real state the cache keeps.
    kbar_log_scale: of a gated recurrence, the log-scale of kbar (`MemoryCache.key_log_scale`).
  """
  lo, hi = band.lo, band.hi
  index = jnp.arange(q.shape[1])[None]
  real = index < chunk.lengths[:, None]
  pairs, pending = cache.pairs, cache.pending
  # The pairs this chunk adds: the previous call's pending pair, completed with this chunk's
  # first v~, then the chunk's own (a chunk pair is complete when the next position is in the
  # chunk; the incomplete last one is in no query's band).
  new_keys, new_values = k, v
  new_positions, new_segments, new_valid = chunk.positions, chunk.segment_ids, real
  if pending is not None:
    same = (chunk.segment_ids[:, 0] == pending.segment) & ~chunk.starts[:, 0]
    first = jnp.where(same[:, None, None], raw[:, 0], 0.0)
    done_value = mix(pending.raw_value[:, None], first[:, None]).astype(v.dtype)
    done_valid = (pending.position >= 0) & (chunk.lengths > 0)
    new_keys = jnp.concatenate([pending.key[:, None].astype(k.dtype), k], axis=1)
    new_values = jnp.concatenate([done_value, v], axis=1)
    new_positions = jnp.concatenate([pending.position[:, None], chunk.positions], axis=1)
    new_segments = jnp.concatenate([pending.segment[:, None], chunk.segment_ids], axis=1)
    new_valid = jnp.concatenate([done_valid[:, None], real], axis=1)
  if pending is not None:
    complete = jnp.concatenate([new_valid[:, :1], index < chunk.lengths[:, None] - 1], axis=1)
  else:
    complete = new_valid
  summaries = cache.summaries
  if band.hi is None:
    # Slots are positions: store every new pair, the provisional last one included (no query
    # reads it before the next call's pending pair overwrites it), then read.
    pairs = store(pairs, new_keys, new_values, new_positions, new_segments, new_valid)
    if summaries is not None:
      # The blocks the chunk wrote into, summarised anew from the stored keys as the forward
      # summarises its keys: the same bits, so near-tied blocks rank alike in both.
      size = band.selection.block_size
      count = min((q.shape[1] + size - 2) // size + 1, pairs.positions.shape[1] // size)
      blocks = chunk.positions[:, :1] // size + jnp.arange(count, dtype=jnp.int32)
      summaries = select_lib.summarise_blocks(summaries, pairs.keys, blocks, size)
    if chunk.fresh:
      y = retrieve(q, k, v, lo=lo, hi=hi, segment_ids=chunk.segment_ids)
    elif band.selection is None:
      y = _finish(attend_pairs(_start(q, v.shape[-1]), q, pairs, chunk, band), q.dtype)
    else:
      y = _finish(attend_selected(q, pairs, summaries, chunk, band), q.dtype)
  elif chunk.fresh:
    y = retrieve(q, k, v, lo=lo, hi=hi, segment_ids=chunk.segment_ids)
    pairs = store(pairs, new_keys, new_values, new_positions, new_segments, complete)
  else:
    # A ring (a few slots): read it whole with the new pairs, then store those that are complete
    # (storing first could evict pairs the chunk's first queries read).
    state = _fold(
        _start(q, v.shape[-1]),
        q,
        pairs.keys,
        pairs.values,
        pairs.positions,
        pairs.segments,
        pairs.positions >= 0,
        chunk,
        lo,
        hi,
    )
    state = _fold(
        state, q, new_keys, new_values, new_positions, new_segments, new_valid, chunk, lo, hi
    )
    y = _finish(state, q.dtype)
    pairs = store(pairs, new_keys, new_values, new_positions, new_segments, complete)
  if pending is not None:
    pending = Pending(
        key=last(k, chunk.lengths, pending.key).astype(pending.key.dtype),
        raw_value=last(raw, chunk.lengths, pending.raw_value),
        position=last(chunk.positions, chunk.lengths, pending.position),
        segment=last(chunk.segment_ids, chunk.lengths, pending.segment),
    )
  key_state, key_log_scale = cache.key_state, cache.key_log_scale
  if kbar is not None:
    key_state = last(kbar, chunk.lengths, key_state)
  if kbar_log_scale is not None:
    key_log_scale = last(kbar_log_scale, chunk.lengths, key_log_scale)
  return y, MemoryCache(
      pairs=pairs,
      pending=pending,
      key_state=key_state,
      key_log_scale=key_log_scale,
      summaries=summaries,
  )


def counts(chunk: Chunk, band: family_lib.Band) -> Int[Array, "b c"]:
  """n_t of the chunk's queries: the pairs of the band inside their documents."""
  return kernels_pallas.count_in_band(chunk.doc_positions, band.lo, band.hi)
