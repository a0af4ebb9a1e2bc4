"""Memory-efficient retrieval in plain XLA: a blocked online softmax with a flash-style backward.

Time is cut into n blocks of B positions (padded at the end), and the (query block, key block)
pairs that can meet the band lie on block diagonals r = (query block - key block). A loop visits
them in iterations of m slots (one block pair each), each query block folding its key blocks in
by an online softmax (running max, running sum and accumulator, all float32):

- a bounded band (finite hi) visits its few diagonals [lo // B, (hi + B - 1) // B] one per
  iteration, every query block at once: cost and memory are linear in T;
- an unbounded band (hi = None) visits the n - f diagonals of [f, n) (f = lo // B) two per
  iteration: diagonal f + p (n - f - p live blocks) with diagonal n - p (p live blocks), n - f
  blocks per iteration, every one of them live. One diagonal per iteration would compute all n
  query blocks at each, about twice the useful work.

On CPU an iteration's slots are computed a chunk of at most CHUNK_SCORES scores at a time
(`_Chunk`), one batched matmul per chunk, so that the [b, m, h, B, B] temporaries stay in cache
whatever T is; on GPU and TPU, whose temporaries live in HBM anyway, an iteration is one chunk.

The backward pass (jax.custom_vjp) recomputes each chunk's probabilities from the saved per-row
max and sum instead of storing them, so neither pass keeps more than one chunk's scores alive:
memory is O(T * B), never O(T^2). Its first loop sums the softmax correction D = sum_j p dp, its
second the gradients. A sequence that is a single block (by default, T <= 256 unless the band is
narrow) skips the loops: its one diagonal is computed densely and differentiated by autodiff,
which stores its probabilities instead of recomputing them.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v, n = blocks, m = slots of one chunk, i = position inside a query block,
j = position inside a key block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas import bands, remat

# Largest default block: a slot's diagonal blocks compute B * B / 2 masked pairs per head.
MAX_BLOCK_SIZE = 128
# Smallest default block: thinner blocks make the batched matmuls too small to be efficient.
MIN_BLOCK_SIZE = 16
# Longest (padded) sequence that is one block by default: one block is computed densely and
# differentiated by autodiff (`_single_block`), which at T = 256 takes about half the time of two
# blocks of 128 with the recomputing backward (v1 at nanoGPT's size: 70 vs 130 ms per layer).
SINGLE_BLOCK_MAX = 256
# Most score elements (batch x slots x heads x B x B float32) one chunk of an iteration computes.
# On a 2-core EPYC (1 MB of L2 per core) the long band's forward+backward at T = 16384 runs at 7% of
# the matmul rate with all 128 slots of 4 heads x 128 x 128 at once (32 MB of scores), and at 24-26%
# with chunks of 2^17 to 2^20 scores (`mosaics-bench kernels`, docs/benchmarks.md).
CHUNK_SCORES = 2**19


@dataclasses.dataclass(frozen=True)
class _Band:
  """The static part of a call: lo when it is a Python int (None when traced), hi, B and the most
  scores a chunk computes."""

  lo: int | None
  hi: int | None
  block: int
  chunk_scores: int | None = CHUNK_SCORES  # None: a whole iteration at once.


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
    # a few times the band (hi = 0, a query reading itself, takes the smallest block).
    block = min(block, max(MIN_BLOCK_SIZE, 1 << max(hi.bit_length() - 1, 0)))
  return block


def chunk_slots(slots: int, batch_heads: int, block: int, chunk_scores: int | None) -> int:
  """Block pairs computed at once: as many of an iteration's `slots` as fit `chunk_scores` float32
  scores of batch_heads x B x B each, at least one (all of them when chunk_scores is None)."""
  if chunk_scores is None:
    return slots
  return max(1, min(slots, chunk_scores // (batch_heads * block**2)))


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """Slots [c C, c C + C) of one loop iteration, computed in one batched matmul.

  Slot m of an iteration multiplies query block `q_blocks` by key block `k_blocks`. Slots belong
  to the iteration's diagonals ("parts"), whose blocks are contiguous in m: the chunk's j-th slot,
  if in part i, reads blocks `q_starts[i] + j` and `k_starts[i] + j` of the extended inputs
  (`_Schedule.extend`: x, x again, C zero blocks), so that key block -1 is read at n - 1 and no
  window wraps around.

  - Diagonal r (bounded bands): one part, query block m, key block m - r.
  - Paired iteration p (unbounded bands, `_Schedule`): the near diagonal a = f + p holds slots
    m < n - a (query block m + a, key block m), the far diagonal n - p the next p slots (query
    block m + f, key block m + a - n).
  """

  slot: Int[Array, " m"]  # The chunk's slot indices in the iteration.
  q_starts: tuple[int | Int[Array, ""], ...]
  k_starts: tuple[int | Int[Array, ""], ...]
  is_near: Bool[Array, " m"] | None  # Paired: which slots belong to the near diagonal.
  q_blocks: Int[Array, " m"]
  k_blocks: Int[Array, " m"]
  live: Bool[Array, " m"]  # Slots of the band's diagonals, inside the sequence.

  @classmethod
  def diagonal(cls, num_blocks: int, slot: Int[Array, " m"], offset, slots: int) -> _Chunk:
    start = slot[0]
    k_blocks = slot - offset
    live = (slot < slots) & (k_blocks >= 0)
    return cls(slot, (start,), (start - offset + num_blocks,), None, slot, k_blocks, live)

  @classmethod
  def paired(
      cls, num_blocks: int, slot: Int[Array, " m"], first, near, far_live, slots: int
  ) -> _Chunk:
    start = slot[0]
    is_near = slot < num_blocks - near
    q_blocks = jnp.where(is_near, slot + near, slot + first)
    k_blocks = jnp.where(is_near, slot, slot + near - num_blocks)
    live = (slot < slots) & (q_blocks < num_blocks) & (is_near | far_live)
    q_starts, k_starts = (start + near, start + first), (start, start + near)
    return cls(slot, q_starts, k_starts, is_near, q_blocks, k_blocks, live)

  def _near_mask(self, ndim: int) -> Bool[Array, "1 m *_"]:
    """`is_near` shaped to broadcast against a [b, m, ...] array of `ndim` axes."""
    return self.is_near.reshape((1, -1) + (1,) * (ndim - 2))

  def _parts(self, z: Array, fill: float) -> list[Array]:
    """z ([b, m, ...]) once per part, `fill` in the slots of the other part."""
    if self.is_near is None:
      return [z]
    is_near = self._near_mask(z.ndim)
    return [jnp.where(is_near, z, fill), jnp.where(is_near, fill, z)]

  def _read(self, extended: Array, starts) -> Array:
    size = self.slot.shape[0]
    windows = [jax.lax.dynamic_slice_in_dim(extended, s, size, axis=1) for s in starts]
    if self.is_near is None:
      return windows[0]
    return jnp.where(self._near_mask(extended.ndim), *windows)

  def queries(self, extended: Array) -> Array:
    """The slots' query-side blocks of x ([b, m, ...]), from `_Schedule.extend(x)`."""
    return self._read(extended, self.q_starts)

  def keys(self, extended: Array) -> Array:
    """The slots' key-side blocks of x ([b, m, ...]), from `_Schedule.extend(x)`."""
    return self._read(extended, self.k_starts)

  def _add(self, total: Array, z: Array, starts) -> Array:
    size = self.slot.shape[0]
    # Part by part: a query block can be in both parts of a chunk.
    for start, part in zip(starts, self._parts(z, 0.0)):
      window = jax.lax.dynamic_slice_in_dim(total, start, size, axis=1)
      total = jax.lax.dynamic_update_slice_in_dim(total, window + part, start, axis=1)
    return total

  def add_to_queries(self, total: Array, z: Array) -> Array:
    """total (extended, [b, 2n + C, ...]) plus the slots' values z added to their query blocks;
    dead slots hold zeros (their pairs are masked)."""
    return self._add(total, z, self.q_starts)

  def add_to_keys(self, total: Array, z: Array) -> Array:
    """total (extended) plus z added to the slots' key blocks, at x or at its copy (see
    `_Schedule.fold`)."""
    return self._add(total, z, self.k_starts)

  def merge_into_queries(self, state: tuple[Array, Array, Array], partial) -> tuple:
    """The running softmax `state` (extended) with the slots' partials (max, sum, accumulator)
    merged into their query blocks (`_merge`)."""
    size = self.slot.shape[0]
    parts = zip(*(self._parts(z, fill) for z, fill in zip(partial, (-jnp.inf, 0.0, 0.0))))
    for start, part in zip(self.q_starts, parts):
      window = [jax.lax.dynamic_slice_in_dim(x, start, size, axis=1) for x in state]
      merged = _merge([tuple(window), part])
      state = tuple(
          jax.lax.dynamic_update_slice_in_dim(x, m, start, axis=1) for x, m in zip(state, merged)
      )
    return state


@dataclasses.dataclass(frozen=True)
class _Schedule:
  """The loop over block pairs: iterations [start, stop), each cut into `chunks` chunks of `chunk`
  slots (`_Chunk`).

  A bounded band visits its few diagonals [lo // B, (hi + B - 1) // B] one per iteration (n slots,
  the first r dead at diagonal r): cost and memory linear in T. An unbounded band visits the
  n - f diagonals of [f, n) (f = lo // B) two per iteration, f + p with n - p: about (n - f) / 2
  iterations of n - f live slots, where one diagonal per iteration would compute all n query blocks
  n - f times, half of them dead. With a traced lo the slots are n, the last f of them dead.
  """

  band: _Band
  num_blocks: int
  first: int | Int[Array, ""]
  start: int | Int[Array, ""]
  stop: int | Int[Array, ""]
  slots: int
  chunk: int

  @classmethod
  def make(cls, band: _Band, lo: Int[Array, ""], num_blocks: int, batch_heads: int) -> _Schedule:
    # At diagonal r, t - s ranges over [r B - (B - 1), r B + (B - 1)]: it can reach lo only if
    # r >= lo // B, and come down to hi only if r <= (hi + B - 1) // B.
    last = num_blocks
    if band.hi is not None:
      last = min(last, (band.hi + band.block - 1) // band.block + 1)
    if band.lo is not None:
      first = min(band.lo // band.block, last)
    else:
      first = jnp.minimum(lo // band.block, last)
    if band.hi is not None:
      start, stop, slots = first, last, num_blocks
    else:
      count = num_blocks - first
      # ceil((count + 1) / 2) iterations visit every diagonal: near f + p and far n - p (p >= 1)
      # until they meet.
      start, stop = 0, jnp.where(count > 0, (count + 2) // 2, 0)
      slots = num_blocks
      if band.lo is not None:
        stop, slots = (count + 2) // 2 if count > 0 else 0, max(count, 1)
    chunk = chunk_slots(slots, batch_heads, band.block, band.chunk_scores)
    return cls(band, num_blocks, first, start, stop, slots, chunk)

  @property
  def chunks(self) -> int:
    return -(-self.slots // self.chunk)

  def extend(self, x: Array | None) -> Array | None:
    """x ([b, n, ...]) twice along the blocks, then C zero blocks: every chunk's window fits."""
    if x is None:
      return None
    return jnp.concatenate([x, x, jnp.zeros_like(x[:, : self.chunk])], axis=1)

  def extended_zeros(self, x: Array, fill: float = 0.0) -> Array:
    """An extended float32 accumulator shaped like x."""
    shape = (x.shape[0], 2 * self.num_blocks + self.chunk) + x.shape[2:]
    return jnp.full(shape, fill, jnp.float32)

  def fold(self, total: Array) -> Array:
    """The key-side accumulator of `_Chunk.add_to_keys` back to n blocks."""
    n = self.num_blocks
    return total[:, :n] + total[:, n : 2 * n]

  def chunk_at(self, index: Int[Array, ""]) -> _Chunk:
    it, c = self.start + index // self.chunks, index % self.chunks
    slot = c * self.chunk + jnp.arange(self.chunk, dtype=jnp.int32)
    if self.band.hi is not None:
      return _Chunk.diagonal(self.num_blocks, slot, it, self.slots)
    near = self.first + it
    far_live = self.num_blocks - it > near
    return _Chunk.paired(self.num_blocks, slot, self.first, near, far_live, self.slots)

  def loop(self, body, init):
    """jax.lax.fori_loop over every chunk of every iteration; body(chunk, carry) -> carry."""
    count = (self.stop - self.start) * self.chunks
    return jax.lax.fori_loop(0, count, lambda i, c: body(self.chunk_at(i), c), init)


def _chunk_mask(
    band: _Band,
    lo: Int[Array, ""],
    chunk: _Chunk,
    q_segments: Int[Array, "b m i"] | None,
    k_segments: Int[Array, "b m j"] | None,
) -> Bool[Array, "b m 1 i j"]:
  """True where the slot's query (row i) may read its key (row j).

  Padded positions need no mask of their own: a key s >= T is only in the band of a query t > s,
  itself padded, whose output is dropped (so its cotangent is 0 and it adds nothing to gradients).
  """
  rows = jnp.arange(band.block, dtype=jnp.int32)
  t = chunk.q_blocks[:, None] * band.block + rows
  s = chunk.k_blocks[:, None] * band.block + rows
  lo = band.lo if band.lo is not None else lo
  mask = bands.band_mask(t[:, :, None], s[:, None, :], lo, band.hi) & chunk.live[:, None, None]
  mask = mask[None, :, None]
  if q_segments is not None:
    mask = mask & (q_segments[:, :, :, None] == k_segments[:, :, None, :])[:, :, None]
  return mask


def _merge(
    parts: list[tuple[Float[Array, "b n h i"], Float[Array, "b n h i"], Float[Array, "b n h i e"]]],
) -> tuple[Float[Array, "b n h i"], Float[Array, "b n h i"], Float[Array, "b n h i e"]]:
  """One (max, sum of exp(score - max), sum of exp(score - max) v) from softmax partials over
  disjoint key sets (max -inf, sums 0 where a partial has no key)."""
  new_max = functools.reduce(jnp.maximum, [m for m, _, _ in parts])
  # A row that has met no key yet keeps max -inf; shifting it by 0 keeps exp() NaN-free.
  shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
  scales = [jnp.exp(m - shift) for m, _, _ in parts]
  row_sum = sum(s * scale for (_, s, _), scale in zip(parts, scales))
  acc = sum(a * scale[..., None] for (_, _, a), scale in zip(parts, scales))
  return new_max, row_sum, acc


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
  batch, num_blocks, heads, _, _ = q.shape
  f32 = jnp.float32
  schedule = _Schedule.make(band, lo, num_blocks, batch * heads)
  q_x, k_x, v_x, segments_x = (schedule.extend(x) for x in (q, k, v, segments))

  def fold_chunk(chunk, state):
    q_segments = None if segments is None else chunk.queries(segments_x)
    k_segments = None if segments is None else chunk.keys(segments_x)
    mask = _chunk_mask(band, lo, chunk, q_segments, k_segments)
    scores = jnp.einsum(
        "bmhid,bmhjd->bmhij", chunk.queries(q_x), chunk.keys(k_x), preferred_element_type=f32
    )
    scores = jnp.where(mask, scores, -jnp.inf)
    # Each slot's own softmax partial, merged into its query block's running one.
    slot_max = scores.max(axis=-1)
    p = jnp.exp(scores - jnp.where(jnp.isneginf(slot_max), 0.0, slot_max)[..., None])
    pv = jnp.einsum(
        "bmhij,bmhje->bmhie", p.astype(v.dtype), chunk.keys(v_x), preferred_element_type=f32
    )
    return chunk.merge_into_queries(state, (slot_max, p.sum(axis=-1), pv))

  stats = q[..., 0]
  init = (
      schedule.extended_zeros(stats, -jnp.inf),
      schedule.extended_zeros(stats),
      schedule.extended_zeros(v),
  )
  row_max, row_sum, acc = (x[:, :num_blocks] for x in schedule.loop(fold_chunk, init))
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
  y, stats = remat.named(_forward(band, q, k, v, segments, lo))
  return y, (q, k, v, segments, lo, stats)


def _blocked_retrieve_bwd(band, residuals, dy):
  q, k, v, segments, lo, (row_max, row_sum) = residuals
  f32 = jnp.float32
  batch, num_blocks, heads, _, _ = q.shape
  schedule = _Schedule.make(band, lo, num_blocks, batch * heads)
  # p = exp(score - max) / sum: one reciprocal per row here saves a division per pair below.
  q_x, k_x, v_x, dy_x, segments_x, row_max_x, inverse_sum_x = (
      schedule.extend(x) for x in (q, k, v, dy, segments, row_max, 1.0 / row_sum)
  )

  def probs(chunk):
    q_s, k_s, v_s = chunk.queries(q_x), chunk.keys(k_x), chunk.keys(v_x)
    q_segments = None if segments is None else chunk.queries(segments_x)
    k_segments = None if segments is None else chunk.keys(segments_x)
    mask = _chunk_mask(band, lo, chunk, q_segments, k_segments)
    max_s, inverse_sum_s = chunk.queries(row_max_x), chunk.queries(inverse_sum_x)
    scores = jnp.einsum("bmhid,bmhjd->bmhij", q_s, k_s, preferred_element_type=f32)
    p = jnp.exp(jnp.where(mask, scores - max_s[..., None], -jnp.inf)) * inverse_sum_s[..., None]
    return q_s, k_s, v_s, p

  # D_i = sum_j p_ij dp_ij, summed from the same p and dp the gradient uses (a first pass). The
  # shortcut D_i = dy_i . y_i (or dy_i . sum_j p_ij v_j) differs by rounding, which q and k of norm
  # up to 65535 amplify.
  def add_correction(chunk, total):
    _, _, v_s, p = probs(chunk)
    dp = jnp.einsum("bmhie,bmhje->bmhij", chunk.queries(dy_x), v_s, preferred_element_type=f32)
    return chunk.add_to_queries(total, jnp.sum(p * dp, axis=-1))

  # Extended like dy: only the first n blocks are ever read, as live query blocks.
  correction = schedule.loop(add_correction, schedule.extended_zeros(row_max))

  def unfold_chunk(chunk, carry):
    dq, dk, dv = carry
    q_s, k_s, v_s, p = probs(chunk)
    dy_s = chunk.queries(dy_x)
    dp = jnp.einsum("bmhie,bmhje->bmhij", dy_s, v_s, preferred_element_type=f32)
    ds = p * (dp - chunk.queries(correction)[..., None])
    ds_k, ds_q = ds.astype(k.dtype), ds.astype(q.dtype)
    dq_s = jnp.einsum("bmhij,bmhjd->bmhid", ds_k, k_s, preferred_element_type=f32)
    dk_s = jnp.einsum("bmhij,bmhid->bmhjd", ds_q, q_s, preferred_element_type=f32)
    dv_s = jnp.einsum("bmhij,bmhie->bmhje", p.astype(dy.dtype), dy_s, preferred_element_type=f32)
    # Dead slots carry masked, hence zero, contributions.
    return (
        chunk.add_to_queries(dq, dq_s),
        chunk.add_to_keys(dk, dk_s),
        chunk.add_to_keys(dv, dv_s),
    )

  init = tuple(schedule.extended_zeros(x) for x in (q, k, v))
  dq, dk, dv = schedule.loop(unfold_chunk, init)
  dq, dk, dv = dq[:, :num_blocks], schedule.fold(dk), schedule.fold(dv)
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
  """The sequence as one block (diagonal 0 only), differentiated by plain autodiff.

  With a single block, the probabilities that `_blocked_retrieve`'s backward pass recomputes twice
  (to keep one chunk's temporaries alive at a time) are exactly one chunk's temporaries: storing
  them costs no more memory, and autodiff then needs one q . k product and one exp instead of
  three. The softmax is the reference's: masked scores, a shift without gradient, 0 on empty rows.
  """
  f32 = jnp.float32
  chunk = _Chunk.diagonal(1, jnp.zeros(1, jnp.int32), 0, 1)
  mask = _chunk_mask(band, lo, chunk, segments, segments)
  scores = jnp.einsum("bnhid,bnhjd->bnhij", q, k, preferred_element_type=f32)
  # Named: what a rematerialising backward reads instead of computing q . k again.
  scores = remat.named(jnp.where(mask, scores, -jnp.inf))
  # An empty row has max -inf; shifting it by 0 keeps every exp() at exp(-inf) = 0, NaN-free.
  row_max = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
  p = jnp.exp(scores - row_max)
  total = p.sum(axis=-1, keepdims=True)
  p = p / jnp.where(total > 0, total, 1.0)
  y = jnp.einsum("bnhij,bnhje->bnhie", p.astype(v.dtype), v, preferred_element_type=f32)
  return remat.named(y.astype(v.dtype))


@functools.partial(jax.jit, static_argnames=("static_lo", "hi", "block_size", "chunk_scores"))
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
    chunk_scores: int | None,
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
  band = _Band(lo=static_lo, hi=hi, block=block_size, chunk_scores=chunk_scores)
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
    chunk_scores: int | None = None,
    backend: str | None = None,
) -> Float[Array, "b t h e"]:
  """y[b, t, h] = sum_{s in S(t)} softmax_s(q[b, t, h] . k[b, s, h]) v[b, s, h], in O(T * B) memory.

  Inputs are assumed validated by `kernels_pallas.retrieve`. A Python int `lo` is compiled in (and
  lets the loop skip the offsets below it); a traced `lo` is one compilation for every value.
  `block_size` defaults to `default_block_size(T, hi)`; `chunk_scores` bounds the scores computed
  at once, by default `CHUNK_SCORES` (a cache size) when `backend` (default: JAX's) is the CPU and
  no bound elsewhere. Reverse-mode differentiable in q, k, v.
  """
  if chunk_scores is None and (backend or jax.default_backend()) == "cpu":
    chunk_scores = CHUNK_SCORES
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
      chunk_scores=chunk_scores,
  )
