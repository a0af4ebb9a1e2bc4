"""Retrieval that reads a few blocks of pairs per query instead of every pair (design.md, "Block
selection").

Key positions are cut into blocks of B: block j holds positions jB .. jB + B - 1 of the row. For a
query at time t with band [lo, hi], let e = t - lo be the newest key it may read:

    recent(t)     = blocks floor(e / B) - R + 1 .. floor(e / B)      always read (the newest pairs,
                                                                    the partly filled block among
                                                                    them)
    candidates(t) = blocks j <= floor(e / B) - R that hold a key of the band in t's document
                    (all of them complete: their summaries use no key past e)
    score(t, j)   = "mean":  q_t . mean_{s in j} k_s
                    "bound": sum_c max(q_tc min_{s in j} k_sc, q_tc max_{s in j} k_sc)
                             (an upper bound of q_t . k_s over the block)
    selected(t)   = recent(t) + the K candidates of highest score
    y_t           = sum_{s in S(t), s // B in selected(t)} softmax_s(q_t . k_s) v_s

Selection is per query and per head, from keys and queries only: it is causal (a query's choice
uses no key after e), so decoding one token at a time selects what the forward pass selects. It
is not differentiated (a choice has no gradient); the gradients flow through the selected pairs.
A block's summary uses all its keys, also those of another document sharing it; its pairs are
still masked by document, so no pair of another document is ever read. With K at least the
number of candidates, every block of the band is read and the op equals `retrieve`.

Summaries and scores are sums in a fixed order (`_pairwise_sum`): a decode cache that summarises
its stored keys block by block and scores one query at a time gets the bits the forward pass gets,
so near-tied blocks rank alike in both (XLA's reductions and dots round differently by shape).

`select_blocks` gives the selected blocks (a reference and the fast path share it);
`retrieve_selected_reference` reads them densely (the oracle); `retrieve_selected_xla` gathers the
selected blocks of each chunk of queries, so cost and memory grow as T (K + R) B, not T^2, with a
recomputing backward that scatter-adds into dk and dv.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v, n = key blocks, k = selected blocks of a query (K + R), j = position in a block,
c = queries of a chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas import bands, reference, remat

Summary = Literal["mean", "bound"]
SUMMARIES: tuple[str, ...] = typing.get_args(Summary)


# Validates its fields itself, with errors that name the problem (tested); the test suite's
# jaxtyping hook would answer first with its own.
@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class BlockSelection:
  """Which pairs a query reads: `recent` newest blocks and the `blocks` best of the older ones."""

  blocks: int  # K: older blocks read per query, chosen by score.
  block_size: int = 64  # B: positions per block.
  recent: int = 1  # R >= 1: newest blocks always read (they hold the partly filled one).
  summary: Summary = "mean"  # How a block is scored against a query (module docstring).

  def __post_init__(self):
    for name in ("blocks", "block_size", "recent"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"BlockSelection.{name} must be an int, got {value!r}")
    if self.blocks < 0:
      raise ValueError(f"BlockSelection.blocks must be >= 0, got {self.blocks}")
    if self.block_size < 1:
      raise ValueError(f"BlockSelection.block_size must be >= 1, got {self.block_size}")
    if self.recent < 1:
      raise ValueError(
          f"BlockSelection.recent must be >= 1 (the partly filled block cannot be scored), "
          f"got {self.recent}"
      )
    if self.summary not in SUMMARIES:
      raise ValueError(
          f"BlockSelection.summary must be one of {', '.join(SUMMARIES)}, got {self.summary!r}"
      )

  @property
  def per_query(self) -> int:
    """Blocks a query reads at most: K + R."""
    return self.blocks + self.recent


class Summaries(NamedTuple):
  """Per key block, float32: the sum of its keys ("mean") or their per-channel min and max
  ("bound"); the other fields are None."""

  total: Float[Array, "b n h d"] | None = None
  low: Float[Array, "b n h d"] | None = None
  high: Float[Array, "b n h d"] | None = None


def _pairwise_sum(x: Array, axis: int) -> Array:
  """The sum along `axis` as a fixed tree of float adds (zero-padded to a power of two): the same
  bits for the same values whatever the other dimensions are, which XLA's reductions and dots do
  not promise."""
  size = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, (1 << (size - 1).bit_length()) - size)
  x = jnp.pad(x, pad)
  while x.shape[axis] > 1:
    half = x.shape[axis] // 2
    x = jax.lax.slice_in_dim(x, 0, half, axis=axis) + jax.lax.slice_in_dim(x, half, None, axis=axis)
  return jnp.squeeze(x, axis)


def block_summaries(k: Float[Array, "b s h d"], block_size: int, summary: Summary) -> Summaries:
  """The summaries of the blocks of k (the last one padded with zeros: only complete blocks are
  scored)."""
  batch, seq_len, heads, dim = k.shape
  num_blocks = -(-seq_len // block_size)
  pad = [(0, 0), (0, num_blocks * block_size - seq_len), (0, 0), (0, 0)]
  blocks = jnp.pad(k.astype(jnp.float32), pad).reshape(batch, num_blocks, block_size, heads, dim)
  if summary == "mean":
    return Summaries(total=_pairwise_sum(blocks, axis=2))
  return Summaries(low=blocks.min(axis=2), high=blocks.max(axis=2))


def empty_summaries(
    batch: int, num_blocks: int, heads: int, dim: int, summary: Summary
) -> Summaries:
  """The summaries of blocks that hold no key yet (a decode cache's, before its first chunk)."""
  shape = (batch, num_blocks, heads, dim)
  if summary == "mean":
    return Summaries(total=jnp.zeros(shape, jnp.float32))
  return Summaries(low=jnp.full(shape, jnp.inf, jnp.float32), high=jnp.full(shape, -jnp.inf))


def summarise_blocks(
    summaries: Summaries,
    k: Float[Array, "b s h d"],
    blocks: Int[Array, "b n"],
    block_size: int,
) -> Summaries:
  """`summaries` with the listed blocks of k (a decode cache's stored keys, s a multiple of
  block_size) summarised anew, bit for bit as `block_summaries` summarises them; a block index out
  of range is left out."""
  batch, slots, heads, dim = k.shape
  rows = jnp.arange(batch)[:, None]
  k = k.reshape(batch, slots // block_size, block_size, heads, dim)
  picked = k.at[rows, blocks].get(mode="clip").reshape(batch, -1, heads, dim)
  summary = "mean" if summaries.total is not None else "bound"
  fresh = block_summaries(picked, block_size, summary)
  put = lambda old, new: None if old is None else old.at[rows, blocks].set(new, mode="drop")
  return Summaries(*(put(old, new) for old, new in zip(summaries, fresh)))


def block_scores(
    q: Float[Array, "b c h d"], summaries: Summaries, block_size: int
) -> Float[Array, "b c h n"]:
  """score(t, j) of every query against every block (module docstring), float32, in the same bits
  for a query scored alone or among others."""
  q = q.astype(jnp.float32)[:, :, None]  # b c 1 h d against b 1 n h d.
  if summaries.total is not None:
    terms = q * (summaries.total / block_size)[:, None]
  else:
    terms = jnp.maximum(q * summaries.low[:, None], q * summaries.high[:, None])
  return _pairwise_sum(terms, axis=-1).transpose(0, 1, 3, 2)


class Selected(NamedTuple):
  """The blocks each query reads: `blocks[..., :R]` are the recent ones, the rest chosen by
  score; a slot with `valid` False reads nothing (its block index is clipped into range)."""

  blocks: Int[Array, "b t h k"]
  valid: Bool[Array, "b t h k"]


def choose(
    scores: Float[Array, "b c h n"],
    positions: Int[Array, "b c"],
    doc_starts: Int[Array, "b c"],
    *,
    lo: bands.IntLike,
    hi: int | None,
    selection: BlockSelection,
) -> Selected:
  """recent(t) and the top K candidates(t) by score, for queries at `positions` whose documents
  start at `doc_starts` (module docstring). `n` may exceed the blocks that exist so far."""
  size, recent = selection.block_size, selection.recent
  num_blocks = scores.shape[-1]
  newest = positions - lo  # e: the newest key a query may read.
  # Floor division of a possibly negative e: a query with no pair has newest block < 0.
  newest_block = jnp.floor_divide(newest, size)

  def reaches(block: Array) -> Array:
    """Whether block (broadcast against [b, c, 1]) holds a key of the query's document inside
    the band's far edge."""
    end = (block + 1) * size - 1
    inside = end >= doc_starts[..., None]
    if hi is not None:
      inside &= end >= (positions - hi)[..., None]
    return inside

  j = jnp.arange(num_blocks, dtype=jnp.int32)[None, None]
  # Older than the recent blocks, hence complete.
  candidate = (j <= (newest_block - recent)[..., None]) & reaches(j)
  recent_blocks = newest_block[..., None] - jnp.arange(recent, dtype=jnp.int32)[::-1]
  recent_valid = (recent_blocks >= 0) & reaches(recent_blocks)
  heads = scores.shape[2]
  recent_blocks = jnp.broadcast_to(recent_blocks[:, :, None], (*positions.shape, heads, recent))
  recent_valid = jnp.broadcast_to(recent_valid[:, :, None], recent_blocks.shape)
  if selection.blocks == 0:
    blocks, valid = recent_blocks, recent_valid
  else:
    masked = jnp.where(candidate[:, :, None], jax.lax.stop_gradient(scores), -jnp.inf)
    count = min(selection.blocks, num_blocks)
    top, chosen = jax.lax.top_k(masked, count)
    # Fewer candidates than K: the rest of top_k's answer is -inf, not a choice.
    blocks = jnp.concatenate([recent_blocks, chosen.astype(jnp.int32)], axis=-1)
    valid = jnp.concatenate([recent_valid, top > -jnp.inf], axis=-1)
  return Selected(jnp.clip(blocks, 0, num_blocks - 1), valid)


def _doc_starts(
    segment_ids: Int[Array | np.ndarray, "b t"] | None, seq_len: int
) -> Int[Array, "b t"]:
  positions = jnp.arange(seq_len, dtype=jnp.int32)[None]
  return positions - bands.document_positions(segment_ids, seq_len)


def select_blocks(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    *,
    lo: bands.IntLike,
    hi: int | None,
    segment_ids: Int[Array | np.ndarray, "b t"] | None,
    selection: BlockSelection,
    query_chunk: int | None = None,
) -> Selected:
  """The blocks every query of a sequence reads (module docstring), scored `query_chunk` queries
  at a time (default: B) so that no [t, n] score matrix is ever whole."""
  batch, seq_len, heads, _ = q.shape
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  summaries = block_summaries(k, selection.block_size, selection.summary)
  positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32)[None], (batch, seq_len))
  doc_starts = jnp.broadcast_to(_doc_starts(segment_ids, seq_len), (batch, seq_len))
  chunk = min(query_chunk or selection.block_size, seq_len)
  num_chunks = -(-seq_len // chunk)
  pad = num_chunks * chunk - seq_len

  def chunked(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(batch, num_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)

  def one_chunk(args):
    q_c, positions_c, doc_starts_c = args
    scores = block_scores(q_c, summaries, selection.block_size)
    return choose(scores, positions_c, doc_starts_c, lo=lo, hi=hi, selection=selection)

  selected = jax.lax.map(one_chunk, (chunked(q), chunked(positions), chunked(doc_starts)))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, num_chunks * chunk, heads, -1)[:, :seq_len]
  return Selected(*(unchunk(x) for x in selected))


def _in_selected(
    key_positions: Int[Array, " s"], selected: Selected, block_size: int
) -> Bool[Array, "b t h s"]:
  """True where key position s lies in a valid selected block of the query."""
  key_blocks = key_positions // block_size
  hit = (selected.blocks[..., None] == key_blocks) & selected.valid[..., None]
  return hit.any(axis=-2)


def retrieve_selected_reference(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    *,
    lo: bands.IntLike,
    hi: int | None,
    segment_ids: Int[Array, "b t"] | None,
    selected: Selected,
    block_size: int,
) -> Float[Array, "b t h e"]:
  """The dense oracle: `retrieve`'s band and document mask, and only the selected blocks' pairs."""
  time = jnp.arange(q.shape[1], dtype=jnp.int32)
  pair_mask = _in_selected(time, selected, block_size).transpose(0, 2, 1, 3)
  return reference.retrieve_reference(
      q, k, v, lo=lo, hi=hi, segment_ids=segment_ids, pair_mask=pair_mask
  )


@dataclasses.dataclass(frozen=True)
class _Static:
  """The static part of the XLA path: hi, B and the queries per chunk."""

  hi: int | None
  block: int
  chunk: int


def _gather(x: Float[Array, "b h n j d"], blocks: Int[Array, "b h c k"]) -> Array:
  """x's selected blocks per query: [b, h, c, k, j, d]."""
  rows = jnp.arange(x.shape[0])[:, None, None, None]
  heads = jnp.arange(x.shape[1])[None, :, None, None]
  return x[rows, heads, blocks]


def _chunk_probs(
    q_c: Float[Array, "b h c d"], k_g: Float[Array, "b h c k j d"], mask: Bool[Array, "b h c k j"]
) -> Float[Array, "b h c k j"]:
  """Softmax weights of one chunk's queries over their gathered pairs (0 on empty rows), float32."""
  scores = jnp.einsum("bhcd,bhckjd->bhckj", q_c, k_g, preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = scores.max(axis=(-2, -1), keepdims=True)
  row_max = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
  p = jnp.exp(scores - row_max)
  total = p.sum(axis=(-2, -1), keepdims=True)
  return p / jnp.where(total > 0, total, 1.0)


def _chunk_mask(
    static: _Static,
    lo: Int[Array, ""],
    t_c: Int[Array, " c"],
    seg_c: Int[Array, "b c"] | None,
    blocks: Int[Array, "b h c k"],
    valid: Bool[Array, "b h c k"],
    key_segments: Int[Array, "b n j"] | None,
) -> Bool[Array, "b h c k j"]:
  """Band, document and selection mask of one chunk's gathered pairs."""
  s = blocks[..., None] * static.block + jnp.arange(static.block, dtype=jnp.int32)
  mask = bands.band_mask(t_c[None, None, :, None, None], s, lo, static.hi) & valid[..., None]
  if key_segments is not None:
    rows = jnp.arange(blocks.shape[0])[:, None, None, None]
    mask &= seg_c[:, None, :, None, None] == key_segments[rows, blocks]
  return mask


def _to_blocks(x: Array, static: _Static, num_blocks: int) -> Array:
  """[b, s, h, d] -> [b, h, n, j, d], zero-padded."""
  batch, seq_len, heads, dim = x.shape
  x = jnp.pad(x, [(0, 0), (0, num_blocks * static.block - seq_len), (0, 0), (0, 0)])
  return x.reshape(batch, num_blocks, static.block, heads, dim).transpose(0, 3, 1, 2, 4)


def _chunks(x: Array, static: _Static, num_chunks: int, axis: int) -> Array:
  """Cuts axis `axis` (time) into chunks, which go first: [num_chunks, ..., chunk, ...]."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, num_chunks * static.chunk - x.shape[axis])
  x = jnp.pad(x, pad)
  x = x.reshape(*x.shape[:axis], num_chunks, static.chunk, *x.shape[axis + 1 :])
  return jnp.moveaxis(x, axis, 0)


def _unchunk(x: Array, seq_len: int, axis: int) -> Array:
  """Inverse of `_chunks`: the chunks back into axis `axis`, cropped to seq_len."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])
  return jax.lax.slice_in_dim(x, 0, seq_len, axis=axis)


def _from_blocks(x: Float[Array, "b h n j d"], seq_len: int) -> Float[Array, "b s h d"]:
  """Inverse of `_to_blocks`, cropped to seq_len."""
  batch, heads, _, _, dim = x.shape
  return x.transpose(0, 2, 3, 1, 4).reshape(batch, -1, heads, dim)[:, :seq_len]


def _layout(static, q, k, v, segment_ids, selected):
  """The per-chunk inputs of both passes (chunks first) and the keys and values as blocks."""
  batch, seq_len, heads, _ = q.shape
  num_blocks = -(-seq_len // static.block)
  num_chunks = -(-seq_len // static.chunk)
  t = jnp.arange(seq_len, dtype=jnp.int32)
  per_chunk = dict(
      q=_chunks(q.transpose(0, 2, 1, 3), static, num_chunks, 2),
      t=_chunks(t, static, num_chunks, 0),
      blocks=_chunks(selected.blocks.transpose(0, 2, 1, 3), static, num_chunks, 2),
      valid=_chunks(selected.valid.transpose(0, 2, 1, 3), static, num_chunks, 2),
  )
  key_segments = None
  if segment_ids is not None:
    per_chunk["seg"] = _chunks(segment_ids, static, num_chunks, 1)
    pad = [(0, 0), (0, num_blocks * static.block - seq_len)]
    key_segments = jnp.pad(segment_ids, pad, constant_values=-1).reshape(batch, num_blocks, -1)
  return (
      per_chunk,
      _to_blocks(k, static, num_blocks),
      _to_blocks(v, static, num_blocks),
      key_segments,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _retrieve_gathered(static, q, k, v, segment_ids, selected, lo):
  return _gathered_forward(static, q, k, v, segment_ids, selected, lo)


def _gathered_forward(static, q, k, v, segment_ids, selected, lo):
  seq_len = q.shape[1]
  per_chunk, k_blocks, v_blocks, key_segments = _layout(static, q, k, v, segment_ids, selected)

  def one_chunk(c):
    k_g, v_g = _gather(k_blocks, c["blocks"]), _gather(v_blocks, c["blocks"])
    mask = _chunk_mask(static, lo, c["t"], c.get("seg"), c["blocks"], c["valid"], key_segments)
    p = _chunk_probs(c["q"], k_g, mask)
    return jnp.einsum(
        "bhckj,bhckje->bhce", p.astype(v.dtype), v_g, preferred_element_type=jnp.float32
    )

  y = jax.lax.map(one_chunk, per_chunk)  # [chunks, b, h, c, e]
  return _unchunk(y, seq_len, 2).transpose(0, 2, 1, 3).astype(v.dtype)


def _gathered_fwd(static, q, k, v, segment_ids, selected, lo):
  y = remat.named(_gathered_forward(static, q, k, v, segment_ids, selected, lo))
  return y, (q, k, v, segment_ids, selected, lo)


def _gathered_bwd(static, residuals, dy):
  q, k, v, segment_ids, selected, lo = residuals
  lo = jnp.asarray(lo)  # Under remat a constant lo comes back as a numpy scalar.
  seq_len = q.shape[1]
  per_chunk, k_blocks, v_blocks, key_segments = _layout(static, q, k, v, segment_ids, selected)
  num_chunks = per_chunk["q"].shape[0]
  per_chunk["dy"] = _chunks(dy.transpose(0, 2, 1, 3), static, num_chunks, 2)
  f32 = jnp.float32
  rows = jnp.arange(q.shape[0])[:, None, None, None]
  heads = jnp.arange(q.shape[2])[None, :, None, None]

  def one_chunk(carry, c):
    dk_blocks, dv_blocks = carry
    k_g, v_g = _gather(k_blocks, c["blocks"]), _gather(v_blocks, c["blocks"])
    mask = _chunk_mask(static, lo, c["t"], c.get("seg"), c["blocks"], c["valid"], key_segments)
    p = _chunk_probs(c["q"], k_g, mask)
    dp = jnp.einsum("bhce,bhckje->bhckj", c["dy"], v_g, preferred_element_type=f32)
    ds = p * (dp - jnp.sum(p * dp, axis=(-2, -1), keepdims=True))
    dq = jnp.einsum("bhckj,bhckjd->bhcd", ds.astype(k.dtype), k_g, preferred_element_type=f32)
    dk_g = jnp.einsum("bhckj,bhcd->bhckjd", ds.astype(q.dtype), c["q"], preferred_element_type=f32)
    dv_g = jnp.einsum("bhckj,bhce->bhckje", p.astype(dy.dtype), c["dy"], preferred_element_type=f32)
    # Invalid slots have p = 0, so adding their zeros into a clipped block changes nothing.
    dk_blocks = dk_blocks.at[rows, heads, c["blocks"]].add(dk_g)
    dv_blocks = dv_blocks.at[rows, heads, c["blocks"]].add(dv_g)
    return (dk_blocks, dv_blocks), dq

  init = (jnp.zeros(k_blocks.shape, f32), jnp.zeros(v_blocks.shape, f32))
  (dk_blocks, dv_blocks), dq = jax.lax.scan(one_chunk, init, per_chunk)
  dq = _unchunk(dq, seq_len, 2).transpose(0, 2, 1, 3)
  d_segments = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
  d_selected = Selected(
      np.zeros(selected.blocks.shape, jax.dtypes.float0),
      np.zeros(selected.valid.shape, jax.dtypes.float0),
  )
  return (
      dq.astype(q.dtype),
      _from_blocks(dk_blocks, seq_len).astype(k.dtype),
      _from_blocks(dv_blocks, seq_len).astype(v.dtype),
      d_segments,
      d_selected,
      np.zeros((), jax.dtypes.float0),
  )


_retrieve_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def retrieve_selected_xla(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    *,
    lo: bands.IntLike,
    hi: int | None,
    segment_ids: Int[Array, "b t"] | None,
    selected: Selected,
    block_size: int,
    query_chunk: int | None = None,
) -> Float[Array, "b t h e"]:
  """The selected pairs of each chunk of `query_chunk` queries (default B) gathered and read at
  once: O(T (K + R) B) work and O(chunk (K + R) B) temporaries; reverse-mode differentiable in
  q, k, v (the backward recomputes each chunk's weights)."""
  static = _Static(hi=hi, block=block_size, chunk=min(query_chunk or block_size, q.shape[1]))
  return _retrieve_gathered(static, q, k, v, segment_ids, selected, jnp.asarray(lo, jnp.int32))
