"""Band-masked retrieval as TPU (Mosaic) Pallas kernels: a flash-attention forward and backward.

Time is cut into blocks of B positions (the sequence padded to a multiple of B), and every kernel
runs on one (batch row, head, block) per grid point, reducing over a list of blocks of the other
side in its last, "arbitrary", grid axis. That list is `blocks.schedule`'s range of live blocks,
scalar-prefetched into SMEM together with lo: the index maps read it, so a dead tile is never
fetched (its steps repeat the last live block, which Mosaic does not fetch again) and never
computed (`pl.when(step < count)`). lo is a one-element int32 array, so one compilation serves
every lo.

    forward   grid (b, h, query block, live key block): running row max, row sum and accumulator
              in VMEM scratch (float32), written as y and the per-row (max, sum) at the last step.
    backward  three kernels that recompute the forward's probabilities p from the saved per-row
              max and sum, kept apart (v1's q . k reaches ~4e9, where max + log(sum) would round
              the log away):
                D    grid as the forward: D = sum_s p dp per query row, from the same p and
                     dp = dy . v the gradients use (dy . y differs by rounding, which the huge
                     key norms amplify);
                dq   grid as the forward: dq = sum_s p (dp - D) k;
                dkv  grid (b, h, key block, live query block): dk = sum_t p (dp - D) q and
                     dv = sum_t p dy.

Operands keep Mosaic's tiling legal: q, k, v and dy are [b, h, t, d] (time second-minor, B a
multiple of 8; the head dims are whole), per-row statistics are broadcast over the 128 lanes
([b, h, t, NUM_LANES], as jax's TPU flash attention keeps them), the query side's document ids
over the lanes ([b, t, NUM_LANES]) and the key side's over 8 sublanes ([b, NUM_SUBLANES, t]), so
that a block of them has lanes to fill: B is a multiple of 128 or the whole (padded) sequence.

Off TPU the kernels run in Pallas's interpreter (see `retrieve_pallas_tpu`'s `interpret`).

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v, i = query rows of a block, j = key columns of a block, l = lanes (copies of a
per-row value).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas import bands, blocks, remat, select

Interpret = bool | pltpu.InterpretParams

# A vreg holds 8 sublanes x 128 lanes of 32-bit values: the tiling of every VMEM block.
NUM_LANES = 128
NUM_SUBLANES = 8
# Largest default block: 128 fills the lanes of the key side's document ids and the MXU's width.
MAX_BLOCK_SIZE = 128
# dot_general dimension numbers of a . b^T, a . b and a^T . b (the last contracts the rows of both
# operands, which Mosaic's matmul takes as a transposed lhs: no transpose is written out).
_TRANSPOSE_RHS = (((1,), (1,)), ((), ()))
_NO_TRANSPOSE = (((1,), (0,)), ((), ()))
_TRANSPOSE_LHS = (((0,), (0,)), ((), ()))
# What `interpret=None` runs off TPU. The TPU simulator (`pltpu.InterpretParams()`, which also
# checks DMAs and out-of-bounds reads) costs about 10x plain interpretation; the test suite runs
# it on one small case.
CPU_INTERPRET: Interpret = True


@dataclasses.dataclass(frozen=True)
class _Config:
  """The static part of a call.

  Attributes:
    block: B, the positions of a query block and of a key block.
    hi: largest delay, or None.
    num_blocks: blocks of the padded sequence.
    max_kv: grid steps over the live key blocks of a query block (`blocks.max_key_blocks`).
    max_q: grid steps over the live query blocks of a key block (`blocks.max_query_blocks`).
    segmented: whether document ids are passed.
    interpret: False to compile with Mosaic, else `pallas_call`'s interpret argument.
    heads: heads of the arrays (the selection's tables are per head).
    selected: whether the tables are a block selection's lists (`blocks.Visits`, max_kv and max_q
      their widths) instead of ranges, and the queries' selected blocks are an input.
  """

  block: int
  hi: int | None
  num_blocks: int
  max_kv: int
  max_q: int
  segmented: bool
  interpret: Interpret
  heads: int = 1
  selected: bool = False


def default_block_size(seq_len: int) -> int:
  """B used when the caller gives none: 128, or the whole sequence padded to 8 if shorter."""
  return min(MAX_BLOCK_SIZE, -(-seq_len // NUM_SUBLANES) * NUM_SUBLANES)


def _check_block_size(block: int, seq_len: int, compiled: bool) -> None:
  """Raises if B breaks the TPU tiling (all of it when compiled, sublanes when interpreted)."""
  if block % NUM_SUBLANES:
    raise ValueError(f"block_size must be a multiple of {NUM_SUBLANES} on TPU, got {block}")
  padded = -(-seq_len // block) * block
  if compiled and block % NUM_LANES and block != padded:
    raise ValueError(
        f"block_size must be a multiple of {NUM_LANES} or cover the whole sequence on TPU, "
        f"got {block} for {seq_len} positions"
    )


# ----------------------------------------------------------------------------------- the kernels
#
# Every kernel takes the scalar-prefetched ranges (first, count) and lo, then its blocked inputs
# (the document ids last, when segmented), its outputs and its scratch. On the query-major grid
# (b, h, n, step), query block n reads key block first[b, n] + step; on the key-major grid, key
# block n reads query block first[b, n] + step. Steps from count[b, n] on compute nothing.


class _Tile(NamedTuple):
  """The (query block, key block) tile of a grid step, with lo and the document id refs."""

  query_block: Int[Array, ""]
  key_block: Int[Array, ""]
  lo: Int[Array, ""]
  segment_refs: tuple[Any, ...]
  chosen_ref: Any = None  # With a block selection: the query rows' selected blocks [i, k].


def _visited(
    config: _Config, b, h, n, step, first_ref, count_ref, *, key_major: bool
) -> tuple[Bool[Array, ""], Int[Array, ""]]:
  """(whether `step` is live, the block of the other side it visits) for block n of (b, h): the
  range's next block, or a block selection's listed one; past the count the last again."""
  if not config.selected:
    row = b * config.num_blocks + n
    return step < count_ref[row], blocks.visited_block(first_ref[row], count_ref[row], step)
  row = (b * config.heads + h) * config.num_blocks + n
  width = config.max_q if key_major else config.max_kv
  count = count_ref[row]
  return step < count, first_ref[row * width + jnp.minimum(step, jnp.maximum(count - 1, 0))]


def _step(
    config: _Config,
    first_ref: Any,
    count_ref: Any,
    lo_ref: Any,
    refs: tuple[Any, ...],
    *,
    key_major: bool,
) -> tuple[Bool[Array, ""], _Tile, tuple[Any, ...]]:
  """(whether this grid step's tile is live, the tile, the refs after the document ids)."""
  b, h, n, step = (pl.program_id(axis) for axis in range(4))
  live, other = _visited(config, b, h, n, step, first_ref, count_ref, key_major=key_major)
  query_block, key_block = (other, n) if key_major else (n, other)
  split = 2 if config.segmented else 0
  chosen_ref = refs[split] if config.selected else None
  tile = _Tile(query_block, key_block, lo_ref[0], refs[:split], chosen_ref)
  return live, tile, refs[split + config.selected :]


def _is_last_step() -> Bool[Array, ""]:
  """Whether this is the grid's last step for its block (live or not: every block is written)."""
  return pl.program_id(3) == pl.num_programs(3) - 1


def _scores_and_mask(
    config: _Config, tile: _Tile, q: Float[Array, "i d"], k: Float[Array, "j d"]
) -> tuple[Float[Array, "i j"], Bool[Array, "i j"]]:
  """A tile's float32 scores q . k and its band and document mask."""
  scores = jax.lax.dot_general(q, k, _TRANSPOSE_RHS, preferred_element_type=jnp.float32)
  shape = (config.block, config.block)
  t = tile.query_block * config.block + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  s = tile.key_block * config.block + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  q_segments = k_segments = None
  if config.segmented:
    q_segments_ref, k_segments_ref = tile.segment_refs
    # One lane of the query ids and one sublane of the key ids; the comparison broadcasts them.
    q_segments, k_segments = q_segments_ref[:, :1], k_segments_ref[:1, :]
  mask = blocks.tile_mask(t, s, tile.lo, config.hi, q_segments, k_segments)
  if config.selected:
    # The rows that selected this key block (a sum: no boolean reductions in the kernels).
    hits = jnp.sum(
        (tile.chosen_ref[...] == tile.key_block).astype(jnp.int32), axis=1, keepdims=True
    )
    mask &= hits > 0
  return scores, mask


def _probabilities_and_dp(
    config: _Config, tile: _Tile, q_ref, k_ref, v_ref, dy_ref, max_ref, sum_ref
) -> tuple[Float[Array, "i j"], Float[Array, "i j"]]:
  """A tile's recomputed softmax weights p and their cotangents dp = dy . v (float32)."""
  scores, mask = _scores_and_mask(config, tile, q_ref[...], k_ref[...])
  p = blocks.probabilities(scores, mask, max_ref[:, :1], sum_ref[:, :1])
  dp = jax.lax.dot_general(
      dy_ref[...], v_ref[...], _TRANSPOSE_RHS, preferred_element_type=jnp.float32
  )
  return p, dp


def _lanes(x: Float[Array, "i 1"]) -> Float[Array, "i l"]:
  """A per-row value copied over the lanes, the layout per-row statistics are stored in."""
  return jnp.broadcast_to(x, (x.shape[0], NUM_LANES))


def _forward_kernel(first_ref, count_ref, lo_ref, q_ref, k_ref, v_ref, *refs, config: _Config):
  """Folds the live key blocks of one query block into y and its per-row (max, sum)."""
  live, tile, refs = _step(config, first_ref, count_ref, lo_ref, refs, key_major=False)
  y_ref, max_out_ref, sum_out_ref, max_ref, sum_ref, acc_ref = refs

  @pl.when(pl.program_id(3) == 0)
  def _start():
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(live)
  def _fold():
    scores, mask = _scores_and_mask(config, tile, q_ref[...], k_ref[...])
    row_max, row_sum, acc = blocks.online_softmax_update(
        max_ref[...], sum_ref[...], acc_ref[...], scores, mask, v_ref[...]
    )
    max_ref[...], sum_ref[...], acc_ref[...] = row_max, row_sum, acc

  @pl.when(_is_last_step())
  def _finish():
    y, row_max, row_sum = blocks.finish(max_ref[...], sum_ref[...], acc_ref[...])
    y_ref[...] = y.astype(y_ref.dtype)
    max_out_ref[...] = _lanes(row_max)
    sum_out_ref[...] = _lanes(row_sum)


def _correction_kernel(
    first_ref, count_ref, lo_ref, q_ref, k_ref, v_ref, dy_ref, max_ref, sum_ref, *refs, config
):
  """D = sum_s p dp for the rows of one query block."""
  live, tile, (correction_out_ref, correction_ref) = _step(
      config, first_ref, count_ref, lo_ref, refs, key_major=False
  )

  @pl.when(pl.program_id(3) == 0)
  def _start():
    correction_ref[...] = jnp.zeros(correction_ref.shape, jnp.float32)

  @pl.when(live)
  def _add():
    p, dp = _probabilities_and_dp(config, tile, q_ref, k_ref, v_ref, dy_ref, max_ref, sum_ref)
    correction_ref[...] += jnp.sum(p * dp, axis=-1, keepdims=True)

  @pl.when(_is_last_step())
  def _finish():
    correction_out_ref[...] = _lanes(correction_ref[...])


def _dq_kernel(
    first_ref,
    count_ref,
    lo_ref,
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
  """dq = sum_s p (dp - D) k for the rows of one query block."""
  live, tile, (dq_ref, dq_acc_ref) = _step(
      config, first_ref, count_ref, lo_ref, refs, key_major=False
  )

  @pl.when(pl.program_id(3) == 0)
  def _start():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

  @pl.when(live)
  def _add():
    p, dp = _probabilities_and_dp(config, tile, q_ref, k_ref, v_ref, dy_ref, max_ref, sum_ref)
    ds = p * (dp - correction_ref[:, :1])
    k = k_ref[...]
    dq_acc_ref[...] += jax.lax.dot_general(
        ds.astype(k.dtype), k, _NO_TRANSPOSE, preferred_element_type=jnp.float32
    )

  @pl.when(_is_last_step())
  def _finish():
    dq_ref[...] = dq_acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(
    first_ref,
    count_ref,
    lo_ref,
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
  live, tile, (dk_ref, dv_ref, dk_acc_ref, dv_acc_ref) = _step(
      config, first_ref, count_ref, lo_ref, refs, key_major=True
  )

  @pl.when(pl.program_id(3) == 0)
  def _start():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  @pl.when(live)
  def _add():
    p, dp = _probabilities_and_dp(config, tile, q_ref, k_ref, v_ref, dy_ref, max_ref, sum_ref)
    ds = p * (dp - correction_ref[:, :1])
    q, dy = q_ref[...], dy_ref[...]
    dk_acc_ref[...] += jax.lax.dot_general(
        ds.astype(q.dtype), q, _TRANSPOSE_LHS, preferred_element_type=jnp.float32
    )
    dv_acc_ref[...] += jax.lax.dot_general(
        p.astype(dy.dtype), dy, _TRANSPOSE_LHS, preferred_element_type=jnp.float32
    )

  @pl.when(_is_last_step())
  def _finish():
    dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------- pallas calls


def _own_block(b, h, n, step, *tables):
  """Where the side a grid runs over finds its block: the grid's own."""
  del b, h, step, tables
  return n


def _scheduled_block(config: _Config, *, key_major: bool) -> Any:
  """Where the side a grid reduces over finds its block: the schedule's for the grid step."""

  def block(b, h, n, step, first_ref, count_ref, *_):
    return _visited(config, b, h, n, step, first_ref, count_ref, key_major=key_major)[1]

  return block


def _time_spec(block: int, width: int, side: Any) -> pl.BlockSpec:
  """Blocks of a [b, h, t, width] array along t."""

  def index_map(b, h, n, step, *tables):
    return b, h, side(b, h, n, step, *tables), 0

  return pl.BlockSpec((None, None, block, width), index_map)


def _segment_specs(config: _Config, queries: Any, keys: Any) -> list[pl.BlockSpec]:
  """Blocks of the query ids [b, t, NUM_LANES] and of the key ids [b, NUM_SUBLANES, s]."""
  if not config.segmented:
    return []

  def query_index_map(b, h, n, step, *tables):
    return b, queries(b, h, n, step, *tables), 0

  def key_index_map(b, h, n, step, *tables):
    return b, 0, keys(b, h, n, step, *tables)

  return [
      pl.BlockSpec((None, config.block, NUM_LANES), query_index_map),
      pl.BlockSpec((None, NUM_SUBLANES, config.block), key_index_map),
  ]


def _extras(
    config: _Config, queries: Any, keys: Any, segments: Any, schedule: Any
) -> tuple[list[pl.BlockSpec], list[Array]]:
  """The specs and arrays after a kernel's own inputs: the document ids, and with a block
  selection the query rows' selected blocks ([b, h, t, k], blocked as the queries)."""
  specs, arrays = _segment_specs(config, queries, keys), list(segments or ())
  if config.selected:
    chosen = schedule.chosen.transpose(0, 2, 1, 3)
    specs.append(_time_spec(config.block, chosen.shape[-1], queries))
    arrays.append(chosen)
  return specs, arrays


def _call(
    config: _Config,
    kernel: Any,
    *,
    in_specs: list[pl.BlockSpec],
    out_specs: list[pl.BlockSpec],
    out_shape: list[jax.ShapeDtypeStruct],
    scratch: list[tuple[int, ...]],
    first: Int[Array, "b n"] | Int[Array, "b h n w"],
    count: Int[Array, "b n"] | Int[Array, "b h n"],
    steps: int,
    lo: Int[Array, 1],
    inputs: list[Array],
) -> tuple[Array, ...]:
  """One kernel over the grid (b, h, block, step over the live blocks of the other side): the
  range tables (first, count) per batch row, or a block selection's (list, count) per row and
  head."""
  batch, heads = inputs[0].shape[:2]
  grid = (batch, heads, config.num_blocks, steps)
  # The ranges go flat: SMEM is small, and pads the trailing dims of a multi-dimensional array.
  call = pl.pallas_call(
      functools.partial(kernel, config=config),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=grid,
          in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch],
      ),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
      ),
      interpret=config.interpret,
      name=kernel.__name__.strip("_"),
  )
  # float32 products at full precision: Mosaic's default may round float32 operands to bf16, and
  # with v1's key norms a single rounded q . k is off by far more than the softmax can absorb.
  precise = inputs[0].dtype == jnp.float32
  with jax.default_matmul_precision("highest") if precise else contextlib.nullcontext():
    return call(first.reshape(-1), count.reshape(-1), lo, *inputs)


def _forward(
    config: _Config,
    q: Float[Array, "b h t d"],
    k: Float[Array, "b h s d"],
    v: Float[Array, "b h s e"],
    segments: tuple[Int[Array, "b t l"], Int[Array, "b 8 s"]] | None,
    schedule: blocks.Schedule | blocks.Visits,
    lo: Int[Array, 1],
) -> tuple[Float[Array, "b h t e"], Float[Array, "b h t"], Float[Array, "b h t"]]:
  """y (input dtype) and the per-row max and sum (float32; 0 and 1 on empty rows)."""
  batch, heads, seq_len, dim = q.shape
  value_dim = v.shape[-1]
  block = config.block
  queries, keys = _own_block, _scheduled_block(config, key_major=False)
  extra_specs, extra = _extras(config, queries, keys, segments, schedule)
  count, first = blocks.visits(schedule, "kv")
  stats = jax.ShapeDtypeStruct((batch, heads, seq_len, NUM_LANES), jnp.float32)
  y, row_max, row_sum = _call(
      config,
      _forward_kernel,
      in_specs=[
          _time_spec(block, dim, queries),
          _time_spec(block, dim, keys),
          _time_spec(block, value_dim, keys),
          *extra_specs,
      ],
      out_specs=[
          _time_spec(block, value_dim, queries),
          _time_spec(block, NUM_LANES, queries),
          _time_spec(block, NUM_LANES, queries),
      ],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, seq_len, value_dim), v.dtype), stats, stats],
      scratch=[(block, 1), (block, 1), (block, value_dim)],
      first=first,
      count=count,
      steps=config.max_kv,
      lo=lo,
      inputs=[q, k, v, *extra],
  )
  return y, row_max[..., 0], row_sum[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _retrieve(
    config: _Config,
    q: Float[Array, "b h t d"],
    k: Float[Array, "b h s d"],
    v: Float[Array, "b h s e"],
    segments: tuple[Int[Array, "b t l"], Int[Array, "b 8 s"]] | None,
    schedule: blocks.Schedule | blocks.Visits,
    lo: Int[Array, 1],
) -> Float[Array, "b h t e"]:
  """Blocked retrieval on padded, head-major arrays, with a recomputing backward pass."""
  return _forward(config, q, k, v, segments, schedule, lo)[0]


def _retrieve_fwd(config, q, k, v, segments, schedule, lo):
  # Its own jit: when remat saves the named outputs, the recomputation drops the whole call, where
  # it would keep a bare pallas_call (which dead-code elimination never removes).
  forward = jax.jit(_forward, static_argnums=0)
  y, row_max, row_sum = remat.named(forward(config, q, k, v, segments, schedule, lo))
  return y, (q, k, v, segments, schedule, lo, row_max, row_sum)


def _backward_specs(
    config: _Config,
    queries: Any,
    keys: Any,
    dim: int,
    value_dim: int,
    extra_specs: list[pl.BlockSpec],
    *,
    correction: bool,
) -> list[pl.BlockSpec]:
  """Blocks of the backward kernels' inputs (q, k, v, dy, row max, row sum[, D], `_extras`)."""
  block = config.block
  rows = [_time_spec(block, NUM_LANES, queries)] * (3 if correction else 2)
  return [
      _time_spec(block, dim, queries),
      _time_spec(block, dim, keys),
      _time_spec(block, value_dim, keys),
      _time_spec(block, value_dim, queries),
      *rows,
      *extra_specs,
  ]


def _retrieve_bwd(config, residuals, dy):
  q, k, v, segments, schedule, lo, row_max, row_sum = residuals
  batch, heads, seq_len, dim = q.shape
  value_dim = v.shape[-1]
  block = config.block
  stats_shape = (batch, heads, seq_len, NUM_LANES)
  # Saved without lanes (128x smaller), given back the lanes the kernels read rows from.
  row_max, row_sum = (jnp.broadcast_to(x[..., None], stats_shape) for x in (row_max, row_sum))

  # Query-major: query block n reads its live key blocks.
  queries, keys = _own_block, _scheduled_block(config, key_major=False)
  extra_specs, extra = _extras(config, queries, keys, segments, schedule)
  count, first = blocks.visits(schedule, "kv")
  common = dict(first=first, count=count, steps=config.max_kv, lo=lo)
  (correction,) = _call(
      config,
      _correction_kernel,
      in_specs=_backward_specs(
          config, queries, keys, dim, value_dim, extra_specs, correction=False
      ),
      out_specs=[_time_spec(block, NUM_LANES, queries)],
      out_shape=[jax.ShapeDtypeStruct(stats_shape, jnp.float32)],
      scratch=[(block, 1)],
      inputs=[q, k, v, dy, row_max, row_sum, *extra],
      **common,
  )
  inputs = [q, k, v, dy, row_max, row_sum, correction, *extra]
  (dq,) = _call(
      config,
      _dq_kernel,
      in_specs=_backward_specs(config, queries, keys, dim, value_dim, extra_specs, correction=True),
      out_specs=[_time_spec(block, dim, queries)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
      scratch=[(block, dim)],
      inputs=inputs,
      **common,
  )

  # Key-major: key block n reads its live query blocks.
  queries, keys = _scheduled_block(config, key_major=True), _own_block
  extra_specs, _ = _extras(config, queries, keys, segments, schedule)
  count, first = blocks.visits(schedule, "q")
  dk, dv = _call(
      config,
      _dkv_kernel,
      in_specs=_backward_specs(config, queries, keys, dim, value_dim, extra_specs, correction=True),
      out_specs=[_time_spec(block, dim, keys), _time_spec(block, value_dim, keys)],
      out_shape=[
          jax.ShapeDtypeStruct(k.shape, k.dtype),
          jax.ShapeDtypeStruct(v.shape, v.dtype),
      ],
      scratch=[(block, dim), (block, value_dim)],
      first=first,
      count=count,
      steps=config.max_q,
      lo=lo,
      inputs=inputs,
  )
  # Integer inputs take float0 cotangents.
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (segments, schedule, lo))
  return (dq, dk, dv, *zeros)


_retrieve.defvjp(_retrieve_fwd, _retrieve_bwd)


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
    interpret: Interpret,
) -> Float[Array, "b t h e"]:
  """Pads T to whole blocks, moves heads before time, schedules the live tiles (or lists the
  `selected` blocks), runs and crops."""
  batch, seq_len, heads, _ = q.shape
  num_blocks = -(-seq_len // block)
  pad = num_blocks * block - seq_len

  # Padded keys and values are zeros, so every score and product they enter is finite.
  def heads_major(x):
    return jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

  if selected is None:
    schedule = blocks.schedule(
        segment_ids, batch=batch, seq_len=seq_len, block_q=block, block_k=block, lo=lo, hi=hi
    )
    max_kv = blocks.max_key_blocks(block, block, hi, num_blocks)
    max_q = blocks.max_query_blocks(block, block, hi, num_blocks)
  else:
    schedule = blocks.selected_visits(selected, num_blocks, block)
    max_kv, max_q = schedule.kv_list.shape[-1], schedule.q_list.shape[-1]
  segments = None
  if segment_ids is not None:
    ids = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, pad)])
    padded_len = num_blocks * block
    segments = (
        jax.lax.broadcast_in_dim(ids, (batch, padded_len, NUM_LANES), (0, 1)),
        jax.lax.broadcast_in_dim(ids, (batch, NUM_SUBLANES, padded_len), (0, 2)),
    )
  config = _Config(
      block=block,
      hi=hi,
      num_blocks=num_blocks,
      max_kv=max_kv,
      max_q=max_q,
      segmented=segment_ids is not None,
      interpret=interpret,
      heads=heads,
      selected=selected is not None,
  )
  q, k, v = (heads_major(x) for x in (q, k, v))
  y = _retrieve(config, q, k, v, segments, schedule, lo[None])
  return y.transpose(0, 2, 1, 3)[:, :seq_len]


def retrieve_pallas_tpu(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    *,
    lo: bands.IntLike,
    hi: int | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
    block_size: int | None = None,
    backend: str | None = None,
    interpret: Interpret | None = None,
) -> Float[Array, "b t h e"]:
  """y[b, t, h] = sum_{s in S(t)} softmax_s(q[b, t, h] . k[b, s, h]) v[b, s, h], as TPU kernels.

  Inputs are assumed validated by `kernels_pallas.retrieve`. `lo` may be a Python int or a traced
  int32 scalar: either way it reaches the kernels as data, so one compilation serves every value.
  Reverse-mode differentiable in q, k, v.

  Args:
    q, k, v, lo, hi, segment_ids: as in `kernels_pallas.retrieve`.
    block_size: B, a multiple of 8 (and, compiled, of 128 unless it covers the whole padded
      sequence); None picks `default_block_size(T)`.
    backend: the backend compiled for (None: JAX's default backend).
    interpret: False compiles with Mosaic; True or a `pltpu.InterpretParams` runs Pallas's
      interpreter (the latter its TPU simulator); None compiles for backend "tpu" and runs
      CPU_INTERPRET for any other.

  Returns:
    y in the dtype of the inputs, computed with float32 softmax and sums.
  """
  if interpret is None:
    interpret = False if (backend or jax.default_backend()) == "tpu" else CPU_INTERPRET
  seq_len = q.shape[1]
  if block_size is None:
    block_size = default_block_size(seq_len)
  _check_block_size(block_size, seq_len, compiled=interpret is False)
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


def retrieve_pallas_tpu_selected(
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
    interpret: Interpret | None = None,
) -> Float[Array, "b t h e"]:
  """`select.retrieve_selected_xla` as TPU kernels: the grid of each query block steps through
  the key blocks its queries selected (scalar-prefetched lists, `blocks.selected_visits`), each
  row reading its own. B = `block_size`, the selection's block, with `retrieve_pallas_tpu`'s
  constraints. The lists take b h n w integers of SMEM, w up to n: they bound the length a
  compiled kernel takes (design.md, "Block selection"). Reverse-mode differentiable in q, k, v.
  """
  if interpret is None:
    interpret = False if (backend or jax.default_backend()) == "tpu" else CPU_INTERPRET
  _check_block_size(block_size, q.shape[1], compiled=interpret is False)
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
