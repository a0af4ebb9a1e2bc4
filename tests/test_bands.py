"""Band arithmetic: document positions and the visible counts n_t of design.md's table of bands."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas
from mosaics_jax.model import bandwidth

SEGMENTS = np.repeat([3, 3, 7, 1, 4], [5, 1, 9, 1, 14])[None]  # Documents of 6, 9, 1 and 14 tokens.


def _brute_counts(segment_ids, lo, hi):
  """|S(t)| by enumerating every s: the definition itself."""
  seg = segment_ids[0]
  return np.array(
      [
          sum(
              1
              for s in range(len(seg))
              if lo <= t - s and (hi is None or t - s <= hi) and seg[s] == seg[t]
          )
          for t in range(len(seg))
      ]
  )


@pytest.mark.parametrize("lo, hi", [(1, None), (1, 3), (1, 255), (4, None), (2, 2), (40, None)])
def test_visible_counts_match_the_band_definition(lo, hi):
  counts = kernels_pallas.visible_counts(jnp.asarray(SEGMENTS), SEGMENTS.shape[1], lo, hi)
  np.testing.assert_array_equal(counts[0], _brute_counts(SEGMENTS, lo, hi))


def test_visible_counts_table_of_spec():
  """v1: t;  short-term (h=256): min(t, h-1);  long-term (delay m): max(0, t-m+1)."""
  t = np.arange(600)
  count = lambda lo, hi: np.asarray(kernels_pallas.visible_counts(None, 600, lo, hi))[0]
  np.testing.assert_array_equal(count(1, None), t)
  np.testing.assert_array_equal(count(1, 255), np.minimum(t, 255))
  np.testing.assert_array_equal(count(64, None), np.maximum(0, t - 63))


def test_visible_counts_with_traced_delay():
  fn = jax.jit(lambda m: kernels_pallas.visible_counts(jnp.asarray(SEGMENTS), 30, m, None))
  for m in (1, 4, 40):
    np.testing.assert_array_equal(fn(jnp.int32(m))[0], _brute_counts(SEGMENTS, m, None))


def test_short_and_long_term_bands_overlap_by_h_minus_m():
  """With m < h the two memories share the pairs t-h+1 .. t-m: a soft boundary."""
  h, m, t = 256, 64, 1000
  s = jnp.arange(t + 1)
  short = kernels_pallas.band_mask(t, s, 1, h - 1)
  long = kernels_pallas.band_mask(t, s, m, None)
  both = np.flatnonzero(short & long)
  assert both.min() == t - h + 1 and both.max() == t - m and len(both) == h - m
  assert bool((short | long)[:t].all()) and not bool((short | long)[t])


def test_document_positions_restart_at_each_document():
  pos = kernels_pallas.document_positions(jnp.asarray(SEGMENTS), SEGMENTS.shape[1])[0]
  expected = np.concatenate([np.arange(n) for n in (6, 9, 1, 14)])
  np.testing.assert_array_equal(pos, expected)
  starts = kernels_pallas.segment_starts(jnp.asarray(SEGMENTS))[0]
  np.testing.assert_array_equal(np.flatnonzero(starts), [0, 6, 15, 16])


def test_adaptive_bandwidth_formula_and_reparameterisation():
  """beta = exp(min(theta1, 10)) n^min(|theta_a|, 1) + exp(min(theta0, 10)) (v2 Eq. 6, Table 6)."""
  n = jnp.array([[0, 1, 2, 7, 300]])
  theta0 = jnp.array([1.5, 12.0, -1.0])
  theta1 = jnp.array([1.5, 0.2, 15.0])
  theta_a = jnp.array([1 / 3, -0.5, 3.0])  # |theta_a| and the clamp at 1.
  beta = bandwidth.adaptive_bandwidth(n, theta0, theta1, theta_a, 10.0)
  nn = np.array([0, 1, 2, 7, 300], np.float64)[:, None]
  b0 = np.exp([1.5, 10.0, -1.0])
  b1 = np.exp([1.5, 0.2, 10.0])
  alpha = np.array([1 / 3, 0.5, 1.0])
  np.testing.assert_allclose(beta[0], b1 * nn**alpha + b0, rtol=1e-6)
  # At the paper's init, beta grows with n and equals beta0 where nothing is visible.
  assert bool(jnp.all(jnp.diff(beta[0, :, 0]) > 0))


def test_adaptive_bandwidth_gradient_is_finite_at_zero_pairs():
  grads = jax.grad(
      lambda a: bandwidth.adaptive_bandwidth(
          jnp.array([[0, 0, 5]]), jnp.ones(2), jnp.ones(2), a, 10.0
      ).sum()
  )(jnp.array([0.3, 0.7]))
  assert bool(jnp.isfinite(grads).all())
  # d/d alpha of n^alpha = n^alpha log n, from the one visible row.
  np.testing.assert_allclose(grads, np.e * 5 ** np.array([0.3, 0.7]) * np.log(5), rtol=1e-5)
