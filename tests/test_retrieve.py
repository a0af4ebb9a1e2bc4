"""Tests of `kernels_pallas.retrieve` against a brute-force float64 loop.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas
from kernels_pallas import IMPLEMENTATIONS, retrieve, visible_counts

IMPLS = ("reference", "xla")
B, T, H, D, E = 2, 37, 2, 3, 5
BLOCK = 8  # T = 37 is not a multiple of it.

# Compiled once per static configuration: op-by-op dispatch is slow on CPU.
_retrieve = jax.jit(retrieve, static_argnames=("lo", "hi", "impl", "block_size"))


def _oracle(q, k, v, lo, hi, segment_ids):
  """The definition of the op, one (b, t, h) at a time, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, seq_len, heads, _ = q.shape
  y = np.zeros((batch, seq_len, heads, v.shape[-1]))
  for b in range(batch):
    for t in range(seq_len):
      band = [
          s
          for s in range(seq_len)
          if lo <= t - s
          and (hi is None or t - s <= hi)
          and (segment_ids is None or segment_ids[b, s] == segment_ids[b, t])
      ]
      if not band:
        continue
      for h in range(heads):
        scores = np.array([q[b, t, h] @ k[b, s, h] for s in band])
        weights = np.exp(scores - scores.max())
        y[b, t, h] = weights / weights.sum() @ v[b, band, h]
  return y


def _segments(lengths_per_row):
  """[b, t] document ids from the document lengths of every row."""
  return np.stack([np.repeat(np.arange(len(ls)), ls) for ls in lengths_per_row]).astype(np.int32)


# Row 0 packs four documents, one of a single token; row 1 two.
SEGMENTS = _segments([[10, 1, 20, 6], [3, 34]])


@dataclasses.dataclass(frozen=True)
class Case:
  lo: int
  hi: int | None
  packed: bool = False

  @property
  def segment_ids(self):
    return SEGMENTS if self.packed else None


CASES = {
    "v1": Case(1, None),
    "short_term": Case(1, 4),
    "short_term_wider_than_t": Case(1, 100),
    "long_term": Case(5, None),
    "long_term_past_end": Case(50, None),
    "band": Case(3, 20),
    "v1_packed": Case(1, None, packed=True),
    "short_term_packed": Case(1, 4, packed=True),
    "long_term_packed": Case(3, None, packed=True),
}


def _inputs(seed, shape=(B, T, H, D), value_dim=E, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=shape)
  k = rng.normal(size=shape)
  v = rng.normal(size=shape[:3] + (value_dim,))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _assert_close(actual, expected, tol):
  """Max abs error within tol, relative to the scale of `expected` (at least 1)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


@functools.cache
def _forward_and_grads(impl, case, block_size=BLOCK):
  """(y, gradients of sum(y * cotangent) in q, k, v) as one jitted function of (q, k, v, cotangent).

  Cached so that every test of one (impl, case, block_size) shares a single compilation.
  """

  op = functools.partial(
      retrieve,
      lo=case.lo,
      hi=case.hi,
      segment_ids=case.segment_ids,
      impl=impl,
      block_size=block_size,
  )

  def fn(q, k, v, cotangent):
    y, vjp = jax.vjp(op, q, k, v)
    return y, vjp(cotangent.astype(y.dtype))

  return jax.jit(fn)


def _cotangent(seed):
  return jax.random.normal(jax.random.key(seed), (B, T, H, E))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_forward_matches_oracle(impl, name):
  case = CASES[name]
  q, k, v = _inputs(0)
  y, _ = _forward_and_grads(impl, case)(q, k, v, _cotangent(0))
  assert y.dtype == jnp.float32 and y.shape == (B, T, H, E)
  _assert_close(y, _oracle(q, k, v, case.lo, case.hi, case.segment_ids), 1e-5)


@pytest.mark.parametrize("lo, hi", [(1, None), (64, 255)])
def test_xla_default_blocks_on_long_unaligned_sequence(lo, hi):
  seq_len = 1000
  segment_ids = _segments([[300, 1, 699]])
  q, k, v = _inputs(1, shape=(1, seq_len, 1, 4), value_dim=4)
  y = _retrieve(q, k, v, lo=lo, hi=hi, segment_ids=segment_ids, impl="xla")
  _assert_close(y, _oracle(q, k, v, lo, hi, segment_ids), 1e-5)


@pytest.mark.parametrize("name", CASES)
def test_xla_gradients_match_reference(name):
  case = CASES[name]
  q, k, v = _inputs(2)
  _, expected = _forward_and_grads("reference", case)(q, k, v, _cotangent(1))
  _, actual = _forward_and_grads("xla", case)(q, k, v, _cotangent(1))
  for a, e in zip(actual, expected):
    assert np.isfinite(np.asarray(a)).all()
    _assert_close(a, e, 2e-4)


@pytest.mark.parametrize("name", CASES)
def test_xla_single_block_matches_reference(name):
  """A sequence that is one block (T = 37 padded to 40) skips the loops and uses autodiff."""
  case = CASES[name]
  q, k, v = _inputs(13)
  y, actual = _forward_and_grads("xla", case, 40)(q, k, v, _cotangent(14))
  _assert_close(y, _oracle(q, k, v, case.lo, case.hi, case.segment_ids), 1e-5)
  _, expected = _forward_and_grads("reference", case)(q, k, v, _cotangent(14))
  for a, e in zip(actual, expected):
    assert np.isfinite(np.asarray(a)).all()
    _assert_close(a, e, 2e-4)


def test_xla_default_block_size():
  from kernels_pallas.xla import default_block_size

  assert default_block_size(256, None) == 256  # Short sequences are a single block...
  assert default_block_size(37, 255) == 40
  assert default_block_size(256, 63) == 32  # ...unless the band is much narrower.
  assert default_block_size(257, None) == 128
  assert default_block_size(1000, 255) == 128
  assert default_block_size(4096, 15) == 16


@pytest.mark.parametrize("name", ["v1_packed", "short_term", "long_term_packed"])
def test_reference_gradients_match_finite_differences(name):
  case = CASES[name]
  q, k, v = _inputs(3)
  cotangent = np.asarray(_cotangent(2), np.float64)
  _, grads = _forward_and_grads("reference", case)(q, k, v, _cotangent(2))
  primals = [np.asarray(x, np.float64) for x in (q, k, v)]
  rng = np.random.default_rng(4)
  eps = 1e-4
  for _ in range(2):
    directions = [rng.normal(size=x.shape) for x in primals]
    shifted = lambda sign: np.sum(
        cotangent
        * _oracle(
            *(x + sign * eps * u for x, u in zip(primals, directions)),
            case.lo,
            case.hi,
            case.segment_ids,
        )
    )
    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    analytic = sum(np.sum(np.asarray(g, np.float64) * u) for g, u in zip(grads, directions))
    assert abs(analytic - numeric) <= 1e-4 * max(1.0, abs(numeric))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["long_term_past_end", "v1_packed", "long_term_packed"])
def test_empty_rows_are_exactly_zero_with_finite_gradients(impl, name):
  case = CASES[name]
  q, k, v = _inputs(5)
  y, grads = _forward_and_grads(impl, case)(q, k, v, jnp.ones((B, T, H, E)))
  empty = np.asarray(visible_counts(case.segment_ids, T, case.lo, case.hi) == 0)
  empty = np.broadcast_to(empty, (B, T))
  assert empty.any()
  assert (np.asarray(y)[empty] == 0).all()
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("impl, block_size", [("reference", BLOCK), ("xla", BLOCK), ("xla", 40)])
@pytest.mark.parametrize("hi", [None, 30])
def test_traced_lo_compiles_once(impl, block_size, hi):
  q, k, v = _inputs(6)
  traces = []

  def forward_and_grads(impl, count_traces):
    """Jitted (q, k, v, lo) -> (y, gradients of sum(y ** 2)), lo a traced argument."""

    def fn(q, k, v, lo):
      if count_traces:
        traces.append(lo)

      def loss(q, k, v):
        y = retrieve(
            q, k, v, lo=lo, hi=hi, segment_ids=SEGMENTS, impl=impl, block_size=block_size
        )
        return jnp.sum(y**2), y

      (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
      return y, grads

    return jax.jit(fn)

  actual_fn = forward_and_grads(impl, count_traces=True)
  expected_fn = forward_and_grads("reference", count_traces=False)
  for lo in (1, 3, 9, 20, 30, 50):
    y, grads = actual_fn(q, k, v, jnp.int32(lo))
    _assert_close(y, _oracle(q, k, v, lo, hi, SEGMENTS), 1e-5)
    for g, e in zip(grads, expected_fn(q, k, v, jnp.int32(lo))[1]):
      _assert_close(g, e, 2e-4)
  assert len(traces) == 1


@pytest.mark.parametrize("name", ["v1_packed", "short_term"])
def test_gradient_through_per_row_bandwidth(name):
  """q = beta * k with beta a function of per-head parameters, as in the v2 memories."""
  case = CASES[name]
  _, k, v = _inputs(7)
  theta = jnp.array([0.3, -0.2])
  counts = visible_counts(case.segment_ids, T, case.lo, case.hi).astype(jnp.float32)
  cotangent = _cotangent(4)

  def loss(theta, k, v, impl):
    beta = jnp.exp(theta) * (1.0 + counts[..., None]) ** 0.5
    y = retrieve(
        beta[..., None] * k,
        k,
        v,
        lo=case.lo,
        hi=case.hi,
        segment_ids=case.segment_ids,
        impl=impl,
        block_size=BLOCK,
    )
    return jnp.sum(y * cotangent)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  for a, e in zip(grad(theta, k, v, "xla"), grad(theta, k, v, "reference")):
    _assert_close(a, e, 2e-4)


@pytest.mark.parametrize("block_size", [BLOCK, None])  # None: the default, a single block.
@pytest.mark.parametrize("scale", [30.0, 300.0, 3e3, 6e4])
def test_xla_gradients_with_huge_key_norms(scale, block_size):
  """v1 keys are their own queries with norms up to 65535 (q . k ~ 4e9): the backward must not
  amplify rounding (it once saved row_max + log(row_sum) and used D = dy . y, off by up to 1e33)."""
  q, _, v = _inputs(11)
  k = q / jnp.linalg.norm(q, axis=-1, keepdims=True) * scale
  cotangent = _cotangent(12)

  def grads(impl):
    loss = lambda k, v: jnp.sum(
        retrieve(k, k, v, lo=1, hi=None, impl=impl, block_size=block_size) * cotangent
    )
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(k, v)

  for actual, expected in zip(grads("xla"), grads("reference")):
    assert bool(jnp.isfinite(actual).all())
    _assert_close(actual, expected, 1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(impl):
  case = CASES["v1_packed"]
  q, k, v = _inputs(8, dtype=jnp.bfloat16)
  y, grads = _forward_and_grads(impl, case)(q, k, v, _cotangent(3))
  assert y.dtype == jnp.bfloat16
  _assert_close(y, _oracle(q, k, v, case.lo, case.hi, case.segment_ids), 3e-2)
  widened = (x.astype(jnp.float32) for x in (q, k, v))
  _, expected = _forward_and_grads("reference", case)(*widened, _cotangent(3))
  for g, e in zip(grads, expected):
    assert g.dtype == jnp.bfloat16
    _assert_close(g, e, 5e-2)


def test_auto_is_xla():
  q, k, v = _inputs(9)
  auto, xla = (
      _retrieve(q, k, v, lo=2, hi=None, impl=impl, block_size=BLOCK) for impl in ("auto", "xla")
  )
  np.testing.assert_array_equal(auto, xla)


def test_implementations_table():
  assert {"reference", "xla"} <= set(IMPLEMENTATIONS)
  assert kernels_pallas.retrieve is retrieve


_Q, _K, _V = _inputs(10)


def _valid_call(**overrides):
  """retrieve on valid arguments, with some of them replaced."""
  kwargs = dict(q=_Q, k=_K, v=_V, lo=1, hi=None, segment_ids=SEGMENTS)
  kwargs.update(overrides)
  q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
  return retrieve(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(q=_Q[0]), ValueError, r"q must have rank 4"),
        (dict(v=_V[..., None]), ValueError, r"v must have rank 4"),
        (dict(k=_K[:, :-1]), ValueError, r"q and k must have the same shape, got q \(2, 37"),
        (dict(v=_V[:, :, :1]), ValueError, r"v must match k in \[b, t, h\]"),
        (dict(q=_Q.astype(jnp.int32)), TypeError, r"q must have a floating dtype, got int32"),
        (dict(v=_V.astype(jnp.bfloat16)), TypeError, r"share one dtype.*v bfloat16"),
        (dict(segment_ids=SEGMENTS[:, :-1]), ValueError, r"segment_ids must have shape"),
        (dict(segment_ids=SEGMENTS.astype(np.float32)), TypeError, r"integer dtype"),
        (dict(lo=0), ValueError, r"lo must be >= 1, got 0"),
        (dict(lo=2.0), TypeError, r"lo must be an int or an integer scalar array"),
        (dict(lo=True), TypeError, r"lo must be an int or an integer scalar array"),
        (dict(lo=jnp.float32(2)), TypeError, r"lo must be an integer scalar"),
        (dict(lo=jnp.array([1, 2])), TypeError, r"lo must be an integer scalar"),
        (dict(hi=0), ValueError, r"hi must be >= 1, got 0"),
        (dict(lo=5, hi=4), ValueError, r"hi must be >= lo, got lo=5 and hi=4"),
        (dict(hi=2.5), TypeError, r"hi must be a Python int or None"),
        (dict(block_size=0), ValueError, r"block_size must be a positive int"),
        (dict(impl="pallas"), ValueError, r"unknown retrieve impl 'pallas'.*'auto', 'reference'"),
    ],
)
def test_validation_errors(overrides, error, match):
  with pytest.raises(error, match=match):
    _valid_call(**overrides)
