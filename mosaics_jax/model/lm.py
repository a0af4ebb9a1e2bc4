"""What the language models of the zoo share: input checks, embeddings, norms, remat, logits.

Every model maps (tokens, segment_ids) to logits and is functional: `init` gives a plain params
pytree, `apply` is pure. Packed sequences carry `segment_ids` (one id per document, documents are
contiguous runs); no memory, recurrence or attention ever crosses a document boundary.

    model = families.build_model(config)
    params = model.init(rng, tokens)["params"]
    logits = model.apply({"params": params}, tokens, segment_ids)

Called with `hidden_only=True`, a model returns its final normed hidden states [b, t, m] instead,
which its family's `output_logits(config, params, x)` maps to the same logits, a chunk of the
sequence at a time if asked (the train step's chunked loss).

Every parameter and the key activations carry logical axis names (`layers.logical`), which
`mosaics_jax.sharding` maps onto a device mesh; `init_boxed` gives the parameters with them.

With `model.scan_layers` the blocks are one module, `SCANNED`, applied by `nn.scan`: each of its
parameters (and of its decode cache's arrays) has a leading layer axis, whose logical name is
`SCANNED` too (replicated: no mesh axis shards it). `families.stack_layers` and `unstack_layers`
convert between the layouts; the scanned model initialises as the unrolled one, stacked.

Axis legend: b = batch, t = time, m = model width, v = vocabulary.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from kernels_pallas import remat as kernels_remat
from mosaics_jax import config as config_lib
from mosaics_jax.model import cache as cache_lib, layers

# The module of the scanned blocks and the logical name of their leading layer axis; the key of
# their stacked caches in `Cache.layers` (`cache.STACKED`).
SCANNED = cache_lib.STACKED


def check_inputs(
    tokens: jax.Array | np.ndarray,
    segment_ids: jax.Array | np.ndarray | None,
    max_length: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """(tokens, segment_ids) as JAX arrays; raises ValueError naming the problem with either."""
  # Out-of-range token ids cannot be checked under jit; the data pipeline checks them.
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(
        f"tokens must be an integer array [batch, seq], got {tokens.dtype} {tokens.shape}"
    )
  if segment_ids is not None and (
      segment_ids.shape != tokens.shape or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
  ):
    raise ValueError(
        f"segment_ids must be an integer array of the tokens' shape {tokens.shape}, got"
        f" {segment_ids.dtype} {segment_ids.shape}"
    )
  if segment_ids is not None:
    _check_contiguous(segment_ids)
  if max_length is not None and tokens.shape[1] > max_length:
    raise ValueError(
        f"sequence length {tokens.shape[1]} exceeds the model's block_size {max_length}"
    )
  return jnp.asarray(tokens), None if segment_ids is None else jnp.asarray(segment_ids)


def _check_contiguous(segment_ids: jax.Array | np.ndarray) -> None:
  """Raises unless the ids are non-decreasing along each row, where their values are known.

  Documents are contiguous runs (the packing the data pipeline produces): the memories mask pairs
  by id equality, but the key recurrences and the bandwidth's counts restart where the id changes,
  so ids that come back ([0, 0, 1, 1, 0, 0]) would mean two things at once. Under jit the values
  are not known; `Pretrained.logits` checks before it jits.
  """
  try:
    ids = np.asarray(segment_ids)
  except jax.errors.TracerArrayConversionError:
    return
  rows, steps = np.nonzero(np.diff(ids, axis=1) < 0)
  if rows.size:
    raise ValueError(
        "segment_ids must be non-decreasing along each row (each document a contiguous run);"
        f" row {rows[0]} goes from {ids[rows[0], steps[0]]} to {ids[rows[0], steps[0] + 1]} at"
        f" position {steps[0] + 1}"
    )


def _norm_init(init: nn.initializers.Initializer) -> nn.initializers.Initializer:
  return layers.logical(init, "norm")


def layer_norm(
    cfg: config_lib.MosaicV1Config | config_lib.MosaicV1LibraryConfig | config_lib.GPT2Config,
    name: str,
) -> nn.LayerNorm:
  """The LayerNorm of v1 (nanoMosaics' and the Library's) and GPT-2 (biases if cfg.bias)."""
  return nn.LayerNorm(
      cfg.layer_norm_eps,
      use_bias=cfg.bias,
      scale_init=_norm_init(nn.initializers.ones_init()),
      bias_init=_norm_init(nn.initializers.zeros_init()),
      name=name,
  )


def rms_norm(cfg: config_lib.MosaicV2Config | config_lib.LlamaConfig, name: str) -> nn.RMSNorm:
  """The RMSNorm of v2 and Llama blocks (pre-norm)."""
  return nn.RMSNorm(
      cfg.norm_eps,
      dtype=jnp.dtype(cfg.dtype),
      scale_init=_norm_init(nn.initializers.ones_init()),
      name=name,
  )


def embed(cfg: config_lib.ModelConfig, init: nn.initializers.Initializer, name: str) -> nn.Embed:
  """The token embedding [vocab, width]."""
  return nn.Embed(
      cfg.vocab_size,
      cfg.width,
      embedding_init=layers.logical(init, "vocab", "embed"),
      dtype=jnp.dtype(cfg.dtype),
      name=name,
  )


def classifier(
    cfg: config_lib.ModelConfig, init: nn.initializers.Initializer, name: str = "classifier"
) -> nn.Dense:
  """An untied output layer [width, vocab] without bias: v2's and Llama's, the Library's "head"."""
  return nn.Dense(
      cfg.vocab_size,
      use_bias=False,
      kernel_init=layers.logical(init, "embed", "vocab"),
      dtype=jnp.dtype(cfg.dtype),
      name=name,
  )


# The output layers below are applied to parameters that exist: no initializer runs.
_NO_INIT = nn.initializers.zeros_init()


def untied_logits(
    cfg: config_lib.MosaicV2Config | config_lib.LlamaConfig,
    params: Mapping[str, Any],
    x: Float[Array, "b t m"],
) -> Float[Array, "b t v"]:
  """The logits of final hidden states x through the classifier of the model's `params`, as
  `untied_decoder` computes them."""
  return logits(classifier(cfg, _NO_INIT).apply({"params": params["classifier"]}, x))


def attend(
    cfg: config_lib.ModelConfig, embedding: Mapping[str, Any], x: Float[Array, "b t m"]
) -> Float[Array, "b t v"]:
  """x times the transposed embedding `embedding` (an `embed`'s params): a tied classifier."""
  return embed(cfg, _NO_INIT, "embed").apply({"params": embedding}, x, method="attend")


def hidden_states(x: Float[Array, "b t m"], cache: cache_lib.Cache | None) -> Float[Array, "b t m"]:
  """The final normed hidden states x, what a model called with `hidden_only=True` returns."""
  if cache is not None:
    raise ValueError("hidden_only returns no decode cache: call the model without one")
  return x


def residual(x: Float[Array, "b t m"]) -> Float[Array, "b t m"]:
  """The residual stream, sharded as its logical axes say."""
  return layers.constrain(x, "batch", "length", "embed")


def logits(x: Float[Array, "b t v"]) -> Float[Array, "b t v"]:
  """The classifier's output as float32 logits, sharded over the vocabulary."""
  return layers.constrain(x, "batch", "length", "vocab").astype(jnp.float32)


class LanguageModel(layers.PlainInit):
  """A model of the zoo: `init` gives plain arrays, `init_boxed` them with logical axis names.

  Called with a decode cache (`init_cache`), a model runs on a chunk of tokens that continues the
  cache's streams and returns (logits, the cache after the chunk) (`cache.py`).
  """

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int, dtype: str | None = None) -> cache_lib.Cache:
    """An empty decode cache for `batch` rows of at most `max_len` tokens each, its pairs in
    `dtype` (default: the compute dtype), a floating dtype.

    Feeding a row more than max_len tokens raises a ValueError (under jit: `cache.check`), unless
    every memory keeps a ring of its whole band (v2 without long-term memory, max_len at least
    the h - 1 pairs of its window), which has no limit.
    """
    # Imported here: the registry of families imports the models.
    from mosaics_jax.model import families  # pylint: disable=import-outside-toplevel

    cfg = self.config
    dtype = jnp.dtype(dtype or cfg.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"the cache holds keys and values in a floating dtype, got {dtype}")
    family = families.of(cfg)
    cache = family.init_cache(cfg, batch, max_len, dtype)
    if not cfg.scan_layers:
      return cache
    per_layer = [cache.layers[family.layer_name(i)] for i in range(cfg.num_layers)]
    return cache.replace(layers={SCANNED: jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)})

  @nn.nowrap
  def init_boxed(self, *args, **kwargs):
    """`nn.Module.init`, parameters boxed with their logical axis names; with scan_layers, the
    unrolled model's, stacked: the same values for the same rng (its layer index sets each
    layer's initialisation, and its layer names the rng of each)."""
    if not self.config.scan_layers:
      return super().init_boxed(*args, **kwargs)
    from mosaics_jax.model import families  # pylint: disable=import-outside-toplevel

    unrolled = families.build_model(dataclasses.replace(self.config, scan_layers=False))
    variables = unrolled.init_boxed(*args, **kwargs)
    return {**variables, "params": families.stack_layers(variables["params"], self.config)}


# What each `model.remat_policy` keeps of a block for the backward pass; the rest is recomputed
# there, from the block's input. "Retrieval" is every memory's read-out and the residuals its
# custom backward reads (each row's max and sum; `kernels_pallas.remat`): the memories of v1 and
# v2, the v1 persistent memory and the baselines' attention; not the dense retrieval of training
# with attention dropout (`layers.dropped_retrieve`), the Library's persistent memory, nor the
# "reference" and "shift" implementations, recomputed as by "full". "Dots" are the matmuls
# without batch dimensions: every projection (W_k, W_v, W_o, the SwiGLU's and the MLP's), not the
# retrieval's batched products. The step's FLOPs of each: `analysis.flops.step_flops`; its
# memory: `analysis.memory_plan`.
#
# | policy                  | saves                  | recomputes in the backward    | MaxText's  |
# |-------------------------|------------------------|-------------------------------|------------|
# | none                    | everything             | nothing                       |            |
# | full                    | the block's input      | the whole block               | full       |
# | save_retrieval          | + retrieval read-outs  | all but the retrieval         |            |
# | save_dots               | + projection outputs   | norms, features, retrieval    | minimal    |
# | save_dots_and_retrieval | + both                 | norms, features (elementwise) |            |
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "save_retrieval": jax.checkpoint_policies.save_only_these_names(kernels_remat.NAME),
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_dots_and_retrieval": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(kernels_remat.NAME),
    ),
}


def maybe_remat(block: type[nn.Module], cfg: config_lib.ModelConfig) -> type[nn.Module]:
  """The block, rematerialised in the backward pass as cfg.remat_policy (or remat) says
  (`REMAT_POLICIES`); `deterministic` stays static."""
  policy = cfg.effective_remat_policy
  if policy == "none":
    return block
  # static_argnums counts the module as argument 0, as the signature does `self`.
  deterministic = list(inspect.signature(block.__call__).parameters).index("deterministic")
  return nn.remat(block, static_argnums=(deterministic,), policy=REMAT_POLICIES[policy])


def stack(
    cfg: config_lib.ModelConfig,
    block: type[nn.Module],
    x: Float[Array, "b t m"],
    segment_ids: Int[Array, "b t"] | None,
    deterministic: bool,
    cache: cache_lib.Cache | None = None,
    chunk: cache_lib.Chunk | None = None,
    *,
    name: Callable[[int], str] | None = None,
    indexed: bool = False,
    block_args: tuple = (),
) -> tuple[Float[Array, "b t m"], dict[str, Any] | None]:
  """The `num_layers` blocks of a decoder, each output under the residual constraint: layer i is
  `block(cfg, i if indexed, name=name(i))`, called as (x, segment_ids, *block_args,
  deterministic), rematerialised by `maybe_remat`, and with `cache=` and `chunk=` when decoding.
  Returns x and, with a cache, each layer's cache after the chunk by layer name (else None).

  With cfg.scan_layers the layers are one block `SCANNED` under `nn.scan` (rematerialised before
  it is scanned), built as layer 0: the layer index sets only initialisations, which
  `LanguageModel.init_boxed` takes from the unrolled model. Its cache is `cache.layers[SCANNED]`,
  stacked like its parameters, and so is the cache it returns."""
  if cfg.scan_layers:
    return _scanned(cfg, block, x, segment_ids, deterministic, cache, chunk, indexed, block_args)
  name = name or layer_name
  if cache is None:
    block = maybe_remat(block, cfg)
  layer_caches = None if cache is None else {}
  for i in range(cfg.num_layers):
    layer = block(cfg, *((i,) if indexed else ()), name=name(i))
    if cache is None:
      x = residual(layer(x, segment_ids, *block_args, deterministic))
    else:
      x, layer_caches[name(i)] = layer(
          x, None, *block_args, deterministic, cache=cache.layers[name(i)], chunk=chunk
      )
      x = residual(x)
  return x, layer_caches


def _scanned(cfg, block, x, segment_ids, deterministic, cache, chunk, indexed, block_args):
  """`stack` with cfg.scan_layers."""
  if cache is None:
    block = maybe_remat(block, cfg)

  def body(layer, x, layer_cache):
    if layer_cache is None:
      return residual(layer(x, segment_ids, *block_args, deterministic)), None
    x, layer_cache = layer(x, None, *block_args, deterministic, cache=layer_cache, chunk=chunk)
    return residual(x), layer_cache

  scan = nn.scan(
      body,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: SCANNED},
  )
  layer = block(cfg, *((0,) if indexed else ()), name=SCANNED)
  x, layer_caches = scan(layer, x, None if cache is None else cache.layers[SCANNED])
  return x, None if cache is None else {SCANNED: layer_caches}


def untied_decoder(
    cfg: config_lib.MosaicV2Config | config_lib.LlamaConfig,
    tokens: Int[Array, "b t"],
    segment_ids: Int[Array, "b t"] | None,
    block: type[nn.Module],
    block_args: tuple,
    deterministic: bool,
    cache: cache_lib.Cache | None = None,
    lengths: Int[Array, " b"] | None = None,
    hidden_only: bool = False,
):
  """Embedding, `num_layers` pre-norm blocks, final RMSNorm and an untied classifier: the frame of
  v2 and Llama, initialised as the v2 paper's Table 6 says. Called inside a compact `__call__`
  after `check_inputs`; `block(cfg, i)` is layer i, called as (x, segment_ids, *block_args,
  deterministic), and with `cache=` and `chunk=` when decoding. Returns the logits, with a
  cache (logits, the cache after the chunk), with `hidden_only` the final RMSNorm's output."""
  init = layers.truncated_normal(layers.depth_scaled_std(cfg.width, 0))
  x = embed(cfg, init, "embed")(tokens)
  x = residual(nn.Dropout(cfg.dropout, deterministic=deterministic)(x))
  chunk = (
      None if cache is None else cache_lib.chunk_of(cache, segment_ids, lengths, tokens.shape[1])
  )
  x, layer_caches = stack(
      cfg, block, x, segment_ids, deterministic, cache, chunk, indexed=True, block_args=block_args
  )
  x = rms_norm(cfg, "final_norm")(x)
  if hidden_only:
    return hidden_states(x, cache)
  out = logits(classifier(cfg, init)(x))
  if cache is None:
    return out
  return cache_lib.advance(cache, chunk, layer_caches, out)


def layer_name(index: int) -> str:
  """The module name of layer `index` in v2 and Llama (v1 keeps nanoMosaics' `h_{i}`)."""
  return f"layer_{index}"
