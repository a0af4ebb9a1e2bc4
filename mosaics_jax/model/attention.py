"""Multi-head causal self-attention with RoPE: the Llama baseline's token mixer (no GQA).

Axis legend: b = batch, t = query time, s = key time, m = model width, h = heads, d = head dim.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

import kernels_pallas
from mosaics_jax import config as config_lib
from mosaics_jax.model import cache as cache_lib, family as family_lib, layers


class Attention(layers.PlainInit):
  """softmax(q k^T / sqrt(d)) v over the band inside the document, q and k rotated by RoPE.

  It is the retrieval op with the causal band [0, inf) (`llama.LlamaFamily.bands`): the same
  blocked XLA path and kernels as the memories, in O(T) memory, and the library attention through
  `retrieve_impl="shift"`.
  """

  config: config_lib.LlamaConfig
  layer_index: int
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
    """y [b, t, m]; with a cache (keys already rotated, values), (y, the cache after the chunk)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    init = layers.truncated_normal(layers.depth_scaled_std(cfg.width, self.layer_index))
    dense = lambda name, *axes: nn.Dense(
        cfg.width, use_bias=False, kernel_init=layers.logical(init, *axes), dtype=dtype, name=name
    )
    q, k, v = (
        layers.split_heads(dense(n, "embed", "heads")(x), cfg.num_heads) for n in ("wq", "wk", "wv")
    )
    if cache is None:
      positions = kernels_pallas.document_positions(segment_ids, x.shape[1])
      positions = jnp.broadcast_to(positions, x.shape[:2])
    else:
      positions = chunk.doc_positions
    q = layers.rope(q, positions, cfg.rope_theta)
    k = layers.rope(k, positions, cfg.rope_theta)
    q = q * jnp.asarray(cfg.head_dim**-0.5, q.dtype)
    q, k, v = (layers.constrain(z, "batch", "length", "heads", "kv") for z in (q, k, v))
    retrieve = functools.partial(layers.retrieve, impl=cfg.retrieve_impl)
    if cache is None:
      y = retrieve(q, k, v, lo=lo, hi=self.hi, segment_ids=segment_ids)
      return dense("wo", "heads", "embed")(layers.merge_heads(y))
    y, cache = cache_lib.step(q, k, v, cache, chunk, family_lib.Band(lo, self.hi), retrieve)
    return dense("wo", "heads", "embed")(layers.merge_heads(y)), cache
