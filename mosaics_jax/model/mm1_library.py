"""Memory Mosaics v1 as the official `Library/` package's `StackAssoMem` (design.md, "v1, Library
variant"), the model of the v1 paper's BabiStories and RegBench runs.

    pre_ln:  x += ContextMem(LN1 x);  x += PersistentMem(LN2 x)
    post_ln: x = LN1 x; x += ContextMem(x); x = LN2 x; x += PersistentMem(x)
    logits = head(LN_out x) / sqrt(width)

Both memories make keys as k_t = Norm((1 - lambda) sum_s lambda^(t-s) phi(x)_s) *
exp(p min(10 kernel_beta, 5)), phi a causal convolution (p = 1; 2 in the persistent memory, whose
stored keys carry no scale). Values are Norm(psi(x)_t) exp(10 value_beta), psi looking v_shift
steps ahead. Norm has no eps. Its own family, not options of mm1: its parameter names, PyTorch
layout, inits, dropouts and defaults all differ from nanoMosaics'. Decoding uses mm1's cache, for
keys without look-back (k_kernel_size 1) and values one step ahead ("lowrlinearconv", v_shift 1).

Axis legend: b = batch, t = time, m = model width, h = heads, d = head dim, v = vocabulary.
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

import kernels_pallas
from mosaics_jax import config as config_lib
from mosaics_jax.model import cache as cache_lib, family, features, layers, lm

Config = config_lib.MosaicV1LibraryConfig
# PyTorch nests the persistent memory's pairs one module deeper: blocks.{i}.pmem.pmem.M_k{c}.
PERSISTENT = "pmem"
# With weight_tying, the Library's state dict holds the embedding under both names.
TIED_NAMES = ("emb.weight", "head.weight")


def _keys(
    memory: nn.Module,
    x: Float[Array, "b t m"],
    segment_ids: Int[Array, "b t"] | None,
    power: int,
    cache: cache_lib.MemoryCache | None,
    chunk: cache_lib.Chunk | None,
) -> tuple[Float[Array, "b t h d"], Float[Array, "b t h d"], Int[Array, "b t"] | None]:
  """(k, kbar, segment ids): the keys of `memory` (module doc), the leaky average they normalise,
  whose last state a decode cache keeps, and the documents of x (the chunk's, when decoding).
  Called in the memory's compact `__call__`, which owns their parameters."""
  if cache is not None:
    reset, segment_ids, initial = chunk.starts, chunk.segment_ids, cache.key_state
  else:
    reset = None if segment_ids is None else kernels_pallas.segment_starts(segment_ids)
    initial = None
  cfg = memory.config
  h = cfg.num_heads
  phi, _, _ = features.LibraryFeatureExtractor(
      cfg.k_fe_type, 0, cfg.k_kernel_size, h, cfg.bias, False, jnp.dtype(cfg.dtype),
      name="k_featurizer",
  )(x, segment_ids)  # fmt: skip
  kbar = features.LeakyAverage(
      h,
      cfg.exp_scaling,
      cfg.leaky_init,
      cfg.scan_impl,
      cfg.scan_chunk_size,
      unit_gain=True,
      name="leaky_avg",
  )(phi, reset, initial)
  init = layers.logical(nn.initializers.constant(cfg.kernel_beta_init), "heads")
  kernel_beta = memory.param("kernel_beta", init, (h,))
  scale = jnp.exp(jnp.minimum(kernel_beta * cfg.exp_scaling, cfg.kernel_beta_max)) ** power
  return features.l2_normalize(kbar, 0.0) * scale[:, None], kbar, segment_ids


def _value_scale(cfg: Config, module: nn.Module) -> Float[Array, " h"]:
  init = nn.initializers.constant(cfg.value_beta_init)
  beta = module.param("value_beta", layers.logical(init, "heads"), (cfg.num_heads,))
  return jnp.exp(beta * cfg.exp_scaling)


def _c_proj(cfg: Config, y: Float[Array, "b t h d"], deterministic: bool) -> Float[Array, "b t m"]:
  """The output projection, initialised N(0, 1 / (width L)), and hd_dropout."""
  std = 1 / math.sqrt(cfg.width) / math.sqrt(cfg.num_layers)
  y = nn.Dense(
      cfg.width,
      use_bias=cfg.bias,
      kernel_init=layers.logical(nn.initializers.normal(std), "heads", "embed"),
      bias_init=layers.logical(nn.initializers.zeros_init(), "embed"),
      dtype=jnp.dtype(cfg.dtype),
      name="c_proj",
  )(layers.merge_heads(y.astype(jnp.dtype(cfg.dtype))))
  return nn.Dropout(cfg.hd_dropout, deterministic=deterministic)(y)


def _attention_dropout(cfg: Config, deterministic: bool) -> nn.Dropout | None:
  """ic_dropout on attention weights when training, else None (the fused retrievals)."""
  if deterministic or not cfg.ic_dropout:
    return None
  return nn.Dropout(cfg.ic_dropout, deterministic=False)


class ContextMemory(layers.PlainInit):
  """The Library's InContextAssoMemBlock: softmax(k_t . k_s) over s <= t - v_shift, then c_proj."""

  config: Config

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "b t m"],
      segment_ids: Int[Array, "b t"] | None,
      deterministic: bool,
      cache: cache_lib.MemoryCache | None = None,
      chunk: cache_lib.Chunk | None = None,
  ):
    """y [b, t, m]; with a cache, (y, the cache after the chunk)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    k, kbar, segment_ids = _keys(self, x, segment_ids, 1, cache, chunk)
    v, raw, mix = features.LibraryFeatureExtractor(
        cfg.v_fe_type, cfg.v_shift, cfg.v_kernel_size, cfg.num_heads, cfg.bias, True, dtype,
        name="v_featurizer",
    )(x, segment_ids, _value_scale(cfg, self))  # fmt: skip
    k, v = k.astype(dtype), v.astype(dtype)
    retrieve = functools.partial(layers.retrieve, impl=cfg.retrieve_impl)
    dropout = _attention_dropout(cfg, deterministic)
    if cache is not None:
      band = FAMILY.bands(cfg)["attn"]
      y, cache = cache_lib.step(k, k, v, cache, chunk, band, retrieve, raw=raw, mix=mix, kbar=kbar)
      return _c_proj(cfg, y, deterministic), cache
    if dropout is None:
      y = retrieve(k, k, v, lo=cfg.v_shift, hi=None, segment_ids=segment_ids)
    else:
      y = layers.dropped_retrieve(
          k, k, v, lo=cfg.v_shift, hi=None, segment_ids=segment_ids, dropout=dropout
      )
    return _c_proj(cfg, y, deterministic)


class Pmem(nn.Module):
  """The Library's Pmem: mean over c of softmax(k M_k[c]^T) M_v[c], dropout on the weights."""

  config: Config

  @nn.compact
  def __call__(self, k: Float[Array, "b t h d"], dropout: nn.Dropout | None):
    cfg = self.config
    shape = (1, cfg.num_heads, cfg.pmem_size, cfg.head_dim)
    init = layers.logical(
        nn.initializers.normal(1 / math.sqrt(cfg.head_dim)), "pmem", "heads", "pairs", "kv"
    )
    p_k, p_v = (
        jnp.concatenate([self.param(f"{n}{c}", init, shape) for c in range(cfg.pmem_count)])
        for n in ("M_k", "M_v")
    )
    if dropout is None:
      y = kernels_pallas.retrieve_persistent(k, p_k.astype(k.dtype), p_v.astype(k.dtype))
    else:
      scores = jnp.einsum("bthd,chpd->bthcp", k.astype(jnp.float32), p_k)
      weights = dropout(jax.nn.softmax(scores, axis=-1))
      y = jnp.einsum("bthcp,chpd->bthd", weights, p_v)
    return y / cfg.pmem_count


class PersistentMemory(layers.PlainInit):
  """The Library's PersistentAssoMemBlock: Pmem(k) * exp(10 value_beta), then c_proj."""

  config: Config

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "b t m"],
      segment_ids: Int[Array, "b t"] | None,
      deterministic: bool,
      cache: cache_lib.MemoryCache | None = None,
      chunk: cache_lib.Chunk | None = None,
  ):
    """y [b, t, m]; with a cache (its key state), (y, the cache after the chunk)."""
    cfg = self.config
    k, kbar, _ = _keys(self, x, segment_ids, 2, cache, chunk)
    y = Pmem(cfg, name="pmem")(
        k.astype(jnp.dtype(cfg.dtype)), _attention_dropout(cfg, deterministic)
    )
    y = _c_proj(cfg, y * _value_scale(cfg, self)[:, None], deterministic)
    if cache is None:
      return y
    return y, cache_lib.MemoryCache(key_state=cache_lib.last(kbar, chunk.lengths, cache.key_state))


class Block(nn.Module):
  """The Library's AttnOnlyBlock: both memories, pre- or post-LayerNorm (module doc)."""

  config: Config

  @nn.compact
  def __call__(self, x, segment_ids, deterministic: bool, cache=None, chunk=None):
    """x after the block; with a cache, (x, the cache after the chunk)."""
    cfg = self.config
    memories = [("attn", ContextMemory, "ln1")]
    if not cfg.attn_only:
      memories.append((PERSISTENT, PersistentMemory, "ln2"))
    caches = {}
    for name, memory_class, norm_name in memories:
      memory, norm = memory_class(cfg, name=name), lm.layer_norm(cfg, norm_name)
      h = norm(x)
      if not cfg.pre_ln:
        x = h
      if cache is None:
        x = x + memory(h, segment_ids, deterministic)
      else:
        y, caches[name] = memory(h, None, deterministic, cache[name], chunk)
        x = x + y
    return x if cache is None else (x, caches)


class MosaicV1Library(lm.LanguageModel):
  """StackAssoMem: embedding `emb`, blocks, `ln_out`, `head` (the embedding if weight_tying)."""

  config: Config

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
    """Logits [b, t, v] of every position, documents of packed rows independent; with a decode
    cache, (logits, the cache after this chunk): a decoder is not bound by block_size, which
    limits the chunk alone. With `hidden_only`, the final hidden states [b, t, m]
    (`FAMILY.output_logits` maps them to logits)."""
    cfg = self.config
    tokens, segment_ids = lm.check_inputs(tokens, segment_ids, cfg.block_size)
    head_init = nn.initializers.normal(1 / math.sqrt(cfg.width))
    # The Library initialises the tied weight last, as the head.
    emb = lm.embed(cfg, head_init if cfg.weight_tying else nn.initializers.normal(1.0), "emb")
    x = lm.residual(emb(tokens))
    chunk = (
        None if cache is None else cache_lib.chunk_of(cache, segment_ids, lengths, tokens.shape[1])
    )
    x, layer_caches = lm.stack(cfg, Block, x, segment_ids, deterministic, cache, chunk)
    x = lm.layer_norm(cfg, "ln_out")(x)
    if hidden_only:
      return lm.hidden_states(x, cache)
    out = _scaled_logits(
        cfg, emb.attend(x) if cfg.weight_tying else lm.classifier(cfg, head_init, "head")(x)
    )
    if cache is None:
      return out
    return cache_lib.advance(cache, chunk, layer_caches, out)


def _scaled_logits(cfg: Config, out: Float[Array, "b t v"]) -> Float[Array, "b t v"]:
  """The logits: the output layer's output over sqrt(width), as the Library's head divides it."""
  return lm.logits(out / math.sqrt(cfg.width))


class MosaicV1LibraryFamily(family.Family):
  """The facts of the Library's Memory Mosaics v1."""

  config_class = Config
  module_class = MosaicV1Library
  # Counts the classifier's FLOPs through the embedding: exact for weight_tying, the default.
  tied_embedding = True
  labels = {
      "emb": "embedding",
      "ln1": "norms",
      "ln2": "norms",
      "attn": "contextual memory",
      PERSISTENT: "persistent memory",
      "head": "classifier",
  }
  torch_mark = "ln_out."

  def layer_name(self, index: int) -> str:
    return lm.layer_name(index)

  def bands(self, config, ltm_delay=None) -> dict[str, family.Band]:
    del ltm_delay
    return {"attn": family.Band(lo=config.v_shift, hi=None)}

  def max_length(self, config: Config) -> int:
    return config.block_size

  def output_logits(self, config, params, x):
    if config.weight_tying:
      return _scaled_logits(config, lm.attend(config, params["emb"], x))
    head = lm.classifier(config, nn.initializers.zeros_init(), "head").apply(
        {"params": params["head"]}, x
    )
    return _scaled_logits(config, head)

  def init_cache(self, config, batch, max_len, dtype) -> cache_lib.Cache:
    """mm1's cache: keys without look-back (a kernel of 1) and values one step ahead."""
    keys_look_back = config.k_fe_type == "linearconv" and config.k_kernel_size > 1
    if keys_look_back or config.v_fe_type != "lowrlinearconv" or config.v_shift != 1:
      raise NotImplementedError(
          "the mm1-library decode cache takes keys of k_kernel_size 1 and 'lowrlinearconv' values"
          f" with v_shift 1, got k_fe_type {config.k_fe_type!r}, k_kernel_size"
          f" {config.k_kernel_size}, v_fe_type {config.v_fe_type!r}, v_shift {config.v_shift}:"
          " generate by re-running the full forward"
      )
    bands = self.bands(config)
    band = bands["attn"]
    h, d = config.num_heads, config.head_dim
    memory = cache_lib.capacity(band, max_len)
    layers_cache = {}
    for i in range(config.num_layers):
      layer = {
          "attn": cache_lib.empty_memory(
              batch, memory, h, d, d, dtype, pending=True, key_state=True
          )
      }
      if not config.attn_only:
        # The persistent memory's keys are a recurrence too; its pairs are parameters.
        layer[PERSISTENT] = cache_lib.empty_memory(
            batch, None, h, d, d, dtype, pending=False, key_state=True
        )
      layers_cache[lm.layer_name(i)] = layer
    limit = cache_lib.length_limit(bands.values(), max_len)
    return cache_lib.Cache(cache_lib.empty_stream(batch), layers_cache, limit)

  def torch_extras(self, tensors: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Drops `head.weight` where it equals `emb.weight`: a tied classifier, saved twice. An
    untied model keeps it (equal weights then leave it missing, named)."""
    tensors = dict(tensors)
    embedding, head = TIED_NAMES
    if (
        head in tensors
        and embedding in tensors
        and np.array_equal(tensors[head], tensors[embedding])
    ):
      del tensors[head]
    return tensors, ()

  def layer_activations(self, config, b, t) -> list[family.Activation]:
    c = family.itemsize(config)
    f32 = 4
    heads = lambda itemsize, count: family.Activation.heads(config, b, t, itemsize, count)
    h, pairs = config.num_heads, config.pmem_count * config.pmem_size
    kept = [
        heads(c, 2),  # phi(x) of the keys, psi(x) of the values.
        heads(f32, 6),  # Keys: scan input, output, normalised; values: taps, mixed, normed.
        heads(c, 3),  # The retrieval's k (also its query), v and output.
    ]
    if config.ic_dropout:
      # Training with ic_dropout retrieves densely: the weights and the dropped weights.
      kept.append(family.Activation(("batch", "heads", None, None), (b, h, t, t), f32, 2))
    if config.attn_only:
      return kept
    kept += [
        heads(c, 1),  # Persistent memory: phi(x),
        heads(f32, 4),  # its keys (scan input, output, normalised) and float32 output,
        heads(c, 2),  # and its key and output in the compute dtype.
    ]
    if config.ic_dropout:
      kept.append(family.Activation(("batch", None, "heads", None), (b, t, h, pairs), f32, 2))
    return kept

  def layer_temporaries(self, config, b, t) -> list[family.Activation]:
    if config.attn_only:
      return []
    chunk = min(kernels_pallas.persistent.CHUNK, b * t)
    pairs = config.pmem_count * config.pmem_size
    return [family.Activation(("heads", None, None), (config.num_heads, chunk, pairs), 4, 4)]

  # The Library's names: layers `blocks.{i}`, the leaky average's parameter on its memory. Flax's
  # conv kernel [k, in, out] is PyTorch's [out, in, k] reversed, as a Linear's is.

  def torch_name(self, path: family.Path) -> str:
    path = tuple(p for p in path if p != "leaky_avg")
    name = super().torch_name(path)
    head, sep, rest = name.partition(".")
    if head.startswith("layer_") and head[6:].isdigit():
      name = f"blocks.{head[6:]}{sep}{rest}"
    return name


FAMILY = MosaicV1LibraryFamily()
