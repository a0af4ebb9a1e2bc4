"""Band-masked retrieval as GPU (Triton) Pallas kernels: a flash-attention forward and backward.

Time is cut into blocks of B positions (the sequence padded to a multiple of B). Every kernel runs
one program per (block, batch row, head) and loops, with `jax.lax.fori_loop`, over only the live
blocks of the other side: `blocks.schedule`'s range of them, loaded in-kernel as scalars (the
Triton backend has no scalar prefetch). The arrays of the other side are passed whole, and each
step slices its block out of them with `pl.ds`. lo reaches the kernels as a one-element int32
array, so one compilation serves every lo.

    forward  per query block: fold the live key blocks into the running row max, row sum and
             accumulator (float32, in registers); write y and the per-row (max, sum).
    dq       per query block, two loops over the live key blocks, both recomputing the forward's
             probabilities p from the saved per-row max and sum and their cotangents dp = dy . v:
             the first sums D = sum_s p dp, the second dq = sum_s p (dp - D) k. D is written out.
    dkv      per key block, one loop over its live query blocks: dk = sum_t p (dp - D) q and
             dv = sum_t p dy, with D from the dq kernel.

The row max and row sum are saved apart (v1's q . k reaches ~4e9, where max + log(sum) would round
the log away), and D is summed from the same recomputed p and dp the gradients use (dy . y differs
by rounding, which such scores amplify). For p to be recomputed bit for bit, every kernel forms
its scores with the same `_scores` product of a [B, d] query tile and a [B, d] key tile, and all
kernels share one num_warps (hence one register layout of that product).

Triton tiles must have power-of-two shapes, and its dots need every dimension >= 16: B is a power
of two >= 16, and head dims that are not get zero-padded in the wrapper (zeros change no score
and add zero columns to y, which are cropped).

float32 dots run as tf32x3 (three TF32 tensor-core products, float32 accuracy): IEEE float32 dots
run on the FMA units instead and, at B = 64, need so many registers that every kernel spills
(compiled offline for sm_90 with Triton 3.9, see docs/benchmarks.md). tf32x3 also needs smaller
tiles: float32 defaults to B = 32 for head dims up to 64, 16 beyond, and 8 warps.

Off GPU the kernels run in Pallas's interpreter (see `retrieve_pallas_gpu`'s `interpret`).

With a block selection (`retrieve_pallas_gpu_selected`, design.md "Block selection") the same
three kernels visit, instead of a range, a list per (batch row, head, block): the key blocks that
some query of the block selected (`blocks.selected_visits`; for dkv, the query blocks some of whose
queries selected the key block), and each tile's mask also keeps only the rows that selected it:
the queries' selected blocks are an input [b, t, h, k] beside q.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v, n = blocks, i = query rows of a block, j = key columns of a block, w = live
blocks listed per block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Bool, Float, Int, Shaped

from kernels_pallas import bands, blocks, remat, select

# Default (and largest default) block. One B serves the forward and both backward kernels; the
# backward ones keep four [B, d] operands and accumulators plus two [B, B] float32 tiles (p, dp)
# live, which at B = 64 fit the registers of 4 warps for d <= 64, where B = 128 risks spilling
# (not yet tuned on hardware). Finer blocks also waste less of a narrow band: the short-term band
# (hi = 255) reads 6 tiles of 64 keys per query block (384 keys for 255 useful) against 4 of 128
# (512).
MAX_BLOCK_SIZE = 64
# Triton's dot needs every dimension of its operands to be at least 16.
MIN_DIM = 16
# The algorithm of compiled float32 dots (see the module docstring). TF32 alone (Triton's default)
# keeps 10 mantissa bits and would move v1's q . k ~ 4e9 by millions.
F32_DOT_ALGORITHM = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


@dataclasses.dataclass(frozen=True)
class _Config:
  """The static part of a call.

  Attributes:
    block: B, the positions of a query block and of a key block.
    hi: largest delay, or None.
    num_blocks: blocks of the padded sequence.
    segmented: whether document ids are passed.
    num_warps: warps per program, the same for every kernel (see the module docstring).
    num_stages: software-pipelining depth of the loops over live blocks.
    interpret: whether to run Pallas's interpreter instead of compiling with Triton.
    precision: of every dot in the kernels (`dot_precision`).
    selected: whether the kernels visit listed blocks of a block selection (`blocks.Visits`)
      instead of ranges, and mask the rows that did not select a block.
  """

  block: int
  hi: int | None
  num_blocks: int
  segmented: bool
  num_warps: int
  num_stages: int
  interpret: bool
  precision: jax.lax.DotAlgorithmPreset | None
  selected: bool = False


def default_block_size(seq_len: int, dim: int = MIN_DIM, dtype: Any = jnp.bfloat16) -> int:
  """B used when the caller gives none, for padded head dims up to `dim` of inputs of `dtype`.

  The power of two >= 16 covering T, at most MAX_BLOCK_SIZE (float32: 32 up to dim 64, else 16).
  """
  largest = MAX_BLOCK_SIZE
  if jnp.dtype(dtype) == jnp.float32:
    largest = 32 if dim <= 64 else MIN_DIM
  return min(largest, max(MIN_DIM, pl.next_power_of_2(seq_len)))


def default_num_warps(dim: int, dtype: Any = jnp.bfloat16) -> int:
  """Warps per program for padded head dims up to `dim` of inputs of `dtype`.

  4 up to 64; beyond, the [B, dim] operands and accumulators need the registers of 8, and so do
  the three products of every tf32x3 dot.
  """
  return 4 if dim <= 64 and jnp.dtype(dtype) != jnp.float32 else 8


def dot_precision(dtype: Any, interpret: bool) -> jax.lax.DotAlgorithmPreset | None:
  """F32_DOT_ALGORITHM for compiled float32 kernels, else None (the "highest" of `_call`).

  Interpreted kernels run on XLA's CPU dots, which take no TF32 algorithm.
  """
  return F32_DOT_ALGORITHM if jnp.dtype(dtype) == jnp.float32 and not interpret else None


# Double-buffers the next live block's loads behind the current block's math; deeper pipelines
# multiply the shared memory of the staged [B, d] tiles for little gain on loops this short.
DEFAULT_NUM_STAGES = 2


def _check_block_size(block: int) -> None:
  """Raises unless B is a power of two >= MIN_DIM, the only tile sizes Triton takes."""
  if block < MIN_DIM or block & (block - 1):
    raise ValueError(
        f"block_size must be a power of two >= {MIN_DIM} for the GPU kernels, got {block}"
    )


def _padded_dim(dim: int) -> int:
  """A head dim rounded up to a size Triton's dot takes."""
  return max(MIN_DIM, pl.next_power_of_2(dim))


# ----------------------------------------------------------------------------- in-kernel helpers


def _block_slice(index: Int[Array, ""], block: int) -> pl.Slice:
  """Positions [index * B, (index + 1) * B), marked aligned so Triton can vectorise the loads."""
  return pl.ds(pl.multiple_of(index * block, block), block)


def _column(x: Shaped[Array, " i"]) -> Shaped[Array, "i 1"]:
  """A per-row vector as the [i, 1] column `blocks` works with."""
  return x.reshape(x.shape[0], 1)


def _query_side(
    config: _Config, query_block: Int[Array, ""], segment_ref: Any
) -> tuple[Int[Array, "i 1"], Int[Array, "i 1"] | None]:
  """Times and document ids (None when unsegmented) of a query block, as columns."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (config.block, 1), 0)
  segments = None
  if segment_ref is not None:
    segments = _column(segment_ref[_block_slice(query_block, config.block)])
  return query_block * config.block + rows, segments


def _key_side(
    config: _Config, key_block: Int[Array, ""], segment_ref: Any
) -> tuple[Int[Array, "1 j"], Int[Array, "1 j"] | None]:
  """Times and document ids (None when unsegmented) of a key block, as rows."""
  columns = jax.lax.broadcasted_iota(jnp.int32, (1, config.block), 1)
  segments = None
  if segment_ref is not None:
    segments = segment_ref[_block_slice(key_block, config.block)].reshape(1, config.block)
  return key_block * config.block + columns, segments


def _scores(q: Float[Array, "i d"], k: Float[Array, "j d"], precision) -> Float[Array, "i j"]:
  """q . k of a tile in float32: the one product every kernel recomputes the scores with."""
  return jax.lax.dot_general(
      q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
  )


def _matmul(a: Float[Array, "m r"], b: Float[Array, "r n"], precision) -> Float[Array, "m n"]:
  """a @ b accumulated in float32 (a is cast to b's dtype, so bf16 enters the dot as bf16)."""
  return jax.lax.dot_general(
      a.astype(b.dtype),
      b,
      (((1,), (0,)), ((), ())),
      precision=precision,
      preferred_element_type=jnp.float32,
  )


def _matmul_transposed(
    a: Float[Array, "r m"], b: Float[Array, "r n"], precision
) -> Float[Array, "m n"]:
  """a^T @ b accumulated in float32, contracting the rows of both (a is cast to b's dtype)."""
  return jax.lax.dot_general(
      a.astype(b.dtype),
      b,
      (((0,), (0,)), ((), ())),
      precision=precision,
      preferred_element_type=jnp.float32,
  )


def _recompute(
    q: Float[Array, "i d"],
    k: Float[Array, "j d"],
    v: Float[Array, "j e"],
    dy: Float[Array, "i e"],
    row_max: Float[Array, "i 1"],
    row_sum: Float[Array, "i 1"],
    mask: Bool[Array, "i j"],
    precision,
) -> tuple[Float[Array, "i j"], Float[Array, "i j"]]:
  """A tile's forward probabilities p and their cotangents dp = dy . v (float32)."""
  p = blocks.probabilities(_scores(q, k, precision), mask, row_max, row_sum)
  return p, _scores(dy, v, precision)


def _split_extras(config: _Config, refs: tuple[Any, ...]) -> tuple[Any, Any, tuple[Any, ...]]:
  """(the document ids' ref or None, the selected blocks' ref or None, the output refs) from a
  kernel's trailing refs."""
  segment_ref = chosen_ref = None
  if config.segmented:
    segment_ref, refs = refs[0], refs[1:]
  if config.selected:
    chosen_ref, refs = refs[0], refs[1:]
  return segment_ref, chosen_ref, refs


def _visited(config: _Config, table_ref: Any, own: Int[Array, ""], step: Int[Array, ""]):
  """The block of the other side visited at `step`: the next of the range starting at
  table_ref[own], or the listed table_ref[own, step] of a block selection."""
  if config.selected:
    return table_ref[own, step]
  return table_ref[own] + step


def _rows_that_chose(
    config: _Config, mask: Bool[Array, "i j"], chosen: Int[Array, "i k"] | None, key_block
) -> Bool[Array, "i j"]:
  """The tile's mask, keeping with a block selection only the rows that selected key_block."""
  if not config.selected:
    return mask
  # A sum, not jnp.any: Triton has no lowering of a boolean reduction.
  hits = jnp.sum((chosen == key_block).astype(jnp.int32), axis=1, keepdims=True)
  return mask & (hits > 0)


# ----------------------------------------------------------------------------------- the kernels
#
# Every kernel takes lo, the live-block ranges (count, first) of its side, its inputs (arrays of
# its own side as its block, of the other side whole), the document ids when segmented (whole
# rows), then its outputs. Program (n, b, h) owns block n of batch row b and head h.


def _forward_kernel(lo_ref, count_ref, first_ref, q_ref, k_ref, v_ref, *refs, config: _Config):
  """Folds the live key blocks of one query block into y and its per-row (max, sum)."""
  segment_ref, chosen_ref, (y_ref, max_ref, sum_ref) = _split_extras(config, refs)
  query_block, lo, block = pl.program_id(0), lo_ref[0], config.block
  q = q_ref[...]
  chosen = chosen_ref[...] if config.selected else None
  t, q_segments = _query_side(config, query_block, segment_ref)

  def fold(step, carry):
    key_block = _visited(config, first_ref, query_block, step)
    keys = _block_slice(key_block, block)
    s, k_segments = _key_side(config, key_block, segment_ref)
    mask = blocks.tile_mask(t, s, lo, config.hi, q_segments, k_segments)
    mask = _rows_that_chose(config, mask, chosen, key_block)
    scores = _scores(q, k_ref[keys, :], config.precision)
    return blocks.online_softmax_update(
        *carry, scores, mask, v_ref[keys, :], precision=config.precision
    )

  init = (
      jnp.full((block, 1), -jnp.inf, jnp.float32),
      jnp.zeros((block, 1), jnp.float32),
      jnp.zeros((block, v_ref.shape[-1]), jnp.float32),
  )
  # A query block with no live key block runs no step and writes finish()'s zeros.
  carry = jax.lax.fori_loop(0, count_ref[query_block], fold, init)
  y, row_max, row_sum = blocks.finish(*carry)
  y_ref[...] = y.astype(y_ref.dtype)
  max_ref[...] = row_max.reshape(block)
  sum_ref[...] = row_sum.reshape(block)


def _dq_kernel(
    lo_ref,
    count_ref,
    first_ref,
    q_ref,
    k_ref,
    v_ref,
    dy_ref,
    max_ref,
    sum_ref,
    *refs,
    config: _Config,
):
  """D = sum_s p dp, then dq = sum_s p (dp - D) k, for the rows of one query block."""
  segment_ref, chosen_ref, (dq_ref, correction_ref) = _split_extras(config, refs)
  query_block, lo, block = pl.program_id(0), lo_ref[0], config.block
  q, dy = q_ref[...], dy_ref[...]
  chosen = chosen_ref[...] if config.selected else None
  row_max, row_sum = _column(max_ref[...]), _column(sum_ref[...])
  t, q_segments = _query_side(config, query_block, segment_ref)
  count = count_ref[query_block]

  def tile(step):
    key_block = _visited(config, first_ref, query_block, step)
    keys = _block_slice(key_block, block)
    s, k_segments = _key_side(config, key_block, segment_ref)
    mask = blocks.tile_mask(t, s, lo, config.hi, q_segments, k_segments)
    mask = _rows_that_chose(config, mask, chosen, key_block)
    k = k_ref[keys, :]
    p, dp = _recompute(q, k, v_ref[keys, :], dy, row_max, row_sum, mask, config.precision)
    return k, p, dp

  def add_correction(step, correction):
    _, p, dp = tile(step)
    return correction + jnp.sum(p * dp, axis=1, keepdims=True)

  correction = jax.lax.fori_loop(0, count, add_correction, jnp.zeros((block, 1), jnp.float32))

  def add_dq(step, dq):
    k, p, dp = tile(step)
    return dq + _matmul(p * (dp - correction), k, config.precision)

  dq = jax.lax.fori_loop(0, count, add_dq, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)
  correction_ref[...] = correction.reshape(block)


def _dkv_kernel(
    lo_ref,
    count_ref,
    first_ref,
    q_ref,
    k_ref,
    v_ref,
    dy_ref,
    max_ref,
    sum_ref,
    correction_ref,
    *refs,
    config: _Config,
):
  """dk = sum_t p (dp - D) q and dv = sum_t p dy for the columns of one key block."""
  segment_ref, chosen_ref, (dk_ref, dv_ref) = _split_extras(config, refs)
  key_block, lo, block = pl.program_id(0), lo_ref[0], config.block
  k, v = k_ref[...], v_ref[...]
  s, k_segments = _key_side(config, key_block, segment_ref)

  def fold(step, carry):
    dk, dv = carry
    query_block = _visited(config, first_ref, key_block, step)
    rows = _block_slice(query_block, block)
    t, q_segments = _query_side(config, query_block, segment_ref)
    mask = blocks.tile_mask(t, s, lo, config.hi, q_segments, k_segments)
    chosen = chosen_ref[rows, :] if config.selected else None
    mask = _rows_that_chose(config, mask, chosen, key_block)
    q, dy = q_ref[rows, :], dy_ref[rows, :]
    row_max, row_sum = _column(max_ref[rows]), _column(sum_ref[rows])
    p, dp = _recompute(q, k, v, dy, row_max, row_sum, mask, config.precision)
    ds = p * (dp - _column(correction_ref[rows]))
    return (
        dk + _matmul_transposed(ds, q, config.precision),
        dv + _matmul_transposed(p, dy, config.precision),
    )

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = jax.lax.fori_loop(0, count_ref[key_block], fold, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------- pallas calls
#
# Grids are (block n, batch row b, head h); arrays stay [b, t, h, d] (no transposes: a row of a
# head is d contiguous elements either way) and per-row statistics are [b, h, t].


def _own(config: _Config, width: int) -> pl.BlockSpec:
  """Block n of a [b, t, h, width] array: the program's own side."""
  return pl.BlockSpec((None, config.block, None, width), lambda n, b, h: (b, n, h, 0))


def _whole(seq_len: int, width: int) -> pl.BlockSpec:
  """All of a [b, t, h, width] array for the program's (b, h): the side it loops over."""
  return pl.BlockSpec((None, seq_len, None, width), lambda n, b, h: (b, 0, h, 0))


def _own_stats(config: _Config) -> pl.BlockSpec:
  """Block n of a per-row [b, h, t] statistic."""
  return pl.BlockSpec((None, None, config.block), lambda n, b, h: (b, h, n))


def _whole_stats(seq_len: int) -> pl.BlockSpec:
  """All of a per-row [b, h, t] statistic for the program's (b, h)."""
  return pl.BlockSpec((None, None, seq_len), lambda n, b, h: (b, h, 0))


def _chosen(
    config: _Config, schedule: blocks.Schedule | blocks.Visits, *, own: bool
) -> tuple[Int[Array, "b t h k"], pl.BlockSpec] | None:
  """The queries' selected blocks and their spec (the program's own rows, or all of them), for
  the kernels of a block selection."""
  if not config.selected:
    return None
  chosen = schedule.chosen
  width = chosen.shape[-1]
  return chosen, _own(config, width) if own else _whole(chosen.shape[1], width)


def _call(
    config: _Config,
    kernel: Any,
    *,
    table: tuple[Array, Array],
    lo: Int[Array, 1],
    in_specs: list[pl.BlockSpec],
    inputs: list[Array],
    segments: Int[Array, "b t"] | None,
    out_specs: list[pl.BlockSpec],
    out_shape: list[jax.ShapeDtypeStruct],
    chosen: tuple[Int[Array, "b t h k"], pl.BlockSpec] | None = None,
) -> tuple[Array, ...]:
  """One kernel over the grid (n, b, h), reading its side's live-block ranges (count, first) per
  batch row; with a block selection, its lists (count, list) per batch row and head and the
  queries' selected blocks (`chosen`: the array and its block spec)."""
  count, first = table
  batch, seq_len, heads, _ = inputs[0].shape
  table_specs = [
      pl.BlockSpec((1,), lambda n, b, h: (0,)),
      pl.BlockSpec((None, config.num_blocks), lambda n, b, h: (b, 0)),
      pl.BlockSpec((None, config.num_blocks), lambda n, b, h: (b, 0)),
  ]
  if config.selected:
    width = first.shape[-1]
    table_specs[1:] = [
        pl.BlockSpec((None, None, config.num_blocks), lambda n, b, h: (b, h, 0)),
        pl.BlockSpec((None, None, config.num_blocks, width), lambda n, b, h: (b, h, 0, 0)),
    ]
  extra_specs, extra_inputs = [], []
  if segments is not None:
    extra_specs = [pl.BlockSpec((None, seq_len), lambda n, b, h: (b, 0))]
    extra_inputs = [segments]
  if chosen is not None:
    extra_specs.append(chosen[1])
    extra_inputs.append(chosen[0])
  call = pl.pallas_call(
      functools.partial(kernel, config=config),
      grid=(config.num_blocks, batch, heads),
      in_specs=table_specs + in_specs + extra_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(
          num_warps=config.num_warps, num_stages=config.num_stages
      ),
      interpret=config.interpret,
      name=kernel.__name__.strip("_"),
  )
  # Dots without an explicit precision (bfloat16 ones, and all of them when interpreted) run at
  # "highest": IEEE float32 products on the CPU; bfloat16 dots are unaffected.
  with jax.default_matmul_precision("highest"):
    return call(lo, count, first, *inputs, *extra_inputs)


def _forward(
    config: _Config,
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    segments: Int[Array, "b t"] | None,
    schedule: blocks.Schedule | blocks.Visits,
    lo: Int[Array, 1],
) -> tuple[Float[Array, "b t h e"], Float[Array, "b h t"], Float[Array, "b h t"]]:
  """y (input dtype) and the per-row max and sum (float32; 0 and 1 on empty rows)."""
  batch, seq_len, heads, dim = q.shape
  value_dim = v.shape[-1]
  stats = jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32)
  return _call(
      config,
      _forward_kernel,
      table=blocks.visits(schedule, "kv"),
      chosen=_chosen(config, schedule, own=True),
      lo=lo,
      in_specs=[_own(config, dim), _whole(seq_len, dim), _whole(seq_len, value_dim)],
      inputs=[q, k, v],
      segments=segments,
      out_specs=[_own(config, value_dim), _own_stats(config), _own_stats(config)],
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
  batch, seq_len, heads, dim = q.shape
  value_dim = v.shape[-1]
  dy = dy.astype(v.dtype)

  dq, correction = _call(
      config,
      _dq_kernel,
      table=blocks.visits(schedule, "kv"),
      chosen=_chosen(config, schedule, own=True),
      lo=lo,
      in_specs=[
          _own(config, dim),
          _whole(seq_len, dim),
          _whole(seq_len, value_dim),
          _own(config, value_dim),
          _own_stats(config),
          _own_stats(config),
      ],
      inputs=[q, k, v, dy, row_max, row_sum],
      segments=segments,
      out_specs=[_own(config, dim), _own_stats(config)],
      out_shape=[
          jax.ShapeDtypeStruct(q.shape, q.dtype),
          jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32),
      ],
  )
  dk, dv = _call(
      config,
      _dkv_kernel,
      table=blocks.visits(schedule, "q"),
      chosen=_chosen(config, schedule, own=False),
      lo=lo,
      in_specs=[
          _whole(seq_len, dim),
          _own(config, dim),
          _own(config, value_dim),
          _whole(seq_len, value_dim),
          _whole_stats(seq_len),
          _whole_stats(seq_len),
          _whole_stats(seq_len),
      ],
      inputs=[q, k, v, dy, row_max, row_sum, correction],
      segments=segments,
      out_specs=[_own(config, dim), _own(config, value_dim)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
  )
  # Integer inputs take float0 cotangents.
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (segments, schedule, lo))
  return (dq, dk, dv, *zeros)


_retrieve.defvjp(_retrieve_fwd, _retrieve_bwd)


@functools.partial(jax.jit, static_argnames=("hi", "block", "num_warps", "num_stages", "interpret"))
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
    num_warps: int | None,
    num_stages: int,
    interpret: bool,
) -> Float[Array, "b t h e"]:
  """Pads T to whole blocks and the head dims to Triton's sizes, schedules (or lists the
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
      num_warps=num_warps or default_num_warps(max(widths), q.dtype),
      num_stages=num_stages,
      interpret=interpret,
      precision=dot_precision(q.dtype, interpret),
      selected=selected is not None,
  )
  y = _retrieve(config, padded.q, padded.k, padded.v, padded.segments, padded.schedule, lo[None])
  return y[:, :seq_len, :, :value_dim]


def retrieve_pallas_gpu(
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
    num_warps: int | None = None,
    num_stages: int = DEFAULT_NUM_STAGES,
) -> Float[Array, "b t h e"]:
  """y[b, t, h] = sum_{s in S(t)} softmax_s(q[b, t, h] . k[b, s, h]) v[b, s, h], as GPU kernels.

  Inputs are assumed validated by `kernels_pallas.retrieve`. `lo` may be a Python int or a traced
  int32 scalar: either way it reaches the kernels as data, so one compilation serves every value.
  Reverse-mode differentiable in q, k, v.

  Args:
    q, k, v, lo, hi, segment_ids: as in `kernels_pallas.retrieve`.
    block_size: B, a power of two >= 16; None picks `default_block_size` of T, the padded head
      dims and the dtype.
    backend: the backend compiled for (None: JAX's default backend).
    interpret: False compiles with Triton, True runs Pallas's interpreter; None compiles for
      backend "gpu" and interprets for any other.
    num_warps: warps per program; None picks `default_num_warps` of the padded head dims and
      the dtype.
    num_stages: software-pipelining depth of the in-kernel loops.

  Returns:
    y in the dtype of the inputs, computed with float32 softmax and sums.
  """
  if interpret is None:
    interpret = (backend or jax.default_backend()) != "gpu"
  if block_size is None:
    dim = max(_padded_dim(q.shape[-1]), _padded_dim(v.shape[-1]))
    block_size = default_block_size(q.shape[1], dim, q.dtype)
  _check_block_size(block_size)
  return _retrieve_padded(
      q,
      k,
      v,
      segment_ids,
      jnp.asarray(lo, jnp.int32),
      None,
      hi=hi,
      block=block_size,
      num_warps=num_warps,
      num_stages=num_stages,
      interpret=interpret,
  )


def retrieve_pallas_gpu_selected(
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
    num_warps: int | None = None,
    num_stages: int = DEFAULT_NUM_STAGES,
) -> Float[Array, "b t h e"]:
  """`select.retrieve_selected_xla` as GPU kernels: each query block visits the key blocks its
  queries selected (B = `block_size`, the selection's block, a power of two >= 16), each row
  reading its own. Arguments as `retrieve_pallas_gpu`'s; reverse-mode differentiable in q, k, v.
  """
  if interpret is None:
    interpret = (backend or jax.default_backend()) != "gpu"
  _check_block_size(block_size)
  return _retrieve_padded(
      q,
      k,
      v,
      segment_ids,
      jnp.asarray(lo, jnp.int32),
      selected,
      hi=hi,
      block=block_size,
      num_warps=num_warps,
      num_stages=num_stages,
      interpret=interpret,
  )
