"""The Transformer baseline of the v1 paper: nanoGPT's GPT-2 (nanoMosaics' `gpt_model.GPT`).

    x = wte(tokens) + wpe(positions)
    x += c_proj(Attention(c_attn LN1 x));  x += c_proj'(gelu(c_fc LN2 x))
    logits = wte^T LN_f x

with nanoGPT's parameter names (`wte`, `wpe`, `h_{i}`, `attn`, `mlp`, `ln_f`), LayerNorms and
Linears with biases if `bias`, an exact (erf) GELU, a 4 x width MLP and a tied classifier. Attention
is the retrieval op with the causal band [0, inf), as the Llama baseline's. Positions count inside
each document, so a packed row computes what separate runs of its documents do; learned, they bound
the length to block_size. Dropout falls on the embedding sum and on both residual branches; unlike
nanoGPT, not on the attention probabilities (no attention of the zoo has that dropout).
`FAMILY` holds the family's facts, nanoGPT's PyTorch layout included.

Axis legend: b = batch, t = time, m = model width, v = vocabulary.
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

import kernels_pallas
from mosaics_jax import config as config_lib
from mosaics_jax.model import cache as cache_lib, family, layers, llama, lm

ATTENTION = "attn"  # nanoGPT's name of the attention.
# nanoGPT's causal-mask buffer, in state dicts of PyTorch without scaled_dot_product_attention.
_BUFFERS = ("attn.bias",)


def _dense(
    cfg: config_lib.GPT2Config, features: int, std: float, axes: tuple[str, str], name: str
) -> nn.Dense:
  """A nanoGPT Linear: normal(std) weights, zero biases if cfg.bias."""
  return nn.Dense(
      features,
      use_bias=cfg.bias,
      kernel_init=layers.logical(nn.initializers.normal(std), *axes),
      bias_init=layers.logical(nn.initializers.zeros_init(), axes[1]),
      dtype=jnp.dtype(cfg.dtype),
      name=name,
  )


def _projection_std(cfg: config_lib.GPT2Config) -> float:
  """GPT-2's scaled init of the residual projections (`c_proj`)."""
  return cfg.init_std / math.sqrt(2 * cfg.num_layers)


class CausalSelfAttention(layers.PlainInit):
  """softmax(q k^T / sqrt(d)) v over the band inside the document; q, k, v from one c_attn."""

  config: config_lib.GPT2Config
  hi: int | None

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "b t m"],
      segment_ids: Int[Array, "b t"] | None,
      lo: int,
      deterministic: bool = True,
      *,
      cache: cache_lib.MemoryCache | None = None,
      chunk: cache_lib.Chunk | None = None,
  ):
    """y [b, t, m]; with a cache, (y, the cache after the chunk). Training with dropout drops
    attention weights as nanoGPT's attn_dropout does, through the dense retrieval."""
    cfg = self.config
    qkv = _dense(cfg, 3 * cfg.width, cfg.init_std, ("embed", "heads"), "c_attn")(x)
    q, k, v = (layers.split_heads(z, cfg.num_heads) for z in jnp.split(qkv, 3, axis=-1))
    q = q * jnp.asarray(cfg.head_dim**-0.5, q.dtype)
    q, k, v = (layers.constrain(z, *family.HEADS) for z in (q, k, v))
    retrieve = functools.partial(layers.retrieve, impl=cfg.retrieve_impl)
    if cache is None and not deterministic and cfg.dropout:
      dropout = nn.Dropout(cfg.dropout, deterministic=False)
      y = layers.dropped_retrieve(
          q, k, v, lo=lo, hi=self.hi, segment_ids=segment_ids, dropout=dropout
      )
    elif cache is None:
      y = retrieve(q, k, v, lo=lo, hi=self.hi, segment_ids=segment_ids)
    else:
      y, cache = cache_lib.step(q, k, v, cache, chunk, family.Band(lo, self.hi), retrieve)
    c_proj = _dense(cfg, cfg.width, _projection_std(cfg), ("heads", "embed"), "c_proj")
    y = c_proj(layers.merge_heads(y))
    return y if cache is None else (y, cache)


class MLP(layers.PlainInit):
  """c_proj(gelu(c_fc x)), 4 x width wide, exact GELU (PyTorch's nn.GELU())."""

  config: config_lib.GPT2Config

  @nn.compact
  def __call__(self, x: Float[Array, "b t m"]) -> Float[Array, "b t m"]:
    cfg = self.config
    h = _dense(cfg, 4 * cfg.width, cfg.init_std, ("embed", "mlp"), "c_fc")(x)
    h = layers.constrain(nn.gelu(h, approximate=False), "batch", "length", "mlp")
    return _dense(cfg, cfg.width, _projection_std(cfg), ("mlp", "embed"), "c_proj")(h)


class GPT2Block(nn.Module):
  """nanoGPT Block: x += Attention(LN1 x); x += MLP(LN2 x) (pre-LayerNorm)."""

  config: config_lib.GPT2Config

  @nn.compact
  def __call__(self, x, segment_ids, deterministic: bool, cache=None, chunk=None):
    cfg = self.config
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    ((name, band),) = FAMILY.bands(cfg).items()
    attend = CausalSelfAttention(cfg, hi=band.hi, name=name)
    h = lm.layer_norm(cfg, "ln_1")(x)
    if cache is None:
      y = attend(h, segment_ids, band.lo, deterministic)
    else:
      y, new_cache = attend(h, None, band.lo, deterministic, cache=cache[name], chunk=chunk)
    x = x + drop(y)
    x = x + drop(MLP(cfg, name="mlp")(lm.layer_norm(cfg, "ln_2")(x)))
    return x if cache is None else (x, {name: new_cache})


class GPT2(lm.LanguageModel):
  """nanoGPT's GPT with its parameter names: wte (tied LM head), wpe, h_{i}, ln_f."""

  config: config_lib.GPT2Config

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
    """Logits [b, t, v]; with a decode cache, (logits, the cache after this chunk). A chunk holds
    at most block_size tokens, and a cache at most block_size per row (`GPT2Family.init_cache`).
    With `hidden_only`, the final hidden states [b, t, m] (`FAMILY.output_logits` maps them to
    logits)."""
    cfg = self.config
    tokens, segment_ids = lm.check_inputs(tokens, segment_ids, cfg.block_size)
    init = nn.initializers.normal(cfg.init_std)
    wte = lm.embed(cfg, init, "wte")
    wpe = nn.Embed(
        cfg.block_size,
        cfg.width,
        embedding_init=layers.logical(init, "length", "embed"),
        dtype=jnp.dtype(cfg.dtype),
        name="wpe",
    )
    if cache is None:
      chunk = None
      positions = kernels_pallas.document_positions(segment_ids, tokens.shape[1])
      positions = jnp.broadcast_to(positions, tokens.shape)
    else:
      chunk = cache_lib.chunk_of(cache, segment_ids, lengths, tokens.shape[1])
      # A cache holds at most block_size tokens per row (a row past it gets NaN logits and
      # `cache.check` raises), so only the padding after a row's tokens may point past wpe.
      positions = jnp.minimum(chunk.doc_positions, cfg.block_size - 1)
    x = nn.Dropout(cfg.dropout, deterministic=deterministic)(wte(tokens) + wpe(positions))
    x = lm.residual(x)
    x, layer_caches = lm.stack(
        cfg, GPT2Block, x, segment_ids, deterministic, cache, chunk, name=_layer
    )
    x = lm.layer_norm(cfg, "ln_f")(x)
    if hidden_only:
      return lm.hidden_states(x, cache)
    out = lm.logits(wte.attend(x))
    if cache is None:
      return out
    return cache_lib.advance(cache, chunk, layer_caches, out)


class GPT2Family(family.Family):
  """The facts of the GPT-2 baseline."""

  config_class = config_lib.GPT2Config
  module_class = GPT2
  tied_embedding = True
  labels = {
      "wte": "embedding (tied classifier)",
      "wpe": "position embedding",
      "attn": "attention",
      "mlp": "MLP",
  }
  torch_mark = "transformer."

  def layer_name(self, index: int) -> str:
    return _layer(index)

  def bands(self, config, ltm_delay=None) -> dict[str, family.Band]:
    del config, ltm_delay
    return {ATTENTION: llama.CAUSAL_BAND}

  def max_length(self, config: config_lib.GPT2Config) -> int:
    return config.block_size

  def output_logits(self, config, params, x):
    return lm.logits(lm.attend(config, params["wte"], x))

  def init_cache(self, config, batch, max_len, dtype) -> cache_lib.Cache:
    """A cache of at most block_size tokens per row, whatever max_len asks: the position embedding
    has no row for more, so a row that would go past it is refused by name (`cache.check`)."""
    return cache_lib.empty(
        batch,
        min(max_len, config.block_size),
        dtype,
        [_layer(i) for i in range(config.num_layers)],
        self.bands(config),
        config.num_heads,
        config.head_dim,
        pending=False,
        key_state=False,
    )

  def layer_activations(self, config, b, t) -> list[family.Activation]:
    c = family.itemsize(config)
    kept = [
        family.Activation.heads(config, b, t, c, 4),  # q, k, v; the attention output.
        family.Activation.mlp(4 * config.width, b, t, c, 2),  # c_fc's output, its GELU.
    ]
    if config.dropout:
      # Training with dropout retrieves densely: the weights and the dropped weights.
      shape = (b, config.num_heads, t, t)
      kept.append(family.Activation(("batch", "heads", None, None), shape, 4, 2))
    return kept

  # nanoGPT's names: a `transformer.` prefix, layers as `h.{i}`.

  def torch_name(self, path: family.Path) -> str:
    name = super().torch_name(path)
    head, sep, rest = name.partition(".")
    if head.startswith("h_") and head[2:].isdigit():
      name = f"h.{head[2:]}{sep}{rest}"
    return "transformer." + name

  def torch_extras(self, tensors: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Drops `lm_head.weight`, which nanoGPT ties to `transformer.wte.weight` (checked equal), and
    skips the causal-mask buffers."""
    tensors = dict(tensors)
    head = tensors.pop("lm_head.weight", None)
    wte = tensors.get("transformer.wte.weight")
    if head is not None and (wte is None or not np.array_equal(head, wte)):
      raise ValueError("lm_head.weight differs from transformer.wte.weight: nanoGPT ties them")
    return tensors, _BUFFERS


def _layer(index: int) -> str:
  """The module name of layer `index`: nanoGPT's `h_{i}`."""
  return f"h_{index}"


FAMILY = GPT2Family()
