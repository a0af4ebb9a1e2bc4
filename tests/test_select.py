"""Tests of block selection (`kernels_pallas.select`, `kernels_pallas.retrieve_selected`).

Selection is checked against a brute-force numpy top-K; the XLA path against the dense oracle
`retrieve_selected_reference` (forward and gradients) with few blocks, and both against
`retrieve` when K covers every block (`ReferenceTests` on the shared band cases).

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v, k = selected blocks of a query.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import (
    BlockSelection,
    retrieve,
    retrieve_selected,
    select as select_lib,
    select_blocks,
)

import kernel_cases as kc

T, D, E = 75, 4, 3  # Not a multiple of the blocks below.
SEGMENTS = kc.segments([[30, 1, 44], [75]])
# (lo, hi, packed): v1, the long-term memory (a delay inside and across blocks), a short band.
BANDS = [(1, None, False), (1, None, True), (13, None, True), (20, None, False), (3, 30, True)]


def _selected_op(impl, selection, query_chunk=None):
  return functools.partial(
      retrieve_selected, selection=selection, impl=impl, query_chunk=query_chunk
  )


class TestEveryBlockEqualsRetrieve(kc.ReferenceTests):
  """With K at least the number of blocks, `retrieve_selected` is `retrieve` (shared cases)."""

  pytestmark = pytest.mark.slow
  op = staticmethod(_selected_op("xla", BlockSelection(blocks=16, block_size=64)))
  dims = (8, 8)


@pytest.mark.parametrize("impl,summary", [("reference", "mean"), ("xla", "bound")])
@pytest.mark.parametrize("lo,hi,packed", BANDS)
def test_every_block_equals_retrieve(impl, summary, lo, hi, packed):
  """K covering every candidate: forward and gradients equal `retrieve`'s."""
  segment_ids = SEGMENTS if packed else None
  args = kc.inputs(1, T, (D, E))
  selection = BlockSelection(blocks=T, block_size=8, recent=2, summary=summary)
  actual = kc.run(_selected_op(impl, selection, query_chunk=16), args, lo, hi, segment_ids)
  expected = kc.run(retrieve, args, lo, hi, segment_ids, impl="reference")
  kc.assert_matches(actual, expected)


@pytest.mark.parametrize("summary", select_lib.SUMMARIES)
@pytest.mark.parametrize(
    "lo,hi,packed,chunk", [(*band, (None, 7)[i % 2]) for i, band in enumerate(BANDS)]
)
def test_xla_matches_the_dense_oracle_with_few_blocks(summary, lo, hi, packed, chunk):
  """K = 2 of ~9 blocks: the XLA path reads what the oracle reads (forward and gradients)."""
  segment_ids = SEGMENTS if packed else None
  args = kc.inputs(2, T, (D, E))
  selection = BlockSelection(blocks=2, block_size=8, summary=summary)
  actual = kc.run(_selected_op("xla", selection, chunk), args, lo, hi, segment_ids)
  expected = kc.run(_selected_op("reference", selection), args, lo, hi, segment_ids)
  kc.assert_matches(actual, expected)
  # And it does read fewer pairs than the full band: the outputs differ somewhere.
  full = kc.run(retrieve, args, lo, hi, segment_ids, impl="reference")
  assert not np.allclose(actual[0], full[0], atol=1e-3)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("lo,hi,packed", [(1, None, False), (13, None, True), (3, 30, True)])
def test_pallas_kernels_match_the_dense_oracle(impl, lo, hi, packed):
  """The Pallas kernels (interpreted here) visit the listed blocks and mask the rows that did not
  select them: forward and gradients equal the oracle's."""
  segment_ids = SEGMENTS if packed else None
  args = kc.inputs(9, T, (D, E))
  selection = BlockSelection(blocks=2, block_size=16)
  actual = kc.run(_selected_op(impl, selection), args, lo, hi, segment_ids)
  expected = kc.run(_selected_op("reference", selection), args, lo, hi, segment_ids)
  kc.assert_matches(actual, expected)


def test_bfloat16_and_traced_lo_compile_once():
  selection = BlockSelection(blocks=3, block_size=16)
  op = _selected_op("xla", selection)
  args = kc.inputs(3, 100, (D, E), dtype=jnp.bfloat16)
  widened = tuple(x.astype(jnp.float32) for x in args)
  expected = kc.run(_selected_op("reference", selection), widened, 17)
  kc.assert_matches(kc.run(op, args, 17), expected, jnp.bfloat16)
  traces = []

  def counted(*args, **kwargs):
    traces.append(kwargs["lo"])
    return op(*args, **kwargs)

  for lo in (1, 17, 40):
    kc.assert_matches(
        kc.run(counted, kc.inputs(4, 100, (D, E)), lo),
        kc.run(_selected_op("reference", selection), kc.inputs(4, 100, (D, E)), lo),
    )
  assert len(traces) == 1


def _brute_force(q, k, lo, hi, segment_ids, selection):
  """Per (b, t, h): (the recent blocks, the set of the K best candidates), from the definition."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  batch, seq_len, heads, _ = q.shape
  size, recent = selection.block_size, selection.recent
  doc_starts = np.arange(seq_len) - kc.positions_in_documents(segment_ids, batch, seq_len)
  answer = {}
  for b in range(batch):
    for t in range(seq_len):
      newest = t - lo

      def reaches(j, b=b, t=t):
        """Block j holds a key of t's document inside the band's far edge."""
        end = (j + 1) * size - 1
        return end >= doc_starts[b, t] and (hi is None or end >= t - hi)

      for h in range(heads):
        scores = {}
        for j in range(-(-seq_len // size)):
          keys = k[b, j * size : (j + 1) * size, h]
          # Older than the R recent blocks, hence complete.
          if j <= newest // size - recent and reaches(j):
            if selection.summary == "mean":
              scores[j] = q[b, t, h] @ keys.mean(axis=0)
            else:
              scores[j] = np.maximum(q[b, t, h] * keys.min(0), q[b, t, h] * keys.max(0)).sum()
        best = sorted(scores, key=lambda j: -scores[j])[: selection.blocks]
        newest_block = newest // size
        recent_blocks = [
            j for j in range(newest_block - recent + 1, newest_block + 1) if j >= 0 and reaches(j)
        ]
        answer[b, t, h] = (recent_blocks, set(best))
  return answer


@pytest.mark.parametrize("summary", select_lib.SUMMARIES)
@pytest.mark.parametrize("lo,hi,packed", [(1, None, False), (13, None, True), (3, 30, True)])
def test_selection_is_a_brute_force_top_k(summary, lo, hi, packed):
  segment_ids = SEGMENTS if packed else None
  q, k, _, _ = kc.inputs(5, T, (D, E))
  selection = BlockSelection(blocks=3, block_size=8, recent=2, summary=summary)
  selected = select_blocks(
      q, k, lo=lo, hi=hi, segment_ids=segment_ids, selection=selection, query_chunk=16
  )
  assert selected.blocks.shape == selected.valid.shape == (kc.B, T, kc.H, 5)
  blocks, valid = np.asarray(selected.blocks), np.asarray(selected.valid)
  for (b, t, h), (recent, best) in _brute_force(q, k, lo, hi, segment_ids, selection).items():
    chosen = blocks[b, t, h]
    assert chosen[:2][valid[b, t, h, :2]].tolist() == recent, (b, t, h)
    assert set(chosen[2:][valid[b, t, h, 2:]].tolist()) == best, (b, t, h)


@pytest.mark.parametrize("lo,hi,packed", [(13, None, True), (3, 30, True), (1, None, True)])
def test_no_pair_outside_the_band_or_document_is_read(lo, hi, packed):
  """The gradient of a query's output in v is 0 at every key outside its band and document, and
  outside its selected blocks; inside them some is not."""
  q, k, v, _ = kc.inputs(6, T, (D, E))
  selection = BlockSelection(blocks=2, block_size=8)
  selected = select_blocks(q, k, lo=lo, hi=hi, segment_ids=SEGMENTS, selection=selection)
  op = _selected_op("xla", selection)
  ids = SEGMENTS
  output_at = lambda v, t: jnp.take(op(q, k, v, lo=lo, hi=hi, segment_ids=SEGMENTS), t, axis=1)
  grad_at = jax.jit(jax.grad(lambda v, t: output_at(v, t).sum()))
  for t in (20, 31, 50, 74):
    dv = grad_at(v, t)
    read = np.abs(np.asarray(dv)).sum(axis=-1) > 0  # [b, s, h]
    for b in range(kc.B):
      for h in range(kc.H):
        s = np.arange(T)
        allowed = (t - s >= lo) & (ids[b] == ids[b, t])
        if hi is not None:
          allowed &= t - s <= hi
        blocks = np.asarray(selected.blocks[b, t, h])[np.asarray(selected.valid[b, t, h])]
        allowed &= np.isin(s // 8, blocks)
        assert not (read[b, :, h] & ~allowed).any(), (t, b, h)
        assert read[b, :, h].any() == allowed.any()


def test_selection_is_causal():
  """A query's blocks do not change when keys after its newest readable key t - lo change."""
  q, k, _, _ = kc.inputs(7, T, (D, E))
  selection = BlockSelection(blocks=2, block_size=8)
  lo, t = 5, 50
  before = select_blocks(q, k, lo=lo, hi=None, segment_ids=None, selection=selection)
  k2 = k.at[:, t - lo + 1 :].set(100.0)
  after = select_blocks(q, k2, lo=lo, hi=None, segment_ids=None, selection=selection)
  np.testing.assert_array_equal(before.blocks[:, : t + 1], after.blocks[:, : t + 1])
  np.testing.assert_array_equal(before.valid[:, : t + 1], after.valid[:, : t + 1])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(blocks=-1), "blocks must be >= 0"),
        (dict(blocks=2, block_size=0), "block_size must be >= 1"),
        (dict(blocks=2, recent=0), "recent must be >= 1"),
        (dict(blocks=2, summary="max"), "summary must be one of mean, bound"),
        (dict(blocks=2.5), "blocks must be an int"),
    ],
)
def test_bad_selection_is_named(kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    BlockSelection(**kwargs)


def test_bad_calls_are_named():
  q, k, v, _ = kc.inputs(8, 16, (D, E))
  selection = BlockSelection(blocks=1, block_size=4)
  with pytest.raises(ValueError, match="unknown retrieve impl 'fast'"):
    retrieve_selected(q, k, v, lo=1, selection=selection, impl="fast")
  with pytest.raises(TypeError, match="selection must be a kernels_pallas.BlockSelection"):
    retrieve_selected(q, k, v, lo=1, selection=2)
  with pytest.raises(ValueError, match="q and k must have the same shape"):
    retrieve_selected(q, k[:, :8], v, lo=1, selection=selection)


@pytest.mark.parametrize("summary", select_lib.SUMMARIES)
def test_summaries_of_stored_keys_are_the_blocks_summaries_bit_for_bit(summary):
  """What a decode cache keeps (keys stored 7 at a time, each chunk's blocks summarised anew, one
  block past the end left out) is `block_summaries` of all the keys at once, in the same bits."""
  _, k, _, _ = kc.inputs(10, 64, (D, E))
  expected = select_lib.block_summaries(k, 8, summary)
  stored = jnp.zeros_like(k)
  summaries = select_lib.empty_summaries(kc.B, 8, kc.H, D, summary)
  for start in range(0, 64, 7):
    stored = stored.at[:, start : start + 7].set(k[:, start : start + 7])
    blocks = jnp.broadcast_to(start // 8 + jnp.arange(2), (kc.B, 2))
    summaries = select_lib.summarise_blocks(summaries, stored, blocks, 8)
  for actual, wanted in zip(summaries, expected):
    assert (actual is None) == (wanted is None)
    if wanted is not None:
      np.testing.assert_array_equal(actual, wanted)


@pytest.mark.parametrize("summary", select_lib.SUMMARIES)
def test_a_query_scored_alone_gets_the_bits_it_gets_among_others(summary):
  """A decode step scores one query against a cache's blocks; the forward scores chunks of queries
  against the blocks so far: the same scores to the bit, or near-tied blocks could rank apart."""
  q, k, _, _ = kc.inputs(11, 64, (64, E))
  summaries = select_lib.block_summaries(k[:, :48], 8, summary)
  together = select_lib.block_scores(q, select_lib.block_summaries(k, 8, summary), 8)
  for t in range(0, 64, 9):
    alone = select_lib.block_scores(q[:, t : t + 1], summaries, 8)
    np.testing.assert_array_equal(alone[:, 0], together[:, t, :, :6])
