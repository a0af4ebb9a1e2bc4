"""Retrieval from learned pairs: the v1 persistent memory (design.md, "v1 persistent memory").

    y[n, h] = sum_c softmax_p(k[n, h] . P_k[c, h, p]) P_v[c, h, p]

Each of the c memories of a head holds p learned (key, value) pairs and answers every position
through its own softmax; the caller divides by c for the mean. There is no band: every position
reads every pair. `retrieve_persistent_reference` is the dense definition and the oracle.

Axis legend: b = batch, t = time, h = heads, d = head dim, c = memories per head, p = pairs per
memory, n = positions (b * t), q = pairs of all memories of a head (c * p).
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from kernels_pallas import remat

# Positions per step of the chunked loops: a chunk's scores (h * 256 * c*p floats, 8 MB for v1 at
# nanoGPT's size) stay in a CPU's last-level cache between the two matmuls and the softmax.
# Forward+backward of that layer's memory: 296 ms against 499 ms unchunked (2 cores).
CHUNK = 256


def _check(k: Array, p_k: Array, p_v: Array) -> None:
  """Raises if the shapes or dtypes of the operands do not fit together."""
  if k.ndim != 4 or p_k.ndim != 4 or p_v.ndim != 4:
    raise ValueError(
        f"k must be [b, t, h, d] and P_k, P_v [c, h, p, d], got k {k.shape}, P_k {p_k.shape},"
        f" P_v {p_v.shape}"
    )
  if p_k.shape != p_v.shape:
    raise ValueError(f"P_k and P_v must have one shape, got {p_k.shape} and {p_v.shape}")
  if p_k.shape[1] != k.shape[2] or p_k.shape[3] != k.shape[3]:
    raise ValueError(
        f"P_k [c, h, p, d] = {p_k.shape} does not fit the heads and head dim of k {k.shape}"
    )
  for name, x in (("k", k), ("P_k", p_k), ("P_v", p_v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


# Validates its own inputs with errors that name the problem (tested); the test suite's jaxtyping
# hook would answer first with its own.
@typing.no_type_check
def retrieve_persistent_reference(
    k: Float[Array, "b t h d"], p_k: Float[Array, "c h p d"], p_v: Float[Array, "c h p d"]
) -> Float[Array, "b t h d"]:
  """sum_c softmax_p(k . P_k[c]) P_v[c], densely and in float32 at least: the oracle."""
  _check(k, p_k, p_v)
  dtype = jnp.promote_types(k.dtype, jnp.float32)
  highest = jax.lax.Precision.HIGHEST
  scores = jnp.einsum("bthd,chpd->bthcp", k.astype(dtype), p_k.astype(dtype), precision=highest)
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bthcp,chpd->bthd", weights, p_v.astype(dtype), precision=highest)


# Validates its own inputs with errors that name the problem (tested); the test suite's jaxtyping
# hook would answer first with its own.
@typing.no_type_check
def retrieve_persistent(
    k: Float[Array, "b t h d"], p_k: Float[Array, "c h p d"], p_v: Float[Array, "c h p d"]
) -> Float[Array, "b t h d"]:
  """sum_c softmax_p(k . P_k[c]) P_v[c] per head, float32, CHUNK positions at a time.

  The scores, the largest tensor of a v1 model (b * t * h * c * p floats), are laid out [h, n, q]:
  heads lead and the c memories are folded into the pair axis, so that every product of the
  forward and backward passes is a plain batched matmul. Written as one einsum over [b, t, h, c, p]
  (the natural order), XLA on CPU transposes the scores between the matmuls and the softmax.
  Folding c into the pair axis is exact: the second product sums over c and p, as the sum over
  memories needs.
  """
  _check(k, p_k, p_v)
  b, t, h, d = k.shape
  c = p_k.shape[0]
  k = k.transpose(2, 0, 1, 3).reshape(h, b * t, d)
  p_k, p_v = (x.transpose(1, 0, 2, 3).reshape(h, -1, d) for x in (p_k, p_v))
  y = _chunked(c, k, p_k, p_v)
  return y.reshape(h, b, t, d).transpose(1, 2, 0, 3)


def _group_weights(
    k: Float[Array, "h n d"], p_k: Float[Array, "h q d"], groups: int
) -> Float[Array, "h n q"]:
  """float32 softmax of k . p_k over each of the `groups` equal runs of q (one memory's pairs)."""
  scores = jnp.einsum("hnd,hqd->hnq", k, p_k, preferred_element_type=jnp.float32)
  h, n, q = scores.shape
  weights = jax.nn.softmax(scores.reshape(h, n, groups, q // groups), axis=-1)
  return weights.reshape(h, n, q)


def _to_chunks(x: Float[Array, "h n d"]) -> Float[Array, "k h i d"]:
  """[h, n, d] as k chunks of i = min(CHUNK, n) rows (zero-padded), the chunk axis first."""
  h, n, d = x.shape
  chunk = min(CHUNK, n)
  pad = -n % chunk
  x = jnp.pad(x, [(0, 0), (0, pad), (0, 0)])
  return x.reshape(h, -1, chunk, d).transpose(1, 0, 2, 3)


def _from_chunks(x: Float[Array, "k h i d"], n: int) -> Float[Array, "h n d"]:
  """Inverse of `_to_chunks`, cropping the padding."""
  _, h, _, d = x.shape
  return x.transpose(1, 0, 2, 3).reshape(h, -1, d)[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(
    groups: int, k: Float[Array, "h n d"], p_k: Float[Array, "h q d"], p_v: Float[Array, "h q d"]
) -> Float[Array, "h n d"]:
  """sum over groups of softmax(k . p_k) p_v (q = groups * pairs), CHUNK positions at a time.

  Done at once, the [h, n, q] scores and weights are far larger than any cache, and the softmax's
  passes over them are bound by memory bandwidth: half the time of a v1 training step. Chunked,
  each chunk's tensors stay in cache. The backward recomputes each chunk's weights (one more
  matmul) instead of storing them, so no [h, n, q] tensor is ever kept; it computes softmax's
  ds = w * (dw - sum_p w dw) and three matmuls, summing the P_k and P_v gradients over chunks.
  Padded rows have k = 0 and a zero cotangent: they add nothing to any gradient.
  """
  return _chunked_fwd(groups, k, p_k, p_v)[0]


def _chunked_fwd(groups, k, p_k, p_v):
  def chunk_output(k_chunk):
    weights = _group_weights(k_chunk, p_k, groups)
    return jnp.einsum(
        "hnq,hqd->hnd", weights.astype(p_v.dtype), p_v, preferred_element_type=jnp.float32
    )

  y = remat.named(_from_chunks(jax.lax.map(chunk_output, _to_chunks(k)), k.shape[1]))
  return y, (k, p_k, p_v)


def _chunked_bwd(groups, residuals, dy):
  k, p_k, p_v = residuals
  f32 = jnp.float32
  p_k32, p_v32 = p_k.astype(f32), p_v.astype(f32)

  def chunk_grads(carry, chunk):
    dp_k, dp_v = carry
    k_chunk, dy_chunk = chunk
    w = _group_weights(k_chunk, p_k, groups)
    h, n, q = w.shape
    dw = jnp.einsum("hnd,hqd->hnq", dy_chunk, p_v32, preferred_element_type=f32)
    w4, dw4 = w.reshape(h, n, groups, -1), dw.reshape(h, n, groups, -1)
    ds = (w4 * (dw4 - jnp.sum(w4 * dw4, axis=-1, keepdims=True))).reshape(h, n, q)
    dk = jnp.einsum("hnq,hqd->hnd", ds, p_k32, preferred_element_type=f32)
    dp_k = dp_k + jnp.einsum("hnq,hnd->hqd", ds, k_chunk.astype(f32), preferred_element_type=f32)
    dp_v = dp_v + jnp.einsum("hnq,hnd->hqd", w, dy_chunk, preferred_element_type=f32)
    return (dp_k, dp_v), dk

  init = (jnp.zeros(p_k.shape, f32), jnp.zeros(p_v.shape, f32))
  (dp_k, dp_v), dk = jax.lax.scan(chunk_grads, init, (_to_chunks(k), _to_chunks(dy.astype(f32))))
  dk = _from_chunks(dk, k.shape[1])
  return dk.astype(k.dtype), dp_k.astype(p_k.dtype), dp_v.astype(p_v.dtype)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
