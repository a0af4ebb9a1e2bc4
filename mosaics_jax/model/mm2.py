"""Memory Mosaics v2 ("Memory Mosaics at scale"; design.md, "v2").

    x += W_o [ShortTerm(N1 x); LongTerm(N1 x)]     (concatenated heads, 2d -> d)
    x += W2(silu(W1 N2 x) * W3 N2 x)               (the persistent memory, a SwiGLU)

with RMSNorm pre-norms, an untied embedding and classifier, and no position encoding. Without
long-term memory (`long_term_memory=False`) W_o is d -> d over the short-term output. `FAMILY`
holds the family's facts (`family.Family`): the two bands, and the long-term delay m drawn at
every training step.

Axis legend: b = batch, t = time, v = vocabulary.
"""

from __future__ import annotations

import typing
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

import kernels_pallas
from mosaics_jax import config as config_lib
from mosaics_jax.model import cache as cache_lib, family, layers, lm, memories

SHORT_TERM, LONG_TERM = "short_term", "long_term"


class MosaicV2Block(nn.Module):
  """x += W_o [ShortTerm(N1 x); LongTerm(N1 x)];  x += SwiGLU(N2 x)."""

  config: config_lib.MosaicV2Config
  layer_index: int

  @nn.compact
  def __call__(self, x, segment_ids, ltm_delay, deterministic: bool, cache=None, chunk=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    h = lm.rms_norm(cfg, "norm1")(x)
    outputs, caches = [], {}
    for name, band in FAMILY.bands(cfg, ltm_delay).items():
      memory = memories.AssociativeMemory(
          cfg, self.layer_index, hi=band.hi, selection=band.selection, name=name
      )
      if cache is None:
        y = memory(h, segment_ids, band.lo)
      else:
        y, caches[name] = memory(h, None, band.lo, cache=cache[name], chunk=chunk)
      # The Table 2 ablation: the parameters stay, the output goes.
      outputs.append(jnp.zeros_like(y) if name == LONG_TERM and cfg.drop_long_term_memory else y)
    y = jnp.concatenate([layers.merge_heads(o) for o in outputs], axis=-1)
    init = layers.truncated_normal(layers.depth_scaled_std(cfg.width, self.layer_index))
    # The input of w_o is [short-term heads; long-term heads], each heads-major.
    w_o = nn.Dense(
        cfg.width,
        use_bias=False,
        kernel_init=layers.logical(init, "heads", "embed"),
        dtype=dtype,
        name="w_o",
    )
    x = x + drop(w_o(y))
    h = lm.rms_norm(cfg, "norm2")(x)
    ffn = layers.SwiGLU(cfg.ffn_width, self.layer_index, dtype=dtype, name="ffn")
    x = x + drop(ffn(h))
    return x if cache is None else (x, caches)


class MosaicV2(lm.LanguageModel):
  """Memory Mosaics v2: untied embedding and classifier, RMSNorm pre-norm blocks."""

  config: config_lib.MosaicV2Config

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
      ltm_delay: int | jax.Array | None = None,
      deterministic: bool = True,
      hidden_only: bool = False,
  ):
    """Logits [b, t, v]; with a decode cache, (logits, the cache after this chunk); with
    `hidden_only`, the final hidden states [b, t, m] (`FAMILY.output_logits` maps them to logits).

    `ltm_delay` is the long-term delay m (may be traced); None uses config.long_term_delay.
    """
    cfg = self.config
    tokens, segment_ids = lm.check_inputs(tokens, segment_ids)
    ltm_delay = cfg.long_term_delay if ltm_delay is None else ltm_delay
    return lm.untied_decoder(
        cfg,
        tokens,
        segment_ids,
        MosaicV2Block,
        (ltm_delay,),
        deterministic,
        cache,
        lengths,
        hidden_only,
    )


class MosaicV2Family(family.Family):
  """The facts of Memory Mosaics v2."""

  config_class = config_lib.MosaicV2Config
  module_class = MosaicV2
  labels = {
      "embed": "embedding",
      "classifier": "classifier",
      SHORT_TERM: "short-term memory",
      LONG_TERM: "long-term memory",
      "w_o": "W_o (memory output)",
      "ffn": "persistent memory (SwiGLU)",
  }
  torch_mark = f".{SHORT_TERM}."

  def layer_name(self, index: int) -> str:
    return lm.layer_name(index)

  def bands(
      self, config: config_lib.MosaicV2Config, ltm_delay: int | jax.Array | None = None
  ) -> dict[str, family.Band]:
    """Short-term: pairs t-h+1 .. t-1; long-term: pairs ..t-m (v2 paper, Eq. 10)."""
    bands = {SHORT_TERM: family.Band(lo=1, hi=config.short_term_window - 1)}
    if config.long_term_memory:
      lo = config.long_term_delay if ltm_delay is None else ltm_delay
      bands[LONG_TERM] = family.Band(lo=lo, hi=None, selection=self.long_term_selection(config))
    return bands

  def long_term_selection(
      self, config: config_lib.MosaicV2Config
  ) -> kernels_pallas.BlockSelection | None:
    """The long-term memory's block selection (design.md, "Block selection"), or None: every
    pair."""
    if not config.long_term_select_blocks:
      return None
    return kernels_pallas.BlockSelection(
        blocks=config.long_term_select_blocks,
        block_size=config.long_term_select_block_size,
        recent=config.long_term_select_recent,
        summary=config.long_term_select_summary,
    )

  def step_kwargs(self, config: config_lib.MosaicV2Config, key: jax.Array | None) -> dict[str, Any]:
    """m drawn uniformly from long_term_delay_range at a training step (one m per step: ASSUMED);
    long_term_delay at inference."""
    if not config.long_term_memory:
      return {}
    if key is None:
      return {"ltm_delay": config.long_term_delay}
    low, high = config.long_term_delay_range
    return {"ltm_delay": jax.random.randint(key, (), low, high + 1)}

  def output_logits(self, config, params, x):
    return lm.untied_logits(config, params, x)

  def init_cache(self, config, batch, max_len, dtype) -> cache_lib.Cache:
    # The short-term memory keeps a ring of h - 1 pairs: without long-term memory the cache does
    # not grow with the stream.
    names = [lm.layer_name(i) for i in range(config.num_layers)]
    return cache_lib.empty(
        batch,
        max_len,
        dtype,
        names,
        self.bands(config),
        config.num_heads,
        config.head_dim,
        pending=True,
        key_state=True,
        gated=True,
    )

  def layer_activations(self, config, b, t) -> list[family.Activation]:
    c = family.itemsize(config)
    f32 = 4
    n = len(self.bands(config))
    heads = lambda itemsize, count: family.Activation.heads(config, b, t, itemsize, count)
    return [
        heads(c, 2 * n),  # W_phi x, W_psi x.
        heads(f32, 4 * n),  # Keys: gated scan input, scan output, normalised; the query.
        heads(f32, 3 * n),  # Values: projection, mix, normalised.
        heads(c, 4 * n),  # The retrieval's q, k, v and output.
        family.Activation.mlp(config.ffn_width, b, t, c, 3),  # SwiGLU gate, up, their product.
    ]


FAMILY = MosaicV2Family()
