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
      dtype=dtype,
      name="k_featurizer",
  )


def _c_proj(cfg: config_lib.MosaicV1Config, dtype) -> nn.Dense:
  # nanoMosaics' GPT-2 style scaled init of the residual projections.
  std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
  return nn.Dense(
      cfg.width,
      use_bias=cfg.bias,
      kernel_init=nn.initializers.normal(std),
      dtype=dtype,
      name="c_proj",
  )


class ContextMemory(nn.Module):
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
    k, v = k.astype(dtype), v.astype(dtype)
    y = kernels_pallas.retrieve(
        k, k, v, lo=1, hi=None, segment_ids=segment_ids, impl=cfg.retrieve_impl
    )
    return _c_proj(cfg, dtype)(layers.merge_heads(y))


class PersistentMemoryV1(nn.Module):
  """v1 persistent memory: mean_i softmax(k P_k[i]^T) P_v[i] * exp(exp_scaling * s_o), then c_proj."""

  config: config_lib.MosaicV1Config

  @nn.compact
  def __call__(
      self, x: Float[Array, "b t m"], segment_ids: Int[Array, "b t"] | None
  ) -> Float[Array, "b t m"]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    # p = 2: the stored keys P_k carry no scale, so the query carries it twice.
    k = _v1_key_extractor(cfg, dtype)(x, segment_ids, scale_pow=2).astype(dtype)
    shape = (cfg.pmem_count, cfg.num_heads, cfg.pmem_size, cfg.head_dim)
    init = nn.initializers.normal(1.0 / math.sqrt(cfg.head_dim))
    p_k = self.param("P_k", init, shape).astype(dtype)
    p_v = self.param("P_v", init, shape).astype(dtype)
    out_scale = self.param(
        "out_scale", nn.initializers.constant(cfg.out_scale_init), (cfg.num_heads,)
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
  y = _folded_retrieve(c, k, p_k, p_v)
  return y.reshape(h, b, t, d).transpose(1, 2, 0, 3)


def _group_softmax(scores: Float[Array, "h n q"], groups: int) -> Float[Array, "h n q"]:
  """Softmax over each of the `groups` contiguous runs of pairs (one memory each) of the last axis."""
  h, n, q = scores.shape
  return jax.nn.softmax(scores.reshape(h, n, groups, q // groups), axis=-1).reshape(h, n, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _folded_retrieve(
    groups: int, k: Float[Array, "h n d"], p_k: Float[Array, "h q d"], p_v: Float[Array, "h q d"]
) -> Float[Array, "h n d"]:
  """sum over groups of softmax(k . p_k) p_v, q = groups * pairs; the backward is written out.

  Autodiff's backward keeps the unnormalised exponentials and the weights, and XLA on CPU fuses
  its first matmul with the softmax correction into one slow kernel: this backward saves only the
  weights and computes the same gradient (softmax's ds = w * (dw - sum_p w dw)) in plain matmuls,
  13% of a v1 training step at nanoGPT's size.
  """
  return _folded_retrieve_fwd(groups, k, p_k, p_v)[0]


def _folded_retrieve_fwd(groups, k, p_k, p_v):
  scores = jnp.einsum("hnd,hqd->hnq", k, p_k, preferred_element_type=jnp.float32)
  weights = _group_softmax(scores, groups)  # float32, kept for the backward pass.
  y = jnp.einsum(
      "hnq,hqd->hnd", weights.astype(p_v.dtype), p_v, preferred_element_type=jnp.float32
  )
  return y, (k, p_k, p_v, weights)


def _folded_retrieve_bwd(groups, residuals, dy):
  k, p_k, p_v, weights = residuals
  h, n, q = weights.shape
  f32 = jnp.float32
  dw = jnp.einsum("hnd,hqd->hnq", dy, p_v.astype(f32), preferred_element_type=f32)
  w, dw = weights.reshape(h, n, groups, -1), dw.reshape(h, n, groups, -1)
  ds = (w * (dw - jnp.sum(w * dw, axis=-1, keepdims=True))).reshape(h, n, q)
  dk = jnp.einsum("hnq,hqd->hnd", ds, p_k.astype(f32), preferred_element_type=f32)
  dp_k = jnp.einsum("hnq,hnd->hqd", ds, k.astype(f32), preferred_element_type=f32)
  dp_v = jnp.einsum("hnq,hnd->hqd", weights, dy, preferred_element_type=f32)
  return dk.astype(k.dtype), dp_k.astype(p_k.dtype), dp_v.astype(p_v.dtype)


_folded_retrieve.defvjp(_folded_retrieve_fwd, _folded_retrieve_bwd)


class AssociativeMemory(nn.Module):
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
    return kernels_pallas.retrieve(
        q.astype(dtype),
        k.astype(dtype),
        v.astype(dtype),
        lo=lo,
        hi=self.hi,
        segment_ids=segment_ids,
        impl=cfg.retrieve_impl,
    )
