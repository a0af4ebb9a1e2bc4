"""Block bookkeeping and the online-softmax update shared by the blocked retrieval kernels.

Time is cut into query blocks of Bq positions and key blocks of Bk positions (the sequence padded
to a multiple of both). A (query block, key block) tile is *live* when some query of the block may
read some key of the other: the delays t - s of the tile meet the band [lo, hi], and the two
blocks share a document id. Kernels visit live tiles only. The live key blocks of a query block
are consecutive (the band's are, and so are those of packed documents, runs of increasing ids),
so `schedule` gives each block's as a range, per batch row, that both kernels read
(scalar-prefetched on TPU, loaded in-kernel on GPU):

    kv_first[b, i] + [0, kv_count[b, i])   the live key blocks of query block i;
    q_first[b, j] + [0, q_count[b, j])     the live query blocks of key block j (backward).

Two integers per block fit the TPU's scalar memory at any length, where a table of every live
block of every block grows as T^2 (1 MiB at T = 64k, more than SMEM holds). With ids in another
order the range spans the live blocks and may hold dead ones, which `tile_mask` masks. A grid
step past the count visits the last live block again (`visited_block`): a TPU index map asks for
the block it already holds, so no DMA is issued.

With a block selection (`select.py`) the kernels visit lists instead of ranges: per (batch row,
head, block), the key blocks some query of the block selected, and per key block the query blocks
holding a query that selected it (`selected_visits`, `Visits`), in the same int32 tables (flat on
TPU, where they are b h n w integers of SMEM: the length they fit bounds the selection kernels);
each tile also masks the rows that did not select it.

Inside a live tile, `tile_mask` gives the exact band and document mask of its pairs, and
`online_softmax_update` folds the tile's scores into the running row max, row sum and accumulator
(all float32). The row max and row sum are kept apart to the end (`finish`): with v1's key scales
q . k reaches ~4e9, where max + log(sum) would round the log away.

Axis legend: b = batch, t = query time, s = key time, i = query block (or a row in it), j = key
block (or a column in it), e = head dim of v.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas import bands, select


class Schedule(NamedTuple):
  """Live tiles of a blocked retrieval (see the module docstring); all arrays int32."""

  kv_first: Int[Array, "b i"]
  kv_count: Int[Array, "b i"]
  q_first: Int[Array, "b j"]
  q_count: Int[Array, "b j"]


def max_key_blocks(block_q: int, block_k: int, hi: int | None, num_k_blocks: int) -> int:
  """A static bound on the live key blocks of one query block, valid for every lo >= 0.

  The tile (i, j) has delays in [i Bq - (j + 1) Bk + 1, (i + 1) Bq - 1 - j Bk]; it meets [0, hi]
  for at most (Bq + hi - 1) // Bk + 2 consecutive j.
  """
  if hi is None:
    return num_k_blocks
  return min(num_k_blocks, (block_q + hi - 1) // block_k + 2)


def max_query_blocks(block_q: int, block_k: int, hi: int | None, num_q_blocks: int) -> int:
  """A static bound on the live query blocks of one key block, valid for every lo >= 0."""
  if hi is None:
    return num_q_blocks
  return min(num_q_blocks, (block_k + hi - 1) // block_q + 2)


def _span(live: Bool[Array, "b r c"]) -> tuple[Int[Array, "b r"], Int[Array, "b r"]]:
  """(first, count) of the range from the first to the last live column of every row; (0, 0)
  for a row with none."""
  any_live = live.any(axis=-1)
  first = jnp.argmax(live, axis=-1).astype(jnp.int32)
  last = live.shape[-1] - 1 - jnp.argmax(live[..., ::-1], axis=-1).astype(jnp.int32)
  return jnp.where(any_live, first, 0), jnp.where(any_live, last - first + 1, 0)


def visited_block(first: bands.IntLike, count: bands.IntLike, step: bands.IntLike):
  """The block a kernel visits at `step` of a range: first + step, and past the count the last
  live block again (`first`, 0, when there is none)."""
  return first + jnp.minimum(step, jnp.maximum(count - 1, 0))


def schedule(
    segment_ids: Int[Array | np.ndarray, "b t"] | None,
    *,
    batch: int,
    seq_len: int,
    block_q: int,
    block_k: int,
    lo: bands.IntLike,
    hi: int | None,
) -> Schedule:
  """The live tiles for a sequence of `seq_len` positions (padded up to whole blocks).

  A tile is live when its delays meet [lo, hi], both blocks hold at least one real (unpadded)
  position, and (with segment ids) the ranges of document ids of the two blocks overlap. The last
  test is exact for packed documents (contiguous runs of increasing ids) and conservative
  otherwise: `tile_mask` still masks every pair exactly. Each block's range spans its live
  blocks; it holds at most `max_key_blocks` (`max_query_blocks`) of them, the band's bound.
  """
  num_q = -(-seq_len // block_q)
  num_k = -(-seq_len // block_k)
  i = jnp.arange(num_q, dtype=jnp.int32)[:, None]
  j = jnp.arange(num_k, dtype=jnp.int32)[None, :]
  max_delay = (i + 1) * block_q - 1 - j * block_k
  min_delay = i * block_q - (j + 1) * block_k + 1
  live = max_delay >= lo
  if hi is not None:
    live &= min_delay <= hi
  live = jnp.broadcast_to(live, (batch, num_q, num_k))
  if segment_ids is not None:
    q_lo, q_hi = _block_ranges(segment_ids, block_q, num_q)
    k_lo, k_hi = _block_ranges(segment_ids, block_k, num_k)
    live &= (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
  # Within the band's consecutive live blocks, so the static bounds hold.
  kv_first, kv_count = _span(live)
  q_first, q_count = _span(live.transpose(0, 2, 1))
  return Schedule(kv_first, kv_count, q_first, q_count)


def _block_ranges(
    segment_ids: Int[Array | np.ndarray, "b t"], block: int, num_blocks: int
) -> tuple[Int[Array, "b n"], Int[Array, "b n"]]:
  """Smallest and largest document id of the real positions of every block."""
  batch, seq_len = segment_ids.shape
  pad = num_blocks * block - seq_len
  ids = segment_ids.astype(jnp.int32)
  info = jnp.iinfo(jnp.int32)
  low = jnp.pad(ids, [(0, 0), (0, pad)], constant_values=info.max)
  high = jnp.pad(ids, [(0, 0), (0, pad)], constant_values=info.min)
  low = low.reshape(batch, num_blocks, block).min(axis=-1)
  high = high.reshape(batch, num_blocks, block).max(axis=-1)
  return low, high


def tile_mask(
    t: Int[Array, " i #j"],
    s: Int[Array, "#i j"],
    lo: bands.IntLike,
    hi: int | None,
    q_segments: Int[Array, " i #j"] | None = None,
    k_segments: Int[Array, "#i j"] | None = None,
) -> Bool[Array, "i j"]:
  """True where query time t may read key time s: inside the band and the same document.

  t and s broadcast against each other: a column [i, 1] and a row [1, j], or both [i, j].

  Keys past the end of the sequence need no mask of their own: such a key is only in the band of
  a query past the end too, whose output is cropped (so it adds nothing to any gradient).
  """
  mask = bands.band_mask(t, s, lo, hi)
  if q_segments is not None:
    mask &= q_segments == k_segments
  return mask


def online_softmax_update(
    row_max: Float[Array, "i 1"],
    row_sum: Float[Array, "i 1"],
    acc: Float[Array, "i e"],
    scores: Float[Array, "i j"],
    mask: Bool[Array, "i j"],
    v: Float[Array, "j e"],
    precision: jax.lax.DotAlgorithmPreset | None = None,
) -> tuple[Float[Array, "i 1"], Float[Array, "i 1"], Float[Array, "i e"]]:
  """Folds one tile's float32 scores (masked pairs excluded) into the running softmax state.

  Rows start at max -inf, sum 0 and acc 0; a row that has met no key keeps them (its exp()
  shift is 0, so nothing is NaN). `precision` is that of the p . v product.
  """
  scores = jnp.where(mask, scores, -jnp.inf)
  new_max = jnp.maximum(row_max, scores.max(axis=-1, keepdims=True))
  shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
  p = jnp.exp(scores - shift)
  rescale = jnp.exp(row_max - shift)
  row_sum = row_sum * rescale + p.sum(axis=-1, keepdims=True)
  pv = jax.lax.dot_general(
      p.astype(v.dtype),
      v,
      (((1,), (0,)), ((), ())),
      precision=precision,
      preferred_element_type=jnp.float32,
  )
  return new_max, row_sum, acc * rescale + pv


def finish(
    row_max: Float[Array, "i 1"], row_sum: Float[Array, "i 1"], acc: Float[Array, "i e"]
) -> tuple[Float[Array, "i e"], Float[Array, "i 1"], Float[Array, "i 1"]]:
  """Output rows (float32; exactly 0 for empty rows) and the saved (row max, row sum).

  Empty rows save max 0 and sum 1, so the backward's recomputed p = exp(s - max) / sum is finite;
  their pairs are all masked, so it is never used.
  """
  nonempty = row_sum > 0
  safe_sum = jnp.where(nonempty, row_sum, 1.0)
  return acc / safe_sum, jnp.where(nonempty, row_max, 0.0), safe_sum


def probabilities(
    scores: Float[Array, "i j"],
    mask: Bool[Array, "i j"],
    row_max: Float[Array, " i #j"],
    row_sum: Float[Array, " i #j"],
) -> Float[Array, "i j"]:
  """The forward's softmax weights of one tile, recomputed from the saved row max and row sum
  (columns [i, 1], or broadcast to the tile)."""
  return jnp.where(mask, jnp.exp(scores - row_max), 0.0) / row_sum


class Visits(NamedTuple):
  """The blocks the kernels visit for a block selection (`selected_visits`); all int32."""

  kv_count: Int[Array, "b h n"]  # How many key blocks some query of query block n selected,
  kv_list: Int[Array, "b h n w"]  # which, in increasing order (then padding);
  q_count: Int[Array, "b h n"]  # how many query blocks hold a query that selected key block n,
  q_list: Int[Array, "b h n w"]  # which, in increasing order (then padding);
  chosen: Int[Array, "b t h k"]  # each query's selected blocks, -1 for none (k a power of two).


def selected_visits(selected: select.Selected, num_blocks: int, block: int) -> Visits:
  """The lists of blocks the kernels visit for the queries' `selected` blocks of B = `block`
  positions (query blocks are B positions too), over a sequence padded to `num_blocks` blocks."""
  batch, seq_len, heads, width = selected.blocks.shape
  padded = num_blocks * block
  chosen = jnp.where(selected.valid, selected.blocks, -1).astype(jnp.int32)
  pad = [(0, 0), (0, padded - seq_len), (0, 0), (0, (1 << max(width - 1, 0).bit_length()) - width)]
  chosen = jnp.pad(chosen, pad, constant_values=-1)
  # hit[b, h, i, j]: some query of block i selected key block j (column num_blocks: none).
  rows = jnp.arange(batch)[:, None, None, None]
  head = jnp.arange(heads)[None, None, :, None]
  query_block = (jnp.arange(padded) // block)[None, :, None, None]
  key_block = jnp.where(chosen >= 0, chosen, num_blocks)
  hit = jnp.zeros((batch, heads, num_blocks, num_blocks + 1), bool)
  hit = hit.at[rows, head, query_block, key_block].set(True)[..., :num_blocks]

  def listed(hit, most):
    # A stable sort of "not hit" puts the hit blocks first, in increasing order.
    order = jnp.argsort(~hit, axis=-1, stable=True)[..., :most].astype(jnp.int32)
    return hit.sum(axis=-1, dtype=jnp.int32), order

  kv_count, kv_list = listed(hit, min(num_blocks, block * chosen.shape[-1]))
  q_count, q_list = listed(hit.swapaxes(-1, -2), num_blocks)
  return Visits(kv_count, kv_list, q_count, q_list, chosen)


class Padded(NamedTuple):
  """The inputs of a blocked kernel: T zero-padded to whole blocks, the head dims to the kernel's
  widths, and the blocks to visit (`padded_inputs`)."""

  q: Float[Array, "b t h d"]
  k: Float[Array, "b t h d"]
  v: Float[Array, "b t h e"]
  segments: Int[Array, "b t"] | None  # int32 document ids, or None.
  schedule: Schedule | Visits
  num_blocks: int


def padded_inputs(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t h d"],
    v: Float[Array, "b t h e"],
    segment_ids: Int[Array, "b t"] | None,
    lo: bands.IntLike,
    selected: select.Selected | None,
    *,
    hi: int | None,
    block: int,
    widths: tuple[int, int],
) -> Padded:
  """q, k and v zero-padded to whole blocks of B = `block` and to head dims `widths` (of q and k,
  and of v), the document ids padded, and the live-block `schedule` (or, with a block selection,
  the `selected_visits`) of query and key blocks of B.

  Padded positions and head columns are zeros, so every score and product they enter is finite;
  the kernels' outputs are cropped back to [:T, :e].
  """
  batch, seq_len = q.shape[:2]
  num_blocks = -(-seq_len // block)
  extra = num_blocks * block - seq_len

  def pad(x, width):
    return jnp.pad(x, [(0, 0), (0, extra), (0, 0), (0, width - x.shape[-1])])

  if selected is None:
    found = schedule(
        segment_ids, batch=batch, seq_len=seq_len, block_q=block, block_k=block, lo=lo, hi=hi
    )
  else:
    found = selected_visits(selected, num_blocks, block)
  segments = None
  if segment_ids is not None:
    segments = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, extra)])
  dim, value_dim = widths
  return Padded(pad(q, dim), pad(k, dim), pad(v, value_dim), segments, found, num_blocks)


def visits(schedule: Schedule | Visits, side: str) -> tuple[Array, Array]:
  """(count, first or list) of the blocks the kernels of `side` visit: "kv" for the query-major
  kernels (forward, D, dq), which reduce over key blocks; "q" for the key-major dkv kernel."""
  if isinstance(schedule, Visits):
    return getattr(schedule, f"{side}_count"), getattr(schedule, f"{side}_list")
  return getattr(schedule, f"{side}_count"), getattr(schedule, f"{side}_first")
