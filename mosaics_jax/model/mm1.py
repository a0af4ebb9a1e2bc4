"""Memory Mosaics v1, numerically as the official nanoMosaics `MemoryMosaic` (design.md, "v1").

    x += c_proj(ContextMemory(LN1 x));  x += c_proj'(PersistentMemory(LN2 x))

with a tied embedding and classifier (`wte`), no position embedding, and nanoMosaics' parameter
names (`h_{i}`, `attn`, `mlp`, `ln_f`). `FAMILY` holds the family's facts (`family.Family`),
nanoMosaics' PyTorch layout included.

Axis legend: b = batch, t = time, v = vocabulary.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np
from jaxtyping import Array, Int

from kernels_pallas import persistent
from mosaics_jax import config as config_lib
from mosaics_jax.model import cache as cache_lib, family, lm, memories

# The contextual memory reads every complete pair before t (a pair (k_s, v_s) is complete at s+1).
CONTEXT_BAND = family.Band(lo=1, hi=None)
PERSISTENT = "mlp"  # nanoMosaics' name of the persistent memory.
# Per-head scalars, which nanoMosaics stores as [1, H, 1, 1].
_PER_HEAD = frozenset({"leaky_key_beta", "key_scale", "coef", "val_scale", "out_scale"})
# Buffers of nanoMosaics' state dict, functions of block_size: skipped on import.
_BUFFERS = ("attn.bias", "leaky_avg.coef")


class MosaicV1Block(nn.Module):
  """nanoMosaics Block: x += ContextMem(LN1 x); x += PersistentMem(LN2 x) (pre-LayerNorm)."""

  config: config_lib.MosaicV1Config

  @nn.compact
  def __call__(self, x, segment_ids, deterministic: bool, cache=None, chunk=None):
    cfg = self.config
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    ((name, band),) = FAMILY.bands(cfg).items()
    memory = memories.ContextMemory(cfg, hi=band.hi, name=name)
    persistent = memories.PersistentMemoryV1(cfg, name=PERSISTENT)
    h = lm.layer_norm(cfg, "ln_1")(x)
    if cache is None:
      x = x + drop(memory(h, segment_ids, band.lo))
      return x + drop(persistent(lm.layer_norm(cfg, "ln_2")(x), segment_ids))
    y, memory_cache = memory(h, None, band.lo, cache=cache[name], chunk=chunk)
    x = x + drop(y)
    y, persistent_cache = persistent(
        lm.layer_norm(cfg, "ln_2")(x), None, cache=cache[PERSISTENT], chunk=chunk
    )
    return x + drop(y), {name: memory_cache, PERSISTENT: persistent_cache}


class MosaicV1(lm.LanguageModel):
  """Memory Mosaics v1 with nanoMosaics' parameter names: wte (tied LM head), h_{i}, ln_f."""

  config: config_lib.MosaicV1Config

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
    """Logits [b, t, v]; with a decode cache, (logits, the cache after this chunk): a decoder is
    not bound by block_size, which limits the chunk alone. With `hidden_only`, the final hidden
    states [b, t, m] (`FAMILY.output_logits` maps them to logits)."""
    cfg = self.config
    tokens, segment_ids = lm.check_inputs(tokens, segment_ids, cfg.block_size)
    wte = lm.embed(cfg, nn.initializers.normal(cfg.init_std), "wte")
    x = lm.residual(nn.Dropout(cfg.dropout, deterministic=deterministic)(wte(tokens)))
    chunk = (
        None if cache is None else cache_lib.chunk_of(cache, segment_ids, lengths, tokens.shape[1])
    )
    x, layer_caches = lm.stack(
        cfg, MosaicV1Block, x, segment_ids, deterministic, cache, chunk, name=_layer
    )
    x = lm.layer_norm(cfg, "ln_f")(x)
    if hidden_only:
      return lm.hidden_states(x, cache)
    out = lm.logits(wte.attend(x))
    if cache is None:
      return out
    return cache_lib.advance(cache, chunk, layer_caches, out)


class MosaicV1Family(family.Family):
  """The facts of Memory Mosaics v1."""

  config_class = config_lib.MosaicV1Config
  module_class = MosaicV1
  tied_embedding = True
  labels = {
      "wte": "embedding (tied classifier)",
      "attn": "contextual memory",
      "mlp": "persistent memory",
  }
  torch_mark = "mosaic."

  def layer_name(self, index: int) -> str:
    return _layer(index)

  def bands(self, config, ltm_delay=None) -> dict[str, family.Band]:
    del config, ltm_delay
    return {"attn": CONTEXT_BAND}

  def max_length(self, config: config_lib.MosaicV1Config) -> int:
    return config.block_size

  def output_logits(self, config, params, x):
    return lm.logits(lm.attend(config, params["wte"], x))

  def init_cache(self, config, batch, max_len, dtype) -> cache_lib.Cache:
    bands = self.bands(config)
    ((name, band),) = bands.items()
    h, d = config.num_heads, config.head_dim
    memory = cache_lib.capacity(band, max_len)
    layers = {
        _layer(i): {
            name: cache_lib.empty_memory(
                batch, memory, h, d, d, dtype, pending=True, key_state=True
            ),
            # The persistent memory's keys are a recurrence too; its pairs are parameters.
            PERSISTENT: cache_lib.empty_memory(
                batch, None, h, d, d, dtype, pending=False, key_state=True
            ),
        }
        for i in range(config.num_layers)
    }
    limit = cache_lib.length_limit(bands.values(), max_len)
    return cache_lib.Cache(cache_lib.empty_stream(batch), layers, limit)

  def layer_activations(self, config, b, t) -> list[family.Activation]:
    c = family.itemsize(config)
    f32 = 4
    heads = lambda itemsize, count: family.Activation.heads(config, b, t, itemsize, count)
    return [
        heads(c, 2),  # W_k x, W_v x.
        heads(f32, 6),  # Keys: scan input, output, normalised; values: projected, mixed, normed.
        heads(c, 3),  # The retrieval's k (also its query), v and output.
        heads(c, 1),  # Persistent memory: W_k x,
        heads(f32, 4),  # its keys (scan input, output, normalised) and float32 output,
        heads(c, 2),  # and its key and output in the compute dtype.
    ]

  def layer_temporaries(self, config, b, t) -> list[family.Activation]:
    # The persistent memory's chunk: scores, weights and their two cotangents.
    chunk = min(persistent.CHUNK, b * t)
    pairs = config.pmem_count * config.pmem_size
    return [family.Activation(("heads", None, None), (config.num_heads, chunk, pairs), 4, 4)]

  # nanoMosaics' names: a `mosaic.` prefix, layers as `h.{i}`; per-head scalars [1, H, 1, 1] and
  # P_k, P_v [pmem_count, 1, H, pmem_size, d].

  def torch_name(self, path: family.Path) -> str:
    name = super().torch_name(path)
    head, sep, rest = name.partition(".")
    if head.startswith("h_") and head[2:].isdigit():
      name = f"h.{head[2:]}{sep}{rest}"
    return "mosaic." + name

  def to_torch_array(self, path: family.Path, x: np.ndarray) -> np.ndarray:
    if path[-1] in _PER_HEAD:
      return x.reshape(1, -1, 1, 1)
    if path[-1] in ("P_k", "P_v"):
      return x[:, None]
    return super().to_torch_array(path, x)

  def torch_extras(self, tensors: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Drops `lm_head.weight`, which nanoMosaics ties to `mosaic.wte.weight` (checked equal), and
    skips the causal-mask and leaky-average buffers."""
    tensors = dict(tensors)
    head = tensors.pop("lm_head.weight", None)
    wte = tensors.get("mosaic.wte.weight")
    if head is not None and (wte is None or not np.array_equal(head, wte)):
      raise ValueError("lm_head.weight differs from mosaic.wte.weight: nanoMosaics ties them")
    return tensors, _BUFFERS


def _layer(index: int) -> str:
  """The module name of layer `index`: nanoMosaics' `h_{i}`."""
  return f"h_{index}"


FAMILY = MosaicV1Family()
