"""Associative memories: each reads its pairs through `kernels_pallas.retrieve` (design.md).

| memory                    | band (lo, hi)     | query                     |
|---------------------------|-------------------|---------------------------|
| v1 contextual memory      | (1, None)         | the scaled key itself     |
| v2 short-term memory      | (1, h - 1)        | beta_t * k_t (Eq. 6)      |
| v2 long-term memory       | (m, None)         | beta_t * k_t (Eq. 6)      |

v2's long-term memory may read only a few blocks of its pairs per query (`selection`, from
`MosaicV2Family.long_term_selection`; design.md, "Block selection").

Each family's `bands` (`mm1.py`, `mm2.py`) is where these bands are set; a memory takes its `hi`
as an attribute and its `lo`, which may be traced, as an argument. Given a decode cache and the
chunk's place (`cache.Chunk`), a memory returns its output and its cache after the chunk
(`cache.step`). The v1 persistent memory
retrieves from learned pairs (P_k, P_v) instead of the context
(`kernels_pallas.retrieve_persistent`).

Axis legend: b = batch, t = time, m = model width, h = heads, d = head dim, p = persistent pairs.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

import kernels_pallas
from mosaics_jax import config as config_lib
from mosaics_jax.model import bandwidth, cache as cache_lib, family as family_lib, features, layers


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


def _resets(segment_ids: Int[Array, "b t"] | None) -> Bool[Array, "b t"] | None:
  return None if segment_ids is None else kernels_pallas.segment_starts(segment_ids)


def _per_head(x: Float[Array, "b t h d"]) -> Float[Array, "b t h d"]:
  # Heads are independent memories: sharded over heads, retrieval needs no communication.
  return layers.constrain(x, "batch", "length", "heads", "kv")


class ContextMemory(layers.PlainInit):
  """v1 contextual memory: softmax(k_t . k_s) over its band and c_proj (nanoMosaics' ContextMem)."""

  config: config_lib.MosaicV1Config
  hi: int | None

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "b t m"],
      segment_ids: Int[Array, "b t"] | None,
      lo: int | jax.Array,
      *,
      cache: cache_lib.MemoryCache | None = None,
      chunk: cache_lib.Chunk | None = None,
  ):
    """y [b, t, m]; with a cache, (y, the cache after the chunk)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    decoding = cache is not None
    reset = chunk.starts if decoding else _resets(segment_ids)
    segment_ids = chunk.segment_ids if decoding else segment_ids
    k, kbar = _v1_key_extractor(cfg, dtype)(
        x, reset, scale_pow=1, initial=cache.key_state if decoding else None
    )
    raw, mix = features.ValueFeatureExtractorV1(
        num_heads=cfg.num_heads,
        bias=cfg.bias,
        init_std=cfg.init_std,
        exp_scaling=cfg.exp_scaling,
        val_scale_init=cfg.val_scale_init,
        eps=cfg.feature_eps,
        dtype=dtype,
        name="v_featurizer",
    )(x)
    v = mix(raw, features.next_in_document(raw, segment_ids))
    # The key scale is the bandwidth: the query is the key itself.
    k, v = (_per_head(z.astype(dtype)) for z in (k, v))
    retrieve = functools.partial(layers.retrieve, impl=cfg.retrieve_impl)
    if decoding:
      band = family_lib.Band(lo, self.hi)
      y, cache = cache_lib.step(k, k, v, cache, chunk, band, retrieve, raw=raw, mix=mix, kbar=kbar)
    else:
      y = retrieve(k, k, v, lo=lo, hi=self.hi, segment_ids=segment_ids)
    y = _c_proj(cfg, dtype)(layers.merge_heads(y))
    return (y, cache) if decoding else y


class PersistentMemoryV1(layers.PlainInit):
  """v1 persistent memory: mean_i softmax(k P_k[i]^T) P_v[i] * exp(exp_scaling s_o), then c_proj."""

  config: config_lib.MosaicV1Config

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "b t m"],
      segment_ids: Int[Array, "b t"] | None,
      *,
      cache: cache_lib.MemoryCache | None = None,
      chunk: cache_lib.Chunk | None = None,
  ):
    """y [b, t, m]; with a cache (its key state), (y, the cache after the chunk)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    decoding = cache is not None
    reset = chunk.starts if decoding else _resets(segment_ids)
    # p = 2: the stored keys P_k carry no scale, so the query carries it twice.
    k, kbar = _v1_key_extractor(cfg, dtype)(
        x, reset, scale_pow=2, initial=cache.key_state if decoding else None
    )
    k = _per_head(k.astype(dtype))
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
    y = kernels_pallas.retrieve_persistent(k, p_k, p_v)
    y = y / cfg.pmem_count * jnp.exp(cfg.exp_scaling * out_scale)[:, None]
    y = _c_proj(cfg, dtype)(layers.merge_heads(y.astype(dtype)))
    if not decoding:
      return y
    return y, cache_lib.MemoryCache(key_state=cache_lib.last(kbar, chunk.lengths, cache.key_state))


class AssociativeMemory(layers.PlainInit):
  """A v2 associative memory over one band: gated keys, convolutional values, adaptive bandwidth.

  `hi` is static (the short-term window); `lo` may be traced (the long-term delay m).
  """

  config: config_lib.MosaicV2Config
  layer_index: int
  hi: int | None
  selection: kernels_pallas.BlockSelection | None = None  # None: every pair of the band.

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "b t m"],
      segment_ids: Int[Array, "b t"] | None,
      lo: int | jax.Array,
      *,
      cache: cache_lib.MemoryCache | None = None,
      chunk: cache_lib.Chunk | None = None,
  ):
    """y [b, t, h, d]; with a cache, (y, the cache after the chunk)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    decoding = cache is not None
    reset = chunk.starts if decoding else _resets(segment_ids)
    k, kbar, kbar_log_scale = features.GatedKeyExtractor(
        num_heads=cfg.num_heads,
        layer_index=self.layer_index,
        gate_bias=cfg.gate_bias,
        eps=cfg.feature_eps,
        scan_impl=cfg.scan_impl,
        scan_chunk_size=cfg.scan_chunk_size,
        dtype=dtype,
        name="key",
    )(
        x,
        reset,
        initial=cache.key_state if decoding else None,
        initial_log_scale=cache.key_log_scale if decoding else None,
    )
    raw, mix = features.ConvValueExtractor(
        num_heads=cfg.num_heads,
        layer_index=self.layer_index,
        eps=cfg.feature_eps,
        scale_init=cfg.value_scale_init,
        scale_max=cfg.value_scale_max,
        dtype=dtype,
        name="value",
    )(x)
    band = family_lib.Band(lo, self.hi, self.selection)
    if decoding:
      segment_ids = chunk.segment_ids
      counts = cache_lib.counts(chunk, band)
    else:
      counts = kernels_pallas.visible_counts(segment_ids, x.shape[1], lo, self.hi)
    v = mix(raw, features.next_in_document(raw, segment_ids))
    beta = bandwidth.AdaptiveBandwidth(
        num_heads=cfg.num_heads,
        initial=cfg.bandwidth_init,
        max_log=cfg.bandwidth_max,
        name="bandwidth",
    )(counts)
    q, k, v = (_per_head(z.astype(dtype)) for z in (beta[..., None] * k, k, v))
    retrieve = functools.partial(layers.retrieve, impl=cfg.retrieve_impl, selection=self.selection)
    if decoding:
      return cache_lib.step(
          q,
          k,
          v,
          cache,
          chunk,
          band,
          retrieve,
          raw=raw,
          mix=mix,
          kbar=kbar,
          kbar_log_scale=kbar_log_scale,
      )
    return retrieve(q, k, v, lo=lo, hi=self.hi, segment_ids=segment_ids)
