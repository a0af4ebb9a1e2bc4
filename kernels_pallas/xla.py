"""Memory-efficient retrieval in plain XLA: a blocked online softmax with a flash-style backward.

Time is cut into n blocks of B positions (padded at the end). A loop runs over block diagonal
offsets r: at offset r every query block reads the key block r blocks before it, all query blocks
at once, and an online softmax (running max, running sum and accumulator, all float32) folds that
key block in. Only the offsets whose blocks can meet the band are visited, [lo // B, (hi + B - 1)
// B]: with a finite hi that is a constant number of offsets, so cost and memory are linear in T.
With hi = None it is every offset from lo // B on; the query blocks n < r, which have no key block
at offset r, are computed and masked away (about twice the useful work, which Pallas kernels skip).

The backward pass (jax.custom_vjp) recomputes each offset's probabilities from the saved per-row
max and sum instead of storing them, so neither pass keeps more than one offset's [b, n, h, B, B]
scores alive: memory is O(T * B), never O(T^2). Its first loop sums the softmax correction
D = sum_j p dp, its second the gradients. A sequence that is a single block (by default, T <= 256
unless the band is narrow) skips the loops: its one offset is computed densely and differentiated
by autodiff, which stores that offset's probabilities instead of recomputing them.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v, n = blocks, i = position inside a query block, j = position inside a key block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas import bands

# Largest default block: one offset then holds b * h * T * 128 float32 scores per temporary.
MAX_BLOCK_SIZE = 128
# Smallest default block: thinner blocks make the batched matmuls too small to be efficient.
MIN_BLOCK_SIZE = 16
# Longest (padded) sequence that is one block by default: one block is computed densely and
# differentiated by autodiff (`_single_block`), which at T = 256 takes about half the time of two
# blocks of 128 with the recomputing backward (v1 at nanoGPT's size: 70 vs 130 ms per layer).
SINGLE_BLOCK_MAX = 256


@dataclasses.dataclass(frozen=True)
class _Band:
  """The static part of a call: lo when it is a Python int (None when traced), hi and B."""

  lo: int | None
  hi: int | None
  block: int


def default_block_size(seq_len: int, hi: int | None) -> int:
  """B used when the caller gives none.

  A sequence of at most SINGLE_BLOCK_MAX positions (padded to a multiple of 8) is one block, unless
  the band covers less than a quarter of it (then the band's blocks skip most of the pairs). Longer
  sequences get blocks of at most 128, no longer than needed for T or for the band.
  """
  padded = -(-seq_len // 8) * 8
  if padded <= SINGLE_BLOCK_MAX and (hi is None or 4 * hi >= padded):
    return padded
  block = min(MAX_BLOCK_SIZE, padded)
  if hi is not None:
    # Each query reads about hi - lo + 2B keys: a block no longer than the band keeps that within
    # a few times the band.
    block = min(block, max(MIN_BLOCK_SIZE, 1 << (hi.bit_length() - 1)))
  return block


def _offset_range(
    band: _Band, lo: Int[Array, ""], num_blocks: int
) -> tuple[int | Int[Array, ""], int]:
  """[first, last): the diagonal offsets whose blocks can hold a key of the band.

  At offset r, t - s ranges over [r B - (B - 1), r B + (B - 1)]: it can reach lo only if
  r >= lo // B, and come down to hi only if r <= (hi + B - 1) // B.
  """
  last = num_blocks
  if band.hi is not None:
    last = min(last, (band.hi + band.block - 1) // band.block + 1)
  if band.lo is not None:
    return min(band.lo // band.block, last), last
  return jnp.minimum(lo // band.block, last), last


def _offset_mask(
    band: _Band,
    lo: Int[Array, ""],
    offset: int | Int[Array, ""],
    num_blocks: int,
    segments: Int[Array, "b n i"] | None,
) -> Bool[Array, "b n 1 i j"]:
  """True where query (block n, row i) may read key (block n - offset, row j).

  Padded positions need no mask of their own: a key s >= T is only in the band of a query t > s,
  itself padded, whose output is dropped (so its cotangent is 0 and it adds nothing to gradients).
  """
  t = jnp.arange(num_blocks * band.block, dtype=jnp.int32).reshape(num_blocks, band.block)
  s = t - offset * band.block
  lo = band.lo if band.lo is not None else lo
  # s < 0 marks the slots n < offset, which hold a wrapped-around block.
  mask = bands.band_mask(t[:, :, None], s[:, None, :], lo, band.hi) & (s >= 0)[:, None, :]
  mask = mask[None, :, None]
  if segments is not None:
    key_segments = _roll_blocks(segments, offset)
    mask = mask & (segments[:, :, :, None] == key_segments[:, :, None, :])[:, :, None]
  return mask


def _roll_blocks(x: Array, offset: int | Int[Array, ""]) -> Array:
  """Moves block n - offset into slot n (slots n < offset get a wrapped-around block)."""
  return jnp.roll(x, offset, axis=1)


def _unroll_blocks(x: Array, offset: int | Int[Array, ""]) -> Array:
  """Inverse of `_roll_blocks`: slot n goes back to block n - offset."""
  return jnp.roll(x, -offset, axis=1)


def _forward(
    band: _Band,
    q: Float[Array, "b n h i d"],
    k: Float[Array, "b n h j d"],
    v: Float[Array, "b n h j e"],
    segments: Int[Array, "b n i"] | None,
    lo: Int[Array, ""],
) -> tuple[Float[Array, "b n h i e"], tuple[Float[Array, "b n h i"], Float[Array, "b n h i"]]]:
  """Output y (input dtype) and each row's (max, sum) of exp(scores - max), float32 (max 0 and
  sum 1 on empty rows)."""
  batch, num_blocks, heads, block, _ = q.shape
  f32 = jnp.float32

  def fold_offset(offset, carry):
    row_max, row_sum, acc = carry
    mask = _offset_mask(band, lo, offset, num_blocks, segments)
    k_r, v_r = _roll_blocks(k, offset), _roll_blocks(v, offset)
    scores = jnp.einsum("bnhid,bnhjd->bnhij", q, k_r, preferred_element_type=f32)
    scores = jnp.where(mask, scores, -jnp.inf)
    new_max = jnp.maximum(row_max, scores.max(axis=-1))
    # A row that has met no key yet keeps max -inf; shifting it by 0 keeps exp() NaN-free.
    shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
    p = jnp.exp(scores - shift[..., None])
    rescale = jnp.exp(row_max - shift)
    row_sum = row_sum * rescale + p.sum(axis=-1)
    pv = jnp.einsum("bnhij,bnhje->bnhie", p.astype(v.dtype), v_r, preferred_element_type=f32)
    acc = acc * rescale[..., None] + pv
    return new_max, row_sum, acc

  stats_shape = (batch, num_blocks, heads, block)
  init = (
      jnp.full(stats_shape, -jnp.inf, f32),
      jnp.zeros(stats_shape, f32),
      jnp.zeros(stats_shape + (v.shape[-1],), f32),
  )
  first, last = _offset_range(band, lo, num_blocks)
  row_max, row_sum, acc = jax.lax.fori_loop(first, last, fold_offset, init)
  nonempty = row_sum > 0
  safe_sum = jnp.where(nonempty, row_sum, 1.0)
  # Empty rows have acc = 0, hence y = 0 exactly; their stats are never used (their mask is empty).
  y = (acc / safe_sum[..., None]).astype(v.dtype)
  # Row max and row sum are kept apart: q . k reaches ~4e9 in v1 (key scales up to 65535), where
  # row_max + log(row_sum) would round log(row_sum) away and the backward's p would not sum to 1.
  stats = (jnp.where(nonempty, row_max, 0.0), safe_sum)
  return y, stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_retrieve(
    band: _Band,
    q: Float[Array, "b n h i d"],
    k: Float[Array, "b n h j d"],
    v: Float[Array, "b n h j e"],
    segments: Int[Array, "b n i"] | None,
    lo: Int[Array, ""],
) -> Float[Array, "b n h i e"]:
  """Blocked retrieval with a memory-efficient backward pass."""
  return _forward(band, q, k, v, segments, lo)[0]


def _blocked_retrieve_fwd(band, q, k, v, segments, lo):
  y, stats = _forward(band, q, k, v, segments, lo)
  return y, (q, k, v, segments, lo, stats)


def _blocked_retrieve_bwd(band, residuals, dy):
  q, k, v, segments, lo, (row_max, row_sum) = residuals
  num_blocks = q.shape[1]
  f32 = jnp.float32
  first, last = _offset_range(band, lo, num_blocks)

  def probs(offset):
    mask = _offset_mask(band, lo, offset, num_blocks, segments)
    k_r, v_r = _roll_blocks(k, offset), _roll_blocks(v, offset)
    scores = jnp.einsum("bnhid,bnhjd->bnhij", q, k_r, preferred_element_type=f32)
    p = jnp.exp(jnp.where(mask, scores - row_max[..., None], -jnp.inf)) / row_sum[..., None]
    dp = jnp.einsum("bnhie,bnhje->bnhij", dy, v_r, preferred_element_type=f32)
    return k_r, v_r, p, dp

  # D_i = sum_j p_ij dp_ij, summed from the same p and dp the gradient uses (a first pass). The
  # shortcut D_i = dy_i . y_i differs by rounding, which q and k of norm up to 65535 amplify.
  def add_correction(offset, acc):
    _, _, p, dp = probs(offset)
    return acc + jnp.sum(p * dp, axis=-1)

  correction = jax.lax.fori_loop(first, last, add_correction, jnp.zeros(row_max.shape, f32))

  def unfold_offset(offset, carry):
    dq, dk, dv = carry
    k_r, v_r, p, dp = probs(offset)
    ds = p * (dp - correction[..., None])
    ds_k, ds_q = ds.astype(k.dtype), ds.astype(q.dtype)
    dq = dq + jnp.einsum("bnhij,bnhjd->bnhid", ds_k, k_r, preferred_element_type=f32)
    dk_r = jnp.einsum("bnhij,bnhid->bnhjd", ds_q, q, preferred_element_type=f32)
    dv_r = jnp.einsum("bnhij,bnhie->bnhje", p.astype(dy.dtype), dy, preferred_element_type=f32)
    # The wrapped-around slots carry masked, hence zero, contributions.
    dk = dk + _unroll_blocks(dk_r, offset)
    dv = dv + _unroll_blocks(dv_r, offset)
    return dq, dk, dv

  init = (jnp.zeros(q.shape, f32), jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
  dq, dk, dv = jax.lax.fori_loop(first, last, unfold_offset, init)
  # Integer inputs take float0 cotangents.
  d_segments = None if segments is None else np.zeros(segments.shape, jax.dtypes.float0)
  d_lo = np.zeros((), jax.dtypes.float0)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_segments, d_lo


_blocked_retrieve.defvjp(_blocked_retrieve_fwd, _blocked_retrieve_bwd)


def _single_block(
    band: _Band,
    q: Float[Array, "b 1 h i d"],
    k: Float[Array, "b 1 h j d"],
    v: Float[Array, "b 1 h j e"],
    segments: Int[Array, "b 1 i"] | None,
    lo: Int[Array, ""],
) -> Float[Array, "b 1 h i e"]:
  """The sequence as one block (offset 0 only), differentiated by plain autodiff.

  With a single block, the probabilities that `_blocked_retrieve`'s backward pass recomputes twice
  (to keep one offset's temporaries alive at a time) are exactly one offset's temporaries: storing
  them costs no more memory, and autodiff then needs one q . k product and one exp instead of
  three. The softmax is the reference's: masked scores, a shift without gradient, 0 on empty rows.
  """
  f32 = jnp.float32
  mask = _offset_mask(band, lo, 0, 1, segments)
  scores = jnp.einsum("bnhid,bnhjd->bnhij", q, k, preferred_element_type=f32)
  scores = jnp.where(mask, scores, -jnp.inf)
  # An empty row has max -inf; shifting it by 0 keeps every exp() at exp(-inf) = 0, NaN-free.
  row_max = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
  p = jnp.exp(scores - row_max)
  total = p.sum(axis=-1, keepdims=True)
  p = p / jnp.where(total > 0, total, 1.0)
  y = jnp.einsum("bnhij,bnhje->bnhie", p.astype(v.dtype), v, preferred_element_type=f32)
  return y.astype(v.dtype)


@functools.partial(jax.jit, static_argnames=("static_lo", "hi", "block_size"))
def _retrieve_padded(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    segment_ids: Int[Array, "b t"] | None,
    lo: Int[Array, ""],
    *,
    static_lo: int | None,
    hi: int | None,
    block_size: int,
) -> Float[Array, "b t h e"]:
  """Pads T to a multiple of the block size, runs the blocked (or single-block) op and crops."""
  batch, seq_len, heads, _ = q.shape
  num_blocks = -(-seq_len // block_size)
  pad = num_blocks * block_size - seq_len

  def to_blocks(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(batch, num_blocks, block_size, *x.shape[2:])

  # Heads go before time so that every block product is a plain batched matmul.
  q, k, v = (to_blocks(x).transpose(0, 1, 3, 2, 4) for x in (q, k, v))
  segments = None if segment_ids is None else to_blocks(segment_ids)
  band = _Band(lo=static_lo, hi=hi, block=block_size)
  retrieve_blocks = _single_block if num_blocks == 1 else _blocked_retrieve
  y = retrieve_blocks(band, q, k, v, segments, lo).transpose(0, 1, 3, 2, 4)
  return y.reshape(batch, num_blocks * block_size, heads, -1)[:, :seq_len]


def retrieve_xla(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    *,
    lo: bands.IntLike,
    hi: int | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
    block_size: int | None = None,
    backend: str | None = None,
) -> Float[Array, "b t h e"]:
  """y[b, t, h] = sum_{s in S(t)} softmax_s(q[b, t, h] . k[b, s, h]) v[b, s, h], in O(T * B) memory.

  Inputs are assumed validated by `kernels_pallas.retrieve`. A Python int `lo` is compiled in (and
  lets the loop skip the offsets below it); a traced `lo` is one compilation for every value.
  `block_size` defaults to `default_block_size(T, hi)`. Reverse-mode differentiable in q, k, v.
  """
  del backend  # Plain XLA: the same program on every backend.
  static_lo = lo if isinstance(lo, int) else None
  if block_size is None:
    block_size = default_block_size(q.shape[1], hi)
  return _retrieve_padded(
      q,
      k,
      v,
      segment_ids,
      jnp.asarray(lo, jnp.int32),
      static_lo=static_lo,
      hi=hi,
      block_size=block_size,
  )
