"""Tests of `linear_scan` against sequential float64 loops, and of `gated_linear_scan` against the
closed form of its recurrence in log space.

Axis legend: b = batch, t = time, h = head, d = feature.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.bands import segment_starts
from kernels_pallas.scans import SCAN_IMPLEMENTATIONS as IMPLS, gated_linear_scan, linear_scan

B, H, D = 2, 3, 4

# Compiled once per shape: op-by-op dispatch of a scan is slow on CPU.
_scan = jax.jit(linear_scan, static_argnames=("impl", "chunk_size"))


def _sequential(a, x, reset):
  """h_t = a_t h_{t-1} + x_t in float64, a: [b, t, h], x: [b, t, h, d], reset: [b, t]."""
  a = np.where(reset[..., None], 0.0, a)
  h = np.zeros_like(x)
  state = np.zeros_like(x[:, 0])
  for t in range(x.shape[1]):
    state = a[:, t, :, None] * state + x[:, t]
    h[:, t] = state
  return h


def _sequential_grads(a, x, reset, cotangent):
  """Gradients of sum(h * cotangent) w.r.t. a and x by the reverse (adjoint) recurrence, float64."""
  a = np.where(reset[..., None], 0.0, a)
  h = _sequential(a, x, reset)
  h_prev = np.concatenate([np.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
  grad_x = np.zeros_like(x)
  adjoint = np.zeros_like(x[:, 0])
  for t in reversed(range(x.shape[1])):
    decay_next = a[:, t + 1, :, None] if t + 1 < x.shape[1] else 0.0
    adjoint = cotangent[:, t] + decay_next * adjoint
    grad_x[:, t] = adjoint
  grad_a = np.where(reset[..., None], 0.0, np.sum(grad_x * h_prev, axis=-1))
  return grad_a, grad_x


def _random_problem(seed, t, *, constant_decay):
  """Decays in [0, 1) with exact zeros and values near 1, exp-gated inputs up to e^10, documents."""
  rng = np.random.default_rng(seed)
  if constant_decay:
    a_arg = rng.uniform(0.5, 1.0 - 1e-6, size=H)
    a_arg[0] = 1.0 - 1e-6
    a_full = np.broadcast_to(a_arg, (B, t, H))
  else:
    a_arg = rng.uniform(0.0, 1.0, size=(B, t, H))
    kind = rng.integers(0, 4, size=(B, t, H))
    a_arg = np.where(kind == 0, 0.0, a_arg)
    a_arg = np.where(kind == 1, 1.0 - rng.uniform(0.0, 1e-5, size=(B, t, H)), a_arg)
    a_arg = np.where(kind == 2, rng.uniform(0.0, 1e-20, size=(B, t, H)), a_arg)
    a_full = a_arg
  gates = np.exp(rng.uniform(-10.0, 10.0, size=(B, t, H, 1)))
  x = gates * rng.normal(size=(B, t, H, D))
  segment_ids = np.cumsum(rng.uniform(size=(B, t)) < 0.08, axis=1)
  reset = np.asarray(segment_starts(jnp.asarray(segment_ids)))
  cotangent = rng.normal(size=(B, t, H, D))
  # Round to float32 first so the float64 oracle sees exactly the inputs the scan sees.
  f32 = lambda v: np.asarray(v, np.float32).astype(np.float64)
  return f32(a_arg), f32(a_full), f32(x), reset, f32(cotangent)


def _assert_close(actual, expected, scale, rtol):
  """|actual - expected| <= rtol * scale elementwise, scale the same sum over absolute terms."""
  actual = np.asarray(actual, np.float64)
  assert np.all(np.isfinite(actual))
  np.testing.assert_array_less(np.abs(actual - expected), rtol * scale + 1e-30)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _forward_and_grads(a, x, reset, cotangent, *, impl, chunk_size):
  def loss(a, x):
    h = linear_scan(a, x, reset=reset, impl=impl, chunk_size=chunk_size)
    return jnp.sum(h * cotangent), h

  (_, h), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(a, x)
  return h, grads


CASES = [
    pytest.param(37, 8, False, id="T37-C8-per_step"),
    pytest.param(37, 8, True, id="T37-C8-per_head"),
    pytest.param(100, 64, False, id="T100-default-per_step"),
    pytest.param(100, 64, True, id="T100-default-per_head"),
    pytest.param(5, 64, False, id="T5-C64-short"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t, chunk_size, constant_decay", CASES)
def test_matches_sequential_loop(impl, t, chunk_size, constant_decay):
  a_arg, a, x, reset, cotangent = _random_problem(t, t, constant_decay=constant_decay)
  h, (grad_a, grad_x) = _forward_and_grads(
      jnp.asarray(a_arg, jnp.float32),
      jnp.asarray(x, jnp.float32),
      jnp.asarray(reset),
      jnp.asarray(cotangent, jnp.float32),
      impl=impl,
      chunk_size=chunk_size,
  )
  assert h.dtype == jnp.float32

  _assert_close(h, _sequential(a, x, reset), _sequential(np.abs(a), np.abs(x), reset), 1e-5)

  want_a, want_x = _sequential_grads(a, x, reset, cotangent)
  # The same gradients over absolute values bound the rounding error of each entry.
  abs_x = np.abs(x)
  scale_a, scale_x = _sequential_grads(np.abs(a), abs_x, reset, np.abs(cotangent))
  if constant_decay:
    want_a, scale_a = want_a.sum(axis=(0, 1)), scale_a.sum(axis=(0, 1))
  _assert_close(grad_x, want_x, scale_x, 1e-5)
  _assert_close(grad_a, want_a, scale_a, 1e-5)


def test_adjoint_oracle_matches_finite_differences():
  """The float64 reverse recurrence used as the gradient oracle is itself right."""
  rng = np.random.default_rng(0)
  a = rng.uniform(0.0, 1.0, size=(1, 9, 2))
  a[0, 3, 1] = 0.0
  x = rng.normal(size=(1, 9, 2, 3))
  reset = np.zeros((1, 9), bool)
  reset[0, [0, 5]] = True
  cotangent = rng.normal(size=x.shape)
  loss = lambda a, x: np.sum(_sequential(a, x, reset) * cotangent)
  grad_a, grad_x = _sequential_grads(a, x, reset, cotangent)
  eps = 1e-6
  for index in np.ndindex(a.shape):
    step = np.zeros_like(a)
    step[index] = eps
    fd = (loss(a + step, x) - loss(a - step, x)) / (2 * eps)
    np.testing.assert_allclose(grad_a[index], fd, rtol=1e-6, atol=1e-8)
  for index in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[index] = eps
    fd = (loss(a, x + step) - loss(a, x - step)) / (2 * eps)
    np.testing.assert_allclose(grad_x[index], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("impl", IMPLS)
def test_resets_isolate_documents(impl):
  t = 37
  rng = np.random.default_rng(1)
  segment_ids = np.zeros((B, t), np.int32)
  segment_ids[:, 11:] = 1
  segment_ids[:, 25:] = 2
  reset = segment_starts(jnp.asarray(segment_ids))
  a = jnp.asarray(rng.uniform(0.9, 1.0, size=(B, t, H)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(B, t, H, D)), jnp.float32)
  middle = (segment_ids == 1)[..., None, None]
  x_changed = jnp.where(middle, 1e4 * x + 3.0, x)

  scan = functools.partial(_scan, reset=reset, impl=impl, chunk_size=8)
  h, h_changed = np.asarray(scan(a, x)), np.asarray(scan(a, x_changed))
  outside = np.broadcast_to(~middle, h.shape)
  np.testing.assert_array_equal(h[outside], h_changed[outside])
  assert np.all(h[~outside] != h_changed[~outside])

  # Nor does the loss of one document send gradient into another.
  grad_x = jax.jit(jax.grad(lambda x: jnp.sum(scan(a, x) * middle)))(x)
  np.testing.assert_array_equal(np.asarray(grad_x)[outside], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("split", [1, 11, 12])  # 11: a document starts at the split.
def test_a_scan_continues_from_its_initial_state(impl, split):
  """Scanning [0, split) and then [split, t) from its last state equals one scan (decoding), and
  so do the gradients through the initial state."""
  t = 37
  rng = np.random.default_rng(2)
  segment_ids = np.zeros((B, t), np.int32)
  segment_ids[:, 11:] = 1
  reset = segment_starts(jnp.asarray(segment_ids))
  a = jnp.asarray(rng.uniform(0.5, 1.0, size=(B, t, H)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(B, t, H, D)), jnp.float32)
  scan = jax.jit(functools.partial(linear_scan, impl=impl, chunk_size=8))
  whole = scan(a, x, reset=reset)
  first = scan(a[:, :split], x[:, :split], reset=reset[:, :split])
  rest = scan(a[:, split:], x[:, split:], reset=reset[:, split:], initial=first[:, -1])
  np.testing.assert_allclose(np.concatenate([first, rest], axis=1), whole, rtol=1e-6, atol=1e-6)

  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def split_loss(a, x):
    head = scan(a[:, :split], x[:, :split], reset=reset[:, :split])
    tail = scan(a[:, split:], x[:, split:], reset=reset[:, split:], initial=head[:, -1])
    return jnp.sum(jnp.concatenate([head, tail], axis=1) * weights)

  whole_loss = lambda a, x: jnp.sum(scan(a, x, reset=reset) * weights)
  grads = jax.jit(jax.grad(split_loss, argnums=(0, 1)))(a, x)
  expected = jax.jit(jax.grad(whole_loss, argnums=(0, 1)))(a, x)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_v1_leaky_average_equals_nanomosaics_formula(impl):
  """kbar_t = sum_{s <= t} lambda^(t - s) k~_s with lambda = exp(-|b| * 10) per head.

  b takes its initial values linspace(0.5, 5, H) / 10.
  """
  t, heads = 50, 4
  rng = np.random.default_rng(2)
  lam = np.exp(-np.abs(np.linspace(0.5, 5.0, heads) / 10) * 10).astype(np.float32)
  k = rng.normal(size=(B, t, heads, D)).astype(np.float32)

  # The nanoMosaics oracle: a T x T matrix coef[i, j] = lambda^(i - j) for i >= j, per head.
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  lag = np.where(i >= j, i - j, 0)
  coef = np.where(i >= j, lam.astype(np.float64)[:, None, None] ** lag, 0.0)
  kbar = np.einsum("hij,bjhd->bihd", coef, k.astype(np.float64))
  scale = np.einsum("hij,bjhd->bihd", coef, np.abs(k.astype(np.float64)))

  got = _scan(jnp.asarray(lam), jnp.asarray(k), impl=impl, chunk_size=16)
  _assert_close(got, kbar, scale, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_inputs_give_float32(impl):
  a = jnp.full((1, 10, 2), 0.5, jnp.bfloat16)
  x = jnp.ones((1, 10, 2, 3), jnp.bfloat16)
  h = _scan(a, x, impl=impl, chunk_size=4)
  assert h.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(h[0, :, 0, 0]), 2.0 - 0.5 ** np.arange(10), rtol=1e-6)


def test_a_reset_drops_an_overflowed_initial_state():
  """inf * 0 would be NaN: a document that starts at t = 0 does not see the state before."""
  x = jnp.ones((1, 3, 2, 2))
  reset = jnp.array([[True, False, False]])
  for impl in IMPLS:
    h = _scan(jnp.full((2,), 0.5), x, reset=reset, initial=jnp.full((1, 2, 2), jnp.inf), impl=impl)
    np.testing.assert_array_equal(h[0, :, 0, 0], [1.0, 1.5, 1.75])


def _log_space_oracle(log_a, log_g, x, reset, initial=None, initial_log_scale=0.0):
  """(hhat, m) of h_t = a_t h_{t-1} + g_t x_t in float64 from the closed form h_t = sum_s
  exp(L_ts) x_s, L_ts = log g_s + log a_{s+1} + ... + log a_t (s in t's document; the initial
  state a term of log-size initial_log_scale at s = -1): m_t = max(0, max_s L_ts), hhat_t = sum_s
  exp(L_ts - m_t) x_s."""
  log_a, log_g, x = (np.asarray(z, np.float64) for z in (log_a, log_g, x))
  batch, t, heads, dim = x.shape
  hhat, m = np.zeros(x.shape), np.zeros((batch, t, heads))
  for b in range(batch):
    for i in range(t):
      start = max([0] + [s for s in range(i + 1) if reset[b, s]])
      terms = [(log_g[b, s] + log_a[b, s + 1 : i + 1].sum(0), x[b, s]) for s in range(start, i + 1)]
      if initial is not None and not reset[b, : i + 1].any():
        terms.append((initial_log_scale[b] + log_a[b, : i + 1].sum(0), initial[b]))
      m[b, i] = np.maximum(0.0, np.max([size for size, _ in terms], axis=0))
      hhat[b, i] = sum(np.exp(size - m[b, i])[:, None] * z for size, z in terms)
  return hhat, m


def _huge_gate_problem(seed, t, dtype):
  """Log decays and gates on a grid of halves, so that float32 sums them exactly, with gates of
  +-9984 (+-1e4 in bfloat16) next to small ones and decays of -9984; documents; inputs in
  `dtype`."""
  rng = np.random.default_rng(seed)
  log_a = rng.choice([0.0, -0.5, -1.0, -3.0, -9984.0], size=(B, t, H), p=[0.3, 0.3, 0.2, 0.1, 0.1])
  log_g = rng.choice([9984.0, -9984.0, 256.0, 0.0], size=(B, t, H))
  log_g = np.where(rng.uniform(size=log_g.shape) < 0.5, rng.integers(-60, 60, log_g.shape), log_g)
  x = rng.normal(size=(B, t, H, D))
  reset = np.asarray(segment_starts(jnp.asarray(np.cumsum(rng.uniform(size=(B, t)) < 0.1, 1))))
  log_a, log_g, x = (jnp.asarray(z, dtype) for z in (log_a, log_g, x))
  return log_a, log_g, x, reset


def _assert_matches_oracle(hhat, m, oracle, tol):
  """hhat, m (float32) equal the oracle's: m up to rounding, and hhat exp(m - m_oracle) within tol
  of hhat_oracle, whose coefficients are all <= 1."""
  want_hhat, want_m = oracle
  assert np.isfinite(hhat).all() and np.isfinite(m).all()
  np.testing.assert_allclose(m, want_m, rtol=1e-6, atol=1e-6)
  rescaled = np.asarray(hhat, np.float64) * np.exp(np.asarray(m, np.float64) - want_m)[..., None]
  np.testing.assert_allclose(rescaled, want_hhat, rtol=0, atol=tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_scan_with_huge_gates_matches_log_space_closed_form(impl, dtype):
  """Gates of exp(+-1e4), past float32 either way: hhat is finite and right, and a scan continued
  from (hhat, m) at a split (decoding) equals the whole scan."""
  t = 23
  log_a, log_g, x, reset = _huge_gate_problem(0, t, dtype)
  scan = jax.jit(functools.partial(gated_linear_scan, impl=impl, chunk_size=8))
  hhat, m = scan(log_a, log_g, x, reset=jnp.asarray(reset))
  assert (np.asarray(m) > 9000).any()
  _assert_matches_oracle(hhat, m, _log_space_oracle(log_a, log_g, x, reset), 1e-5)

  split = 9
  head = scan(log_a[:, :split], log_g[:, :split], x[:, :split], reset=jnp.asarray(reset[:, :split]))
  tail = scan(
      log_a[:, split:],
      log_g[:, split:],
      x[:, split:],
      reset=jnp.asarray(reset[:, split:]),
      initial=head[0][:, -1],
      initial_log_scale=head[1][:, -1],
  )
  oracle = _log_space_oracle(
      log_a[:, split:],
      log_g[:, split:],
      x[:, split:],
      reset[:, split:],
      np.asarray(head[0][:, -1], np.float64),
      np.asarray(head[1][:, -1], np.float64),
  )
  _assert_matches_oracle(*tail, oracle, 1e-5)
  _assert_matches_oracle(
      tail[0], tail[1], (np.asarray(hhat[:, split:]), np.asarray(m[:, split:])), 1e-5
  )


@pytest.mark.parametrize("impl", IMPLS)
def test_gated_scan_is_the_plain_scan_where_no_term_exceeds_one(impl):
  """Gates <= 1 and decays <= 1: no scale (m = 0), and hhat is `linear_scan` bit for bit, values
  and gradients."""
  rng = np.random.default_rng(3)
  t = 29
  log_a = jnp.asarray(-rng.exponential(size=(B, t, H)), jnp.float32)
  log_g = jnp.asarray(rng.uniform(-20.0, 0.0, size=(B, t, H)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(B, t, H, D)), jnp.float32)
  reset = segment_starts(jnp.asarray(np.cumsum(rng.uniform(size=(B, t)) < 0.1, 1)))
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def gated(log_a, log_g, x):
    hhat, m = gated_linear_scan(log_a, log_g, x, reset=reset, impl=impl, chunk_size=8)
    return jnp.sum(hhat * weights), (hhat, m)

  def plain(log_a, log_g, x):
    h = linear_scan(
        jnp.exp(log_a), jnp.exp(log_g)[..., None] * x, reset=reset, impl=impl, chunk_size=8
    )
    return jnp.sum(h * weights), h

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
  (_, (hhat, m)), grads = grad(gated)(log_a, log_g, x)
  (_, h), want_grads = grad(plain)(log_a, log_g, x)
  np.testing.assert_array_equal(m, 0.0)
  np.testing.assert_array_equal(hhat, h)
  for got, want in zip(grads, want_grads):
    np.testing.assert_array_equal(got, want)


def test_gated_scan_bad_shapes():
  x = jnp.ones((2, 7, 3, 4))
  with pytest.raises(
      ValueError, match=r"log_g must be \[b, t, h\] = \(2, 7, 3\), got shape \(3,\)"
  ):
    gated_linear_scan(jnp.zeros((2, 7, 3)), jnp.zeros((3,)), x)
  with pytest.raises(ValueError, match=r"initial_log_scale is the scale of an initial state"):
    gated_linear_scan(
        jnp.zeros((2, 7, 3)), jnp.zeros((2, 7, 3)), x, initial_log_scale=x[:, 0, :, 0]
    )


def test_unknown_impl():
  with pytest.raises(ValueError, match=r"unknown impl 'fft'.*associative, chunked"):
    linear_scan(jnp.ones((3,)), jnp.ones((1, 4, 3, 2)), impl="fft")


def test_bad_shapes():
  with pytest.raises(ValueError, match=r"initial must be \[b, h, d\]"):
    linear_scan(jnp.ones((3,)), jnp.ones((1, 4, 3, 2)), initial=jnp.ones((1, 3)))
  x = jnp.ones((2, 7, 3, 4))
  with pytest.raises(ValueError, match=r"x must be \[b, t, h, d\], got shape \(2, 7, 3\)"):
    linear_scan(jnp.ones((3,)), jnp.ones((2, 7, 3)))
  with pytest.raises(ValueError, match=r"a must be .*\(2, 7, 3\).*got shape \(2, 7, 4\)"):
    linear_scan(jnp.ones((2, 7, 4)), x)
  with pytest.raises(ValueError, match=r"a must be .*got shape \(4,\)"):
    linear_scan(jnp.ones((4,)), x)
  with pytest.raises(ValueError, match=r"reset must be \[b, t\] = \(2, 7\), got shape \(2, 8\)"):
    linear_scan(jnp.ones((3,)), x, reset=jnp.zeros((2, 8), bool))
  with pytest.raises(ValueError, match=r"chunk_size must be a positive int, got 0"):
    linear_scan(jnp.ones((3,)), x, impl="chunked", chunk_size=0)
