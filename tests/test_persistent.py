"""`kernels_pallas.retrieve_persistent` (the v1 persistent memory's chunked retrieval with its own
backward) against the dense reference, and the reference against a float64 loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import persistent, retrieve_persistent, retrieve_persistent_reference


def _operands(batch, length, heads, pmem_count, pairs, dim, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  k = jnp.asarray(rng.normal(size=(batch, length, heads, dim)), dtype)
  p_k, p_v = (
      jnp.asarray(rng.normal(size=(pmem_count, heads, pairs, dim)), dtype) for _ in range(2)
  )
  cotangent = jnp.asarray(rng.normal(size=k.shape), jnp.float32)
  return k, p_k, p_v, cotangent


def test_reference_is_the_definition():
  """sum_c softmax_p(k . P_k[c]) P_v[c], one (b, t, h) at a time in float64."""
  k, p_k, p_v, _ = _operands(2, 5, 3, 2, 4, 3)
  k64, p_k64, p_v64 = (np.asarray(x, np.float64) for x in (k, p_k, p_v))
  expected = np.zeros(k.shape)
  for b, t, h in np.ndindex(*k.shape[:3]):
    for c in range(p_k.shape[0]):
      scores = p_k64[c, h] @ k64[b, t, h]
      weights = np.exp(scores - scores.max())
      expected[b, t, h] += weights / weights.sum() @ p_v64[c, h]
  np.testing.assert_allclose(
      retrieve_persistent_reference(k, p_k, p_v), expected, rtol=1e-5, atol=1e-6
  )


# b * t = 300 is not a multiple of the chunk; 5 positions are less than one chunk.
@pytest.mark.parametrize("batch, length, pmem_count", [(2, 150, 2), (1, 5, 1)])
def test_forward_and_gradients_match_the_reference(batch, length, pmem_count):
  k, p_k, p_v, cotangent = _operands(batch, length, 3, pmem_count, 7, 4)

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums=(0, 1, 2)))

  (value, grads), (expected_value, expected_grads) = (
      loss(fn)(k, p_k, p_v) for fn in (retrieve_persistent, retrieve_persistent_reference)
  )
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for g, e in zip(grads, expected_grads):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_several_chunks_with_a_smaller_chunk(monkeypatch):
  """Many chunks and a padded last one: 3 * 11 = 33 positions in chunks of 8."""
  monkeypatch.setattr(persistent, "CHUNK", 8)
  k, p_k, p_v, cotangent = _operands(3, 11, 2, 2, 5, 4, seed=1)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * cotangent)
  grads = jax.grad(loss(retrieve_persistent), argnums=(0, 1, 2))(k, p_k, p_v)
  expected = jax.grad(loss(retrieve_persistent_reference), argnums=(0, 1, 2))(k, p_k, p_v)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_bfloat16_operands_give_float32_close_to_the_reference():
  k, p_k, p_v, _ = _operands(1, 20, 2, 1, 6, 8, dtype=jnp.bfloat16)
  y = retrieve_persistent(k, p_k, p_v)
  assert y.dtype == jnp.float32
  expected = retrieve_persistent_reference(k, p_k, p_v)
  np.testing.assert_allclose(y, expected, atol=2e-2)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 4, 2, 3), (1, 2, 5, 3), (1, 2, 6, 3)), "one shape"),
        (((1, 4, 2, 3), (1, 3, 5, 3), (1, 3, 5, 3)), "does not fit"),
        (((4, 2, 3), (1, 2, 5, 3), (1, 2, 5, 3)), r"\[b, t, h, d\]"),
    ],
)
def test_shapes_that_do_not_fit_are_named(shapes, message):
  k, p_k, p_v = (jnp.zeros(s) for s in shapes)
  for fn in (retrieve_persistent, retrieve_persistent_reference):
    with pytest.raises(ValueError, match=message):
      fn(k, p_k, p_v)
