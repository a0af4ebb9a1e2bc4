"""Band-masked retrieval as Mosaic GPU Pallas kernels (Hopper warpgroup MMAs): forward, backward.

The algorithm of `pallas_gpu` (docs/accelerators.md, "Pallas's Mosaic GPU backend") on the backend
JAX now recommends for NVIDIA GPUs, which Pallas's Triton backend is deprecated for (jax 0.11):

    forward  per query block: fold the live key blocks into the running row max, row sum and
             accumulator (float32, in registers); write y and the per-row (max, sum).
    dq       per query block, two loops over the live key blocks, both recomputing p from the
             saved per-row max and sum and dp = dy . v: the first sums D = sum_s p dp, the second
             dq = sum_s p (dp - D) k. D is written out.
    dkv      per key block, one loop over its live query blocks: dk = sum_t p (dp - D) q and
             dv = sum_t p dy, with D from the dq kernel.

Every kernel runs one program (one warpgroup of 128 threads) per (block, batch row, head) and
loops with `jax.lax.fori_loop` over the live blocks of the other side, `blocks.schedule`'s range
of them, read as scalars from global memory. Tiles reach shared memory by TMA, two slots deep:
the next live block is copied while the current one is computed. The six products are warpgroup
MMAs (`plgpu.wgmma`, float32 accumulators) of shared-memory tiles: q . k^T with the key tile
transposed in place, and the backward's p^T . dy and ds^T . q with p and ds stored to shared
memory and read transposed. So every kernel forms the scores as the same q . k^T product of a
query tile and a key tile, and the backward recomputes the forward's p bit for bit (the row max
and row sum are kept apart, as in `pallas_gpu`: v1's q . k reaches ~4e9).

Constraints of the hardware: a warpgroup MMA has 64 rows, so B is a multiple of 64; head dims are
zero-padded to a multiple of 64 (128-byte rows of 16-bit elements; zeros change no score and add
zero columns, which are cropped) and may reach 256, the widest MMA. Inputs are bfloat16 or
float16: a warpgroup MMA runs float32 as TF32 (10-bit mantissa) and has no three-pass mode, which
v1's scores do not survive, so float32 is refused (`pallas_gpu` and `xla` take it).

Off GPU the kernels run in Pallas's Mosaic GPU interpreter (`plgpu.InterpretGPUParams`, public
from jax 0.12), which simulates shared memory, TMA, barriers and the MMAs on the CPU; the CPU
tests run them there and lower them for an H100 (no GPU needed). A block selection is read by the
same kernels (`retrieve_pallas_mosaic_gpu_selected`), as in `pallas_gpu`: they visit lists of
blocks instead of ranges and mask the rows that did not select a block.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v, n = blocks, i = query rows of a block, j = key columns of a block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Bool, Float, Int, Shaped

from kernels_pallas import bands, blocks, remat, select

# Rows of one warpgroup MMA: B is a multiple of it. One warpgroup per program keeps the register
# budget of the backward's four [B, B] float32 tiles (s, p, dp, ds) at B = 64.
WARPGROUP_ROWS = 64
DEFAULT_BLOCK_SIZE = WARPGROUP_ROWS
# Head dims are padded to a multiple of 64 elements: 128 bytes of 16-bit elements, one swizzled
# row of a TMA tile. 256 is the widest output of one warpgroup MMA.
DIM_MULTIPLE = 64
MAX_DIM = 256
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Slots of every tile of the other side: one computed while the next is copied in.
SLOTS = 2

_LAYOUT = plgpu.Layout.WGMMA
_ROWS = _LAYOUT.reduce(1)  # A vector over the rows of a tile (one value per query).
_COLUMNS = _LAYOUT.reduce(0)  # A vector over the columns of a tile (one value per key).


@dataclasses.dataclass(frozen=True)
class _Config:
  """The static part of a call.

  Attributes:
    block: B, the positions of a query block and of a key block.
    hi: largest delay, or None.
    num_blocks: blocks of the padded sequence.
    segmented: whether document ids are passed.
    interpret: whether to run Pallas's Mosaic GPU interpreter instead of compiling.
    selected: whether the kernels visit listed blocks of a block selection (`blocks.Visits`)
      instead of ranges, and mask the rows that did not select a block.
  """

  block: int
  hi: int | None
  num_blocks: int
  segmented: bool
  interpret: bool
  selected: bool = False


def can_run(backend: str | None = None) -> bool:
  """Whether the kernels run on `backend` (None: JAX's default): compiled on a GPU, elsewhere in
  the Mosaic GPU interpreter, which jax >= 0.12 exports."""
  return (backend or jax.default_backend()) == "gpu" or hasattr(plgpu, "InterpretGPUParams")


def interpreter_params() -> Any:
  """The Mosaic GPU interpreter's parameters; a named error on a JAX that does not export it."""
  params = getattr(plgpu, "InterpretGPUParams", None)
  if params is None:
    raise RuntimeError(
        "running the Mosaic GPU kernels off a GPU needs Pallas's Mosaic GPU interpreter, public "
        f"from jax 0.12 (plgpu.InterpretGPUParams); this is jax {jax.__version__}"
    )
  return params()


def check_inputs(q: Array, v: Array, block_size: int) -> None:
  """Raises unless the dtype, head dims and B are ones the kernels take (module docstring)."""
  if jnp.dtype(q.dtype) not in DTYPES:
    raise TypeError(
        f"pallas_mosaic_gpu takes bfloat16 or float16 inputs, got {q.dtype}: its warpgroup MMAs "
        "would run float32 as TF32; use impl='pallas_gpu' or 'xla' for float32"
    )
  if max(q.shape[-1], v.shape[-1]) > MAX_DIM:
    raise ValueError(
        f"pallas_mosaic_gpu takes head dims up to {MAX_DIM}, got d = {q.shape[-1]} and "
        f"e = {v.shape[-1]}"
    )
  if block_size < WARPGROUP_ROWS or block_size % WARPGROUP_ROWS:
    raise ValueError(
        f"block_size must be a multiple of {WARPGROUP_ROWS} for the Mosaic GPU kernels "
        f"(the rows of a warpgroup MMA), got {block_size}"
    )


# ----------------------------------------------------------------------------- in-kernel helpers


def _product(a: Any, b: Any, shape: tuple[int, int]) -> Float[Array, "m n"]:
  """a @ b of two shared-memory tiles (either may be a transposed view) as one warpgroup MMA,
  accumulated in float32."""

  def multiply(acc):
    plgpu.wgmma(acc, a, b)
    return acc[...]

  return pl.run_scoped(multiply, plgpu.ACC(shape, jnp.float32))


def _per_row(x: Shaped[Array, " i"], width: int) -> Shaped[Array, "i j"]:
  """A per-row vector broadcast over `width` columns."""
  return jax.lax.broadcast_in_dim(x, (x.shape[0], width), [0])


def _store(values: Array, smem: Any, gmem: Any) -> None:
  """values -> shared memory -> (TMA) global memory; waits in `_finish_stores`."""
  smem[...] = values.astype(smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(smem, gmem)


def _finish_stores() -> None:
  """Waits until every `_store` of the program has reached global memory."""
  plgpu.wait_smem_to_gmem(0)


def _fetch_now(pairs: list[tuple[Any, Any]]) -> None:
  """Copies every (global, shared) pair by TMA and waits for all of them (one barrier each)."""

  def copy(barriers):
    for index, (src, dst) in enumerate(pairs):
      plgpu.copy_gmem_to_smem(src, dst, barriers.at[index])
    for index in range(len(pairs)):
      plgpu.barrier_wait(barriers.at[index])

  pl.run_scoped(copy, plgpu.Barrier(num_arrivals=1, num_barriers=len(pairs)))


def _block_rows(index: bands.IntLike, block: int) -> pl.Slice:
  """Positions [index * B, (index + 1) * B)."""
  return pl.ds(index * block, block)


class _Visits:
  """The blocks of the other side a program visits: the live range first + [0, count) of
  `blocks.schedule` ([b, n] tables), or with a block selection the listed blocks ([b, h, n] counts
  and [b, h, n, w] lists of `blocks.selected_visits`)."""

  def __init__(self, config: _Config, count_ref: Any, table_ref: Any, n, b, h):
    if config.selected:
      self.count = count_ref[b, h, n]
      self._block_at = lambda step: table_ref[b, h, n, step]
    else:
      self.count, first = count_ref[b, n], table_ref[b, n]
      self._block_at = lambda step: first + step

  def block(self, step: bands.IntLike) -> Int[Array, ""]:
    """The block visited at `step` < count."""
    return self._block_at(step)


def _pipelined_loop(visits: _Visits, fetch: Any, compute: Any, init: Any) -> Any:
  """compute(block, slot, carry) over the visited blocks, the tiles of each in its slot.

  `fetch(block)` lists the (global, shared with a leading slot axis) pairs of a visited block,
  each copied with a barrier of its own per slot. The tiles of step + 1 are copied in while step
  is computed; a slot is refilled only after its step's products have been read.
  """

  def run(barriers):
    def issue(step, slot):
      for (src, dst), barrier in zip(fetch(visits.block(step)), barriers, strict=True):
        plgpu.copy_gmem_to_smem(src, dst.at[slot], barrier.at[slot])

    @pl.when(visits.count > 0)
    def _():
      issue(0, 0)

    def body(step, carry):
      slot = jax.lax.rem(step, SLOTS)

      @pl.when(step + 1 < visits.count)
      def _():
        issue(step + 1, 1 - slot)

      for barrier in barriers:
        plgpu.barrier_wait(barrier.at[slot])
      return compute(visits.block(step), slot, carry)

    return jax.lax.fori_loop(0, visits.count, body, init)

  # fetch(0) only builds the views of block 0, to count the pairs: it copies nothing.
  slots = [plgpu.Barrier(num_arrivals=1, num_barriers=SLOTS) for _ in fetch(0)]
  return pl.run_scoped(run, slots)


@dataclasses.dataclass(frozen=True)
class _Extras:
  """The int32 per-position inputs beside the tiles, in shared memory: the document ids [b, t]
  (segmented), and with a block selection the queries' selected blocks, transposed to [b, h, k, t]
  (-1 for none). Each kernel copies those of its own block once and those of every visited block
  into slots; `query_major` says whether its own block is a query block (forward, dq) or a key
  block (dkv). A shared-memory buffer is read in one register layout (`_ROWS` for queries,
  `_COLUMNS` for keys), so own and visited document ids have buffers apart."""

  config: _Config
  query_major: bool
  segment_ref: Any
  chosen_ref: Any

  @property
  def _width(self) -> int:
    return self.chosen_ref.shape[2]

  def scratch(self) -> dict[str, Any]:
    """The shared memory to allocate (keyword arguments of `pl.run_scoped`)."""
    block, found = self.config.block, {}
    if self.config.segmented:
      found.update(
          own_seg=plgpu.SMEM((block,), jnp.int32), other_seg=plgpu.SMEM((SLOTS, block), jnp.int32)
      )
    if self.config.selected:
      shape = (self._width, block) if self.query_major else (SLOTS, self._width, block)
      found.update(chosen=plgpu.SMEM(shape, jnp.int32))
    return found

  def own_pairs(self, smem: dict, b, h, rows: pl.Slice) -> list[tuple[Any, Any]]:
    """(global, shared) copies of the own block's extras."""
    pairs = []
    if self.config.segmented:
      pairs.append((self.segment_ref.at[b, rows], smem["own_seg"]))
    if self.config.selected and self.query_major:
      pairs.append((self.chosen_ref.at[b, h, :, rows], smem["chosen"]))
    return pairs

  def other_pairs(self, smem: dict, b, h, rows: pl.Slice) -> list[tuple[Any, Any]]:
    """(global, shared with a slot axis) copies of a visited block's extras."""
    pairs = []
    if self.config.segmented:
      pairs.append((self.segment_ref.at[b, rows], smem["other_seg"]))
    if self.config.selected and not self.query_major:
      pairs.append((self.chosen_ref.at[b, h, :, rows], smem["chosen"]))
    return pairs

  def _segments(self, ref: Any, queries: bool) -> Int[Array, " i"]:
    """Document ids in the register layout of the queries' side (rows) or the keys' (columns)."""
    return plgpu.load(ref, layout=_ROWS if queries else _COLUMNS)

  def _chosen(self, ref: Any) -> list[Int[Array, " i"]]:
    """The queries' selected blocks, one per-row vector per selected block."""
    return [plgpu.load(ref.at[i], layout=_ROWS) for i in range(self._width)]

  def load_own(self, smem: dict) -> dict[str, Any]:
    """The own block's extras in registers, read once before the loop over visited blocks."""
    found = {}
    if self.config.segmented:
      found["seg"] = self._segments(smem["own_seg"], self.query_major)
    if self.config.selected and self.query_major:
      found["chosen"] = self._chosen(smem["chosen"])
    return found

  def mask(
      self,
      smem: dict,
      own_extras: dict[str, Any],
      lo: Int[Array, ""],
      own: Int[Array, ""],
      other: Int[Array, ""],
      slot: Int[Array, ""],
  ) -> Bool[Array, "i j"]:
    """The mask of the tile of the own block (its extras `load_own`) and the other block
    visited in `slot`: the band (`blocks.tile_mask` on whole [B, B] index tiles), the documents,
    and with a block selection the rows that selected the key block."""
    config, shape = self.config, (self.config.block, self.config.block)
    query_block, key_block = (own, other) if self.query_major else (other, own)
    t = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=_LAYOUT) + query_block * config.block
    s = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=_LAYOUT) + key_block * config.block
    segments = ()
    if config.segmented:
      other_seg = self._segments(smem["other_seg"].at[slot], not self.query_major)
      q_seg, k_seg = (
          (own_extras["seg"], other_seg) if self.query_major else (other_seg, own_extras["seg"])
      )
      segments = (_per_row(q_seg, config.block), jax.lax.broadcast_in_dim(k_seg, shape, [1]))
    mask = blocks.tile_mask(t, s, lo, config.hi, *segments)
    if not config.selected:
      return mask
    chosen = own_extras["chosen"] if self.query_major else self._chosen(smem["chosen"].at[slot])
    # A sum of matches, as `pallas_gpu._rows_that_chose` (one per selected block of each row).
    hits = sum((row == key_block).astype(jnp.int32) for row in chosen)
    return mask & (_per_row(hits, config.block) > 0)


def _split_refs(config: _Config, refs: tuple[Any, ...]) -> tuple[Any, Any, tuple[Any, ...]]:
  """(the document ids' ref or None, the selected blocks' ref or None, the output refs) from a
  kernel's trailing refs."""
  segment_ref = chosen_ref = None
  if config.segmented:
    segment_ref, refs = refs[0], refs[1:]
  if config.selected:
    chosen_ref, refs = refs[0], refs[1:]
  return segment_ref, chosen_ref, refs


# ----------------------------------------------------------------------------------- the kernels
#
# Every kernel takes lo, the blocks its side visits (`_Visits`), its inputs ([b, t, h, width]
# arrays and [b, h, t] per-row statistics), the extras (`_Extras`), then its outputs. Program
# (n, b, h) owns block n of batch row b and head h (`_Program`). Shared memory and barriers are
# allocated with `pl.run_scoped`; the other side's tiles have a leading slot axis.


@dataclasses.dataclass(frozen=True)
class _Program:
  """What every kernel starts from: program (n, b, h), lo, its own positions, the blocks it
  visits, its extras, and its output refs."""

  n: Int[Array, ""]
  b: Int[Array, ""]
  h: Int[Array, ""]
  lo: Int[Array, ""]
  own: pl.Slice
  visits: _Visits
  extras: _Extras
  outputs: tuple[Any, ...]

  @classmethod
  def start(cls, config: _Config, lo_ref, count_ref, table_ref, refs, *, query_major: bool):
    """`refs` are the kernel's trailing refs: the extras' inputs, then its outputs."""
    segment_ref, chosen_ref, outputs = _split_refs(config, refs)
    n, b, h = (jax.lax.axis_index(axis) for axis in ("n", "b", "h"))
    return cls(
        n=n,
        b=b,
        h=h,
        lo=lo_ref[0],
        own=_block_rows(n, config.block),
        visits=_Visits(config, count_ref, table_ref, n, b, h),
        extras=_Extras(config, query_major, segment_ref, chosen_ref),
        outputs=outputs,
    )

  def fetch_own(self, pairs: list[tuple[Any, Any]], smem: dict) -> dict[str, Any]:
    """Copies the own block's tiles (`pairs`) and extras in; returns the extras `load_own`."""
    _fetch_now(pairs + self.extras.own_pairs(smem, self.b, self.h, self.own))
    return self.extras.load_own(smem)

  def mask(self, smem, own_extras, other, slot) -> Bool[Array, "i j"]:
    """`_Extras.mask` of the tile of the own block and `other`."""
    return self.extras.mask(smem, own_extras, self.lo, self.n, other, slot)


def _forward_kernel(lo_ref, count_ref, table_ref, q_ref, k_ref, v_ref, *refs, config: _Config):
  """Folds the visited key blocks of one query block into y and its per-row (max, sum)."""
  prog = _Program.start(config, lo_ref, count_ref, table_ref, refs, query_major=True)
  y_ref, max_ref, sum_ref = prog.outputs
  b, h, own, block = prog.b, prog.h, prog.own, config.block
  dim, value_dim, dtype = q_ref.shape[-1], v_ref.shape[-1], q_ref.dtype
  scratch = dict(
      q=plgpu.SMEM((block, dim), dtype),
      k=plgpu.SMEM((SLOTS, block, dim), dtype),
      v=plgpu.SMEM((SLOTS, block, value_dim), dtype),
      p=plgpu.SMEM((block, block), dtype),
      y=plgpu.SMEM((block, value_dim), dtype),
      row_max=plgpu.SMEM((block,), jnp.float32),
      row_sum=plgpu.SMEM((block,), jnp.float32),
      **prog.extras.scratch(),
  )

  def scoped(q, k, v, p, y, row_max, row_sum, **smem):
    own_extras = prog.fetch_own([(q_ref.at[b, own, h], q)], smem)

    def fetch(key_block):
      keys = _block_rows(key_block, block)
      pairs = [(k_ref.at[b, keys, h], k), (v_ref.at[b, keys, h], v)]
      return pairs + prog.extras.other_pairs(smem, b, h, keys)

    def fold(key_block, slot, carry):
      running_max, running_sum, acc = carry
      mask = prog.mask(smem, own_extras, key_block, slot)
      scores = _product(q, k.at[slot].transpose((1, 0)), (block, block))
      # `blocks.online_softmax_update`, on per-row vectors and with p . v as a warpgroup MMA.
      scores = jnp.where(mask, scores, -jnp.inf)
      new_max = jnp.maximum(running_max, scores.max(axis=1))
      shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
      weights = jnp.exp(scores - _per_row(shift, block))
      rescale = jnp.exp(running_max - shift)
      running_sum = running_sum * rescale + weights.sum(axis=1)
      p[...] = weights.astype(dtype)
      plgpu.commit_smem()
      pv = _product(p, v.at[slot], (block, value_dim))
      return new_max, running_sum, acc * _per_row(rescale, value_dim) + pv

    init = (
        plgpu.layout_cast(jnp.full((block,), -jnp.inf, jnp.float32), _ROWS),
        plgpu.layout_cast(jnp.zeros((block,), jnp.float32), _ROWS),
        plgpu.layout_cast(jnp.zeros((block, value_dim), jnp.float32), _LAYOUT),
    )
    # A query block with no live key block runs no step and writes the empty rows' zeros.
    running_max, running_sum, acc = _pipelined_loop(prog.visits, fetch, fold, init)
    # `blocks.finish`: empty rows output 0 and save max 0 and sum 1.
    nonempty = running_sum > 0
    safe_sum = jnp.where(nonempty, running_sum, 1.0)
    _store(acc / _per_row(safe_sum, value_dim), y, y_ref.at[b, own, h])
    _store(jnp.where(nonempty, running_max, 0.0), row_max, max_ref.at[b, h, own])
    _store(safe_sum, row_sum, sum_ref.at[b, h, own])
    _finish_stores()

  pl.run_scoped(scoped, **scratch)


def _probabilities(
    scores: Float[Array, "i j"],
    mask: Bool[Array, "i j"],
    row_max: Float[Array, " i"],
    row_sum: Float[Array, " i"],
) -> Float[Array, "i j"]:
  """`blocks.probabilities` with the saved statistics as per-row vectors."""
  width = scores.shape[1]
  return blocks.probabilities(scores, mask, _per_row(row_max, width), _per_row(row_sum, width))


def _dq_kernel(
    lo_ref, count_ref, table_ref, q_ref, k_ref, v_ref, dy_ref, max_ref, sum_ref, *refs, config
):
  """D = sum_s p dp, then dq = sum_s p (dp - D) k, for the rows of one query block."""
  prog = _Program.start(config, lo_ref, count_ref, table_ref, refs, query_major=True)
  dq_ref, correction_ref = prog.outputs
  b, h, own, block = prog.b, prog.h, prog.own, config.block
  dim, value_dim, dtype = q_ref.shape[-1], v_ref.shape[-1], q_ref.dtype
  scratch = dict(
      q=plgpu.SMEM((block, dim), dtype),
      dy=plgpu.SMEM((block, value_dim), dtype),
      row_max=plgpu.SMEM((block,), jnp.float32),
      row_sum=plgpu.SMEM((block,), jnp.float32),
      k=plgpu.SMEM((SLOTS, block, dim), dtype),
      v=plgpu.SMEM((SLOTS, block, value_dim), dtype),
      ds=plgpu.SMEM((block, block), dtype),
      correction=plgpu.SMEM((block,), jnp.float32),
      **prog.extras.scratch(),
  )

  def scoped(q, dy, row_max, row_sum, k, v, ds, correction, **smem):
    own_tiles = [
        (q_ref.at[b, own, h], q),
        (dy_ref.at[b, own, h], dy),
        (max_ref.at[b, h, own], row_max),
        (sum_ref.at[b, h, own], row_sum),
    ]
    own_extras = prog.fetch_own(own_tiles, smem)
    saved_max = plgpu.load(row_max, layout=_ROWS)
    saved_sum = plgpu.load(row_sum, layout=_ROWS)

    def fetch(key_block):
      keys = _block_rows(key_block, block)
      pairs = [(k_ref.at[b, keys, h], k), (v_ref.at[b, keys, h], v)]
      return pairs + prog.extras.other_pairs(smem, b, h, keys)

    def tile(key_block, slot):
      """The tile's p and dp = dy . v^T (float32)."""
      mask = prog.mask(smem, own_extras, key_block, slot)
      scores = _product(q, k.at[slot].transpose((1, 0)), (block, block))
      p = _probabilities(scores, mask, saved_max, saved_sum)
      return p, _product(dy, v.at[slot].transpose((1, 0)), (block, block))

    def add_correction(key_block, slot, total):
      p, dp = tile(key_block, slot)
      return total + (p * dp).sum(axis=1)

    zeros = plgpu.layout_cast(jnp.zeros((block,), jnp.float32), _ROWS)
    total = _pipelined_loop(prog.visits, fetch, add_correction, zeros)

    def add_dq(key_block, slot, dq):
      p, dp = tile(key_block, slot)
      ds[...] = (p * (dp - _per_row(total, block))).astype(dtype)
      plgpu.commit_smem()
      return dq + _product(ds, k.at[slot], (block, dim))

    zeros = plgpu.layout_cast(jnp.zeros((block, dim), jnp.float32), _LAYOUT)
    dq = _pipelined_loop(prog.visits, fetch, add_dq, zeros)
    # q's tile is read for the last time above: dq reuses its shared memory.
    _store(dq, q, dq_ref.at[b, own, h])
    _store(total, correction, correction_ref.at[b, h, own])
    _finish_stores()

  pl.run_scoped(scoped, **scratch)


def _dkv_kernel(
    lo_ref,
    count_ref,
    table_ref,
    q_ref,
    k_ref,
    v_ref,
    dy_ref,
    max_ref,
    sum_ref,
    correction_ref,
    *refs,
    config,
):
  """dk = sum_t p (dp - D) q and dv = sum_t p dy for the columns of one key block."""
  prog = _Program.start(config, lo_ref, count_ref, table_ref, refs, query_major=False)
  dk_ref, dv_ref = prog.outputs
  b, h, own, block = prog.b, prog.h, prog.own, config.block
  dim, value_dim, dtype = q_ref.shape[-1], v_ref.shape[-1], q_ref.dtype
  scratch = dict(
      k=plgpu.SMEM((block, dim), dtype),
      v=plgpu.SMEM((block, value_dim), dtype),
      q=plgpu.SMEM((SLOTS, block, dim), dtype),
      dy=plgpu.SMEM((SLOTS, block, value_dim), dtype),
      row_max=plgpu.SMEM((SLOTS, block), jnp.float32),
      row_sum=plgpu.SMEM((SLOTS, block), jnp.float32),
      correction=plgpu.SMEM((SLOTS, block), jnp.float32),
      p=plgpu.SMEM((block, block), dtype),
      ds=plgpu.SMEM((block, block), dtype),
      **prog.extras.scratch(),
  )

  def scoped(k, v, q, dy, row_max, row_sum, correction, p, ds, **smem):
    own_extras = prog.fetch_own([(k_ref.at[b, own, h], k), (v_ref.at[b, own, h], v)], smem)

    def fetch(query_block):
      rows = _block_rows(query_block, block)
      pairs = [
          (q_ref.at[b, rows, h], q),
          (dy_ref.at[b, rows, h], dy),
          (max_ref.at[b, h, rows], row_max),
          (sum_ref.at[b, h, rows], row_sum),
          (correction_ref.at[b, h, rows], correction),
      ]
      return pairs + prog.extras.other_pairs(smem, b, h, rows)

    def fold(query_block, slot, carry):
      dk, dv = carry
      mask = prog.mask(smem, own_extras, query_block, slot)
      # The scores as the forward forms them: q . k^T, one row per query.
      scores = _product(q.at[slot], k.transpose((1, 0)), (block, block))
      saved_max = plgpu.load(row_max.at[slot], layout=_ROWS)
      saved_sum = plgpu.load(row_sum.at[slot], layout=_ROWS)
      weights = _probabilities(scores, mask, saved_max, saved_sum)
      dp = _product(dy.at[slot], v.transpose((1, 0)), (block, block))
      total = plgpu.load(correction.at[slot], layout=_ROWS)
      p[...] = weights.astype(dtype)
      ds[...] = (weights * (dp - _per_row(total, block))).astype(dtype)
      plgpu.commit_smem()
      dk = dk + _product(ds.transpose((1, 0)), q.at[slot], (block, dim))
      dv = dv + _product(p.transpose((1, 0)), dy.at[slot], (block, value_dim))
      return dk, dv

    init = (
        plgpu.layout_cast(jnp.zeros((block, dim), jnp.float32), _LAYOUT),
        plgpu.layout_cast(jnp.zeros((block, value_dim), jnp.float32), _LAYOUT),
    )
    dk, dv = _pipelined_loop(prog.visits, fetch, fold, init)
    # The own tiles are read for the last time above: dk and dv reuse their shared memory.
    _store(dk, k, dk_ref.at[b, own, h])
    _store(dv, v, dv_ref.at[b, own, h])
    _finish_stores()

  pl.run_scoped(scoped, **scratch)


# ---------------------------------------------------------------------------------- kernel calls


def _call(
    config: _Config,
    kernel: Any,
    *,
    table: tuple[Array, Array],
    lo: Int[Array, 1],
    inputs: list[Array],
    segments: Int[Array, "b t"] | None,
    chosen: Int[Array, "b h k t"] | None,
    out_shape: list[jax.ShapeDtypeStruct],
) -> tuple[Array, ...]:
  """One kernel over the grid (n, b, h) (see "the kernels"): `table` is (count, first) of the
  live ranges or (count, list) of a block selection (`blocks.visits`)."""
  batch, _, heads, _ = inputs[0].shape
  call = plgpu.kernel(
      functools.partial(kernel, config=config),
      out_type=out_shape,
      grid=(config.num_blocks, batch, heads),
      grid_names=("n", "b", "h"),
      interpret=interpreter_params() if config.interpret else None,
  )
  extras = [x for x in (segments, chosen) if x is not None]
  return tuple(call(lo, *table, *inputs, *extras))


def _chosen(schedule: blocks.Schedule | blocks.Visits) -> Int[Array, "b h k t"] | None:
  """The queries' selected blocks, time last (one row of a block is one TMA copy), or None."""
  if isinstance(schedule, blocks.Visits):
    return schedule.chosen.transpose(0, 2, 3, 1)
  return None


def _forward(config, q, k, v, segments, schedule, lo):
  """y (input dtype) and the per-row max and sum (float32; 0 and 1 on empty rows)."""
  batch, seq_len, heads, _ = q.shape
  stats = jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32)
  return _call(
      config,
      _forward_kernel,
      table=blocks.visits(schedule, "kv"),
      lo=lo,
      inputs=[q, k, v],
      segments=segments,
      chosen=_chosen(schedule),
      out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), stats, stats],
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _retrieve(
    config: _Config,
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    segments: Int[Array, "b t"] | None,
    schedule: blocks.Schedule | blocks.Visits,
    lo: Int[Array, 1],
) -> Float[Array, "b t h e"]:
  """Blocked retrieval on padded arrays, with a recomputing backward pass."""
  return _forward(config, q, k, v, segments, schedule, lo)[0]


def _retrieve_fwd(config, q, k, v, segments, schedule, lo):
  # Its own jit: when remat saves the named outputs, the recomputation drops the whole call, where
  # it would keep a bare pallas_call (which dead-code elimination never removes).
  forward = jax.jit(_forward, static_argnums=0)
  y, row_max, row_sum = remat.named(forward(config, q, k, v, segments, schedule, lo))
  return y, (q, k, v, segments, schedule, lo, row_max, row_sum)


def _retrieve_bwd(config, residuals, dy):
  q, k, v, segments, schedule, lo, row_max, row_sum = residuals
  batch, seq_len, heads, _ = q.shape
  dy = dy.astype(v.dtype)
  dq, correction = _call(
      config,
      _dq_kernel,
      table=blocks.visits(schedule, "kv"),
      lo=lo,
      inputs=[q, k, v, dy, row_max, row_sum],
      segments=segments,
      chosen=_chosen(schedule),
      out_shape=[
          jax.ShapeDtypeStruct(q.shape, q.dtype),
          jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32),
      ],
  )
  dk, dv = _call(
      config,
      _dkv_kernel,
      table=blocks.visits(schedule, "q"),
      lo=lo,
      inputs=[q, k, v, dy, row_max, row_sum, correction],
      segments=segments,
      chosen=_chosen(schedule),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
  )
  # Integer inputs take float0 cotangents.
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (segments, schedule, lo))
  return (dq, dk, dv, *zeros)


_retrieve.defvjp(_retrieve_fwd, _retrieve_bwd)


def _padded_dim(dim: int) -> int:
  """A head dim rounded up to a multiple of DIM_MULTIPLE."""
  return -(-dim // DIM_MULTIPLE) * DIM_MULTIPLE


@functools.partial(jax.jit, static_argnames=("hi", "block", "interpret"))
def _retrieve_padded(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    segment_ids: Int[Array, "b t"] | None,
    lo: Int[Array, ""],
    selected: select.Selected | None,
    *,
    hi: int | None,
    block: int,
    interpret: bool,
) -> Float[Array, "b t h e"]:
  """Pads T to whole blocks and the head dims to multiples of 64, schedules (or lists the
  `selected` blocks), runs and crops."""
  seq_len, dim, value_dim = q.shape[1], q.shape[-1], v.shape[-1]
  widths = (_padded_dim(dim), _padded_dim(value_dim))
  padded = blocks.padded_inputs(
      q, k, v, segment_ids, lo, selected, hi=hi, block=block, widths=widths
  )
  config = _Config(
      block=block,
      hi=hi,
      num_blocks=padded.num_blocks,
      segmented=segment_ids is not None,
      interpret=interpret,
      selected=selected is not None,
  )
  y = _retrieve(config, padded.q, padded.k, padded.v, padded.segments, padded.schedule, lo[None])
  return y[:, :seq_len, :, :value_dim]


def retrieve_pallas_mosaic_gpu(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    *,
    lo: bands.IntLike,
    hi: int | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
    block_size: int | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> Float[Array, "b t h e"]:
  """y[b, t, h] = sum_{s in S(t)} softmax_s(q[b, t, h] . k[b, s, h]) v[b, s, h], as Mosaic GPU
  kernels for Hopper.

  Inputs are assumed validated by `kernels_pallas.retrieve`. `lo` may be a Python int or a traced
  int32 scalar: either way it reaches the kernels as data, so one compilation serves every value.
  Reverse-mode differentiable in q, k, v.

  Args:
    q, k, v, lo, hi, segment_ids: as in `kernels_pallas.retrieve`; bfloat16 or float16, head
      dims up to 256.
    block_size: B, a multiple of 64; None is 64.
    backend: the backend compiled for (None: JAX's default backend).
    interpret: False compiles with Mosaic GPU, True runs its interpreter (jax >= 0.12); None
      compiles for backend "gpu" and interprets for any other.

  Returns:
    y in the dtype of the inputs, computed with float32 softmax and sums.
  """
  if interpret is None:
    interpret = (backend or jax.default_backend()) != "gpu"
  block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
  check_inputs(q, v, block_size)
  return _retrieve_padded(
      q,
      k,
      v,
      segment_ids,
      jnp.asarray(lo, jnp.int32),
      None,
      hi=hi,
      block=block_size,
      interpret=interpret,
  )


def retrieve_pallas_mosaic_gpu_selected(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    *,
    lo: bands.IntLike,
    hi: int | None,
    segment_ids: Int[Array, "b t"] | None,
    selected: select.Selected,
    block_size: int,
    backend: str | None = None,
    interpret: bool | None = None,
) -> Float[Array, "b t h e"]:
  """`select.retrieve_selected_xla` as Mosaic GPU kernels: each query block visits the key blocks
  its queries selected (B = `block_size`, the selection's block, a multiple of 64), each row
  reading its own. Arguments as `retrieve_pallas_mosaic_gpu`'s; reverse-mode differentiable in
  q, k, v.
  """
  if interpret is None:
    interpret = (backend or jax.default_backend()) != "gpu"
  check_inputs(q, v, block_size)
  return _retrieve_padded(
      q,
      k,
      v,
      segment_ids,
      jnp.asarray(lo, jnp.int32),
      selected,
      hi=hi,
      block=block_size,
      interpret=interpret,
  )
