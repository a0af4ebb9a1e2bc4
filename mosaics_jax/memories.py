"""Associative memories: every one reads its pairs through `kernels_pallas.retrieve` (SPEC §1).

| memory                    | band (lo, hi)     | query                     |
|---------------------------|-------------------|---------------------------|
| v1 contextual memory      | (1, None)         | the scaled key itself     |
| v2 short-term memory      | (1, h - 1)        | beta_t * k_t (Eq. 6)      |
| v2 long-term memory       | (m, None)         | beta_t * k_t (Eq. 6)      |

The v1 persistent memory retrieves from learned pairs (P_k, P_v) instead of the context.

Axis legend: b = batch, t = time, m = model width, h = heads, d = head dim, p = persistent pairs.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

import kernels_pallas
from mosaics_jax import bandwidth, config as config_lib, features, layers


def _v1_key_extractor(cfg: config_lib.MosaicV1Config, dtype) -> features.KeyFeatureExtractorV1:
  return features.KeyFeatureExtractorV1(
      num_heads=cfg.num_heads,
      bias=cfg.bias,
      init_std=cfg.init_std,
      exp_scaling=cfg.exp_scaling,
      key_scale_init=cfg.key_scale_init,
      key_scale_max=cfg.key_scale_max,
      leaky_init=cfg.leaky_init,
      eps=cfg.feature_eps,
      scan_impl=cfg.scan_impl,
      scan_chunk_size=cfg.scan_chunk_size,
      dtype=dtype,
      name="k_featurizer",
  )


def _c_proj(cfg: config_lib.MosaicV1Config, dtype) -> nn.Dense:
  # nanoMosaics' GPT-2 style scaled init of the residual projections.
  std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
  return nn.Dense(
      cfg.width,
      use_bias=cfg.bias,
      kernel_init=layers.logical(nn.initializers.normal(std), "heads", "embed"),
      bias_init=layers.logical(nn.initializers.zeros_init(), "embed"),
      dtype=dtype,
      name="c_proj",
  )


def _per_head(x: Float[Array, "b t h d"]) -> Float[Array, "b t h d"]:
  # Heads are independent memories: sharded over heads, retrieval needs no communication.
  return layers.constrain(x, "batch", "length", "heads", "kv")


class ContextMemory(layers.PlainInit):
  """v1 contextual memory: softmax(k_t . k_s) over s <= t - 1, then c_proj (nanoMosaics ContextMem)."""

  config: config_lib.MosaicV1Config

  @nn.compact
  def __call__(
      self, x: Float[Array, "b t m"], segment_ids: Int[Array, "b t"] | None
  ) -> Float[Array, "b t m"]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    k = _v1_key_extractor(cfg, dtype)(x, segment_ids, scale_pow=1)
    v = features.ValueFeatureExtractorV1(
        num_heads=cfg.num_heads,
        bias=cfg.bias,
        init_std=cfg.init_std,
        exp_scaling=cfg.exp_scaling,
        val_scale_init=cfg.val_scale_init,
        eps=cfg.feature_eps,
        dtype=dtype,
        name="v_featurizer",
    )(x, segment_ids)
    # The key scale is the bandwidth: the query is the key itself.
    k, v = (_per_head(z.astype(dtype)) for z in (k, v))
    y = layers.retrieve(
        k, k, v, lo=1, hi=None, segment_ids=segment_ids, impl=cfg.retrieve_impl
    )
    return _c_proj(cfg, dtype)(layers.merge_heads(y))


class PersistentMemoryV1(layers.PlainInit):
  """v1 persistent memory: mean_i softmax(k P_k[i]^T) P_v[i] * exp(exp_scaling * s_o), then c_proj."""

  config: config_lib.MosaicV1Config

  @nn.compact
  def __call__(
      self, x: Float[Array, "b t m"], segment_ids: Int[Array, "b t"] | None
  ) -> Float[Array, "b t m"]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    # p = 2: the stored keys P_k carry no scale, so the query carries it twice.
    k = _per_head(_v1_key_extractor(cfg, dtype)(x, segment_ids, scale_pow=2).astype(dtype))
    shape = (cfg.pmem_count, cfg.num_heads, cfg.pmem_size, cfg.head_dim)
    init = layers.logical(
        nn.initializers.normal(1.0 / math.sqrt(cfg.head_dim)), "pmem", "heads", "pairs", "kv"
    )
    p_k = self.param("P_k", init, shape).astype(dtype)
    p_v = self.param("P_v", init, shape).astype(dtype)
    out_scale = self.param(
        "out_scale",
        layers.logical(nn.initializers.constant(cfg.out_scale_init), "heads"),
        (cfg.num_heads,),
    )
    y = _persistent_retrieve(k, p_k, p_v)
    y = y / cfg.pmem_count * jnp.exp(cfg.exp_scaling * out_scale)[:, None]
    return _c_proj(cfg, dtype)(layers.merge_heads(y.astype(dtype)))


def _persistent_retrieve(
    k: Float[Array, "b t h d"], p_k: Float[Array, "c h p d"], p_v: Float[Array, "c h p d"]
) -> Float[Array, "b t h d"]:
  """sum_c softmax_p(k . P_k[c]) P_v[c] per head, in float32 (the caller divides by c).

  The scores, the largest tensor of the model (b * t * h * c * p floats), are laid out [h, b*t,
  c*p]: heads lead and the c memories are folded into the pair axis, so that every product of the
  forward and backward passes is a plain batched matmul over them. Written as one einsum over
  [c, b, t, h, p] (the natural order), XLA on CPU transposes the scores between the matmuls and
  the softmax, forward and backward. Folding c into the pair axis is exact: the second product
  sums over c and p, as the mean over memories needs.
  """
  b, t, h, d = k.shape
  c = p_k.shape[0]
  k = k.transpose(2, 0, 1, 3).reshape(h, b * t, d)
  p_k, p_v = (x.transpose(1, 0, 2, 3).reshape(h, -1, d) for x in (p_k, p_v))
  y = _chunked_retrieve(c, k, p_k, p_v)
  return y.reshape(h, b, t, d).transpose(1, 2, 0, 3)


# Tokens per step of `_chunked_retrieve`'s loops: a chunk's scores (h * 256 * c*p floats, 8 MB
# for v1 at nanoGPT's size) stay in a CPU's last-level cache between the two matmuls and the
# softmax. Forward+backward of that layer's memory: 296 ms against 499 ms unchunked (2 cores).
PERSISTENT_CHUNK = 256


def _group_weights(
    k: Float[Array, "h n d"], p_k: Float[Array, "h q d"], groups: int
) -> Float[Array, "h n q"]:
  """float32 softmax of k . p_k over each of the `groups` equal runs of q (one memory's pairs)."""
  scores = jnp.einsum("hnd,hqd->hnq", k, p_k, preferred_element_type=jnp.float32)
  h, n, q = scores.shape
  weights = jax.nn.softmax(scores.reshape(h, n, groups, q // groups), axis=-1)
  return weights.reshape(h, n, q)


def _to_chunks(x: Float[Array, "h n d"]) -> Float[Array, "k h c d"]:
  """[h, n, d] as chunks of PERSISTENT_CHUNK rows (zero-padded), the chunk axis first."""
  h, n, d = x.shape
  chunk = min(PERSISTENT_CHUNK, n)
  pad = -n % chunk
  x = jnp.pad(x, [(0, 0), (0, pad), (0, 0)])
  return x.reshape(h, -1, chunk, d).transpose(1, 0, 2, 3)


def _from_chunks(x: Float[Array, "k h c d"], n: int) -> Float[Array, "h n d"]:
  """Inverse of `_to_chunks`, cropping the padding."""
  _, h, _, d = x.shape
  return x.transpose(1, 0, 2, 3).reshape(h, -1, d)[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_retrieve(
    groups: int, k: Float[Array, "h n d"], p_k: Float[Array, "h q d"], p_v: Float[Array, "h q d"]
) -> Float[Array, "h n d"]:
  """sum over groups of softmax(k . p_k) p_v (q = groups * pairs), PERSISTENT_CHUNK tokens at a time.

  Done at once, the [h, n, q] scores and weights are far larger than any cache, and the softmax's
  passes over them are bound by memory bandwidth: half the time of a v1 training step. Chunked,
  each chunk's tensors stay in cache. The backward recomputes each chunk's weights (one more
  matmul) instead of storing them, so no [h, n, q] tensor is ever kept; it computes softmax's
  ds = w * (dw - sum_p w dw) and three matmuls, summing the P_k and P_v gradients over chunks.
  Padded rows have k = 0 and a zero cotangent: they add nothing to any gradient.
  """
  return _chunked_retrieve_fwd(groups, k, p_k, p_v)[0]


def _chunked_retrieve_fwd(groups, k, p_k, p_v):
  def chunk_output(k_chunk):
    weights = _group_weights(k_chunk, p_k, groups)
    return jnp.einsum(
        "hnq,hqd->hnd", weights.astype(p_v.dtype), p_v, preferred_element_type=jnp.float32
    )

  y = _from_chunks(jax.lax.map(chunk_output, _to_chunks(k)), k.shape[1])
  return y, (k, p_k, p_v)


def _chunked_retrieve_bwd(groups, residuals, dy):
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


_chunked_retrieve.defvjp(_chunked_retrieve_fwd, _chunked_retrieve_bwd)


class AssociativeMemory(layers.PlainInit):
  """A v2 associative memory over one band: gated keys, convolutional values, adaptive bandwidth.

  `hi` is static (the short-term window); `lo` may be traced (the long-term delay m).
  """

  config: config_lib.MosaicV2Config
  layer_index: int
  hi: int | None

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "b t m"],
      segment_ids: Int[Array, "b t"] | None,
      lo: int | jax.Array,
  ) -> Float[Array, "b t h d"]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    k = features.GatedKeyExtractor(
        num_heads=cfg.num_heads,
        layer_index=self.layer_index,
        gate_bias=cfg.gate_bias,
        eps=cfg.feature_eps,
        scan_impl=cfg.scan_impl,
        scan_chunk_size=cfg.scan_chunk_size,
        dtype=dtype,
        name="key",
    )(x, segment_ids)
    v = features.ConvValueExtractor(
        num_heads=cfg.num_heads,
        layer_index=self.layer_index,
        eps=cfg.feature_eps,
        scale_init=cfg.value_scale_init,
        scale_max=cfg.value_scale_max,
        dtype=dtype,
        name="value",
    )(x, segment_ids)
    counts = kernels_pallas.visible_counts(segment_ids, x.shape[1], lo, self.hi)
    beta = bandwidth.AdaptiveBandwidth(
        num_heads=cfg.num_heads,
        initial=cfg.bandwidth_init,
        max_log=cfg.bandwidth_max,
        name="bandwidth",
    )(counts)
    q = beta[..., None] * k
    return layers.retrieve(
        _per_head(q.astype(dtype)),
        _per_head(k.astype(dtype)),
        _per_head(v.astype(dtype)),
        lo=lo,
        hi=self.hi,
        segment_ids=segment_ids,
        impl=cfg.retrieve_impl,
    )
