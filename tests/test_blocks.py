"""The live-tile schedule shared by the Pallas kernels, against a brute-force pair count."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kernels_pallas import blocks


def _live_pairs(segment_ids, seq_len, block_q, block_k, lo, hi):
  """[b, i, j]: whether query block i and key block j share a pair of the band (brute force)."""
  t = np.arange(seq_len)
  delay = t[:, None] - t[None, :]
  band = (delay >= lo) & (True if hi is None else delay <= hi)
  if segment_ids is None:
    pairs = band[None]
  else:
    pairs = band[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  num_q, num_k = -(-seq_len // block_q), -(-seq_len // block_k)
  live = np.zeros((pairs.shape[0], num_q, num_k), bool)
  for i, j in itertools.product(range(num_q), range(num_k)):
    live[:, i, j] = pairs[:, i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k].any(
        (1, 2)
    )
  return live


def _listed(first, count):
  """The set of (b, row, block) the ranges hold."""
  return {
      (b, r, int(first[b, r]) + n)
      for b in range(first.shape[0])
      for r in range(first.shape[1])
      for n in range(int(count[b, r]))
  }


SEGMENTS = np.stack([np.repeat(np.arange(4), [30, 1, 50, 19]), np.repeat([0, 1], [7, 93])])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    "block_q, block_k, lo, hi",
    [(16, 16, 1, None), (16, 8, 3, 20), (8, 16, 0, None), (16, 16, 64, None), (32, 16, 1, 4)],
)
def test_schedule_lists_exactly_the_live_tiles(packed, block_q, block_k, lo, hi):
  segment_ids = SEGMENTS if packed else None
  sched = blocks.schedule(
      segment_ids, batch=2, seq_len=100, block_q=block_q, block_k=block_k, lo=lo, hi=hi
  )
  # Live: the band meets the tile and the blocks' ranges of document ids overlap.
  band_live = _live_pairs(None, 100, block_q, block_k, lo, hi)
  live = np.broadcast_to(band_live, (2, *band_live.shape[1:]))
  if packed:
    ranges = lambda block: [
        [(row[n : n + block].min(), row[n : n + block].max()) for n in range(0, 100, block)]
        for row in segment_ids
    ]
    q_ranges, k_ranges = ranges(block_q), ranges(block_k)
    overlap = np.array(
        [
            [[qa <= kb and ka <= qb for ka, kb in k_row] for qa, qb in q_row]
            for q_row, k_row in zip(q_ranges, k_ranges)
        ]
    )
    live = live & overlap
    # Never fewer than the tiles that hold a pair (the range test is exact for packed ids but
    # blind to the band inside a tile).
    exact = _live_pairs(segment_ids, 100, block_q, block_k, lo, hi)
    assert not (exact & ~live).any()
  expected = {tuple(x) for x in np.argwhere(live)}
  kv_first, kv_count = np.asarray(sched.kv_first), np.asarray(sched.kv_count)
  assert _listed(kv_first, kv_count) == expected
  q_first, q_count = np.asarray(sched.q_first), np.asarray(sched.q_count)
  assert _listed(q_first, q_count) == {(b, j, i) for b, i, j in expected}
  # Within the static bounds that size the kernels' grids and loops.
  num_q, num_k = kv_count.shape[1], q_count.shape[1]
  assert kv_count.max() <= blocks.max_key_blocks(block_q, block_k, hi, num_k)
  assert q_count.max() <= blocks.max_query_blocks(block_q, block_k, hi, num_q)


def test_ids_out_of_order_get_a_range_over_their_live_blocks():
  """Document ids that are not increasing runs: the range spans every live tile, starts and ends
  on one, and holds dead ones between, which the kernels' tile masks mask."""
  segment_ids = np.tile(np.repeat([0, 1], 8), 4)[None]  # 0 x 8, 1 x 8, 0 x 8, ...
  sched = blocks.schedule(segment_ids, batch=1, seq_len=64, block_q=8, block_k=8, lo=1, hi=None)
  exact = _live_pairs(segment_ids, 64, 8, 8, 1, None)
  first, count = np.asarray(sched.kv_first), np.asarray(sched.kv_count)
  listed = _listed(first, count)
  assert {tuple(x) for x in np.argwhere(exact)} < listed  # Dead tiles inside the ranges.
  for i in range(8):
    if count[0, i]:
      assert exact[0, i, first[0, i]] and exact[0, i, first[0, i] + count[0, i] - 1]


@pytest.mark.parametrize(
    "first, count, steps",
    [(3, 4, [3, 4, 5, 6, 6, 6]), (0, 0, [0, 0, 0]), (5, 1, [5, 5])],
)
def test_steps_past_the_count_revisit_the_last_live_block(first, count, steps):
  visited = [int(blocks.visited_block(first, count, step)) for step in range(len(steps))]
  assert visited == steps


@pytest.mark.parametrize(
    "lo, hi", [(lo, hi) for lo in (0, 1, 2, 5) for hi in (0, 1, 7, 16, 33, 100) if hi >= lo]
)
@pytest.mark.parametrize("block_q, block_k", [(8, 8), (16, 8), (8, 32)])
def test_static_bounds_hold_for_every_lo(lo, hi, block_q, block_k):
  live = _live_pairs(None, 200, block_q, block_k, lo, hi)[0]
  assert live.sum(1).max() <= blocks.max_key_blocks(block_q, block_k, hi, live.shape[1])
  assert live.sum(0).max() <= blocks.max_query_blocks(block_q, block_k, hi, live.shape[0])
