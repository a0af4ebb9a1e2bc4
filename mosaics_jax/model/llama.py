"""The Transformer baseline of the v2 paper: Llama with full multi-head attention (no GQA).

    x += Attention(N1 x);  x += W2(silu(W1 N2 x) * W3 N2 x)

RoPE at positions inside each document, RMSNorm pre-norms, untied embedding and classifier.
Attention is the retrieval op with the causal band [0, inf). `FAMILY` holds the family's facts.

Axis legend: b = batch, t = time, v = vocabulary.
"""

from __future__ import annotations

import typing

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Int

from mosaics_jax import config as config_lib
from mosaics_jax.model import attention, cache as cache_lib, family, layers, lm

# Causal self-attention reads s <= t: lo = 0, where a memory has lo >= 1.
CAUSAL_BAND = family.Band(lo=0, hi=None)


class LlamaBlock(nn.Module):
  """x += Attention(N1 x); x += SwiGLU(N2 x)."""

  config: config_lib.LlamaConfig
  layer_index: int

  @nn.compact
  def __call__(self, x, segment_ids, deterministic: bool, cache=None, chunk=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    ((name, band),) = FAMILY.bands(cfg).items()
    attend = attention.Attention(cfg, self.layer_index, hi=band.hi, name=name)
    h = lm.rms_norm(cfg, "attn_norm")(x)
    if cache is None:
      y = attend(h, segment_ids, band.lo)
    else:
      y, new_cache = attend(h, None, band.lo, cache=cache[name], chunk=chunk)
    x = x + drop(y)
    h = lm.rms_norm(cfg, "ffn_norm")(x)
    x = x + drop(layers.SwiGLU(cfg.ffn_width, self.layer_index, dtype=dtype, name="ffn")(h))
    return x if cache is None else (x, {name: new_cache})


class Llama(lm.LanguageModel):
  """The Transformer baseline: Llama blocks, untied embedding and classifier.

  Initialisation follows the v2 paper's Table 6 like the Memory Mosaics it is compared with
  (ASSUMED: the paper does not give the baseline's).
  """

  config: config_lib.LlamaConfig

  # Checks its inputs itself (`lm.check_inputs`), with errors that name the problem; the test
  # suite's jaxtyping hook would answer first with its own.
  @typing.no_type_check
  @nn.compact
  def __call__(
      self,
      tokens: Int[Array, "b t"],
      segment_ids: Int[Array, "b t"] | None = None,
      *,
      cache: cache_lib.Cache | None = None,
      lengths: Int[Array, " b"] | None = None,
      deterministic: bool = True,
      hidden_only: bool = False,
  ):
    """Logits [b, t, v]; with a decode cache, (logits, the cache after this chunk); with
    `hidden_only`, the final hidden states [b, t, m] (`FAMILY.output_logits` maps them to logits).
    """
    tokens, segment_ids = lm.check_inputs(tokens, segment_ids)
    return lm.untied_decoder(
        self.config,
        tokens,
        segment_ids,
        LlamaBlock,
        (),
        deterministic,
        cache,
        lengths,
        hidden_only,
    )


class LlamaFamily(family.Family):
  """The facts of the Llama baseline."""

  config_class = config_lib.LlamaConfig
  module_class = Llama
  labels = {
      "embed": "embedding",
      "classifier": "classifier",
      "attention": "attention",
      "ffn": "persistent memory (SwiGLU)",
  }
  torch_mark = ".attention."

  def layer_name(self, index: int) -> str:
    return lm.layer_name(index)

  def bands(self, config, ltm_delay=None) -> dict[str, family.Band]:
    del config, ltm_delay
    return {"attention": CAUSAL_BAND}

  def output_logits(self, config, params, x):
    return lm.untied_logits(config, params, x)

  def init_cache(self, config, batch, max_len, dtype) -> cache_lib.Cache:
    names = [lm.layer_name(i) for i in range(config.num_layers)]
    return cache_lib.empty(
        batch,
        max_len,
        dtype,
        names,
        self.bands(config),
        config.num_heads,
        config.head_dim,
        pending=False,
        key_state=False,
    )

  def layer_activations(self, config, b, t) -> list[family.Activation]:
    c = family.itemsize(config)
    return [
        family.Activation.heads(config, b, t, c, 4),  # Rotated q, k; v; the attention output.
        family.Activation.mlp(config.ffn_width, b, t, c, 3),  # SwiGLU gate, up, their product.
    ]


FAMILY = LlamaFamily()
