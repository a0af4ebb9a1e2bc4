"""Language models of the zoo: Memory Mosaics v1, Memory Mosaics v2, and the Llama baseline.

Every model maps (tokens, segment_ids) to logits and is functional: `init` gives a plain params
pytree, `apply` is pure. Packed sequences carry `segment_ids` (one id per document, documents are
contiguous runs); no memory, recurrence or attention ever crosses a document boundary.

    model = build_model(config)
    params = model.init(rng, tokens)["params"]
    logits = model.apply({"params": params}, tokens, segment_ids)

Every parameter and the key activations carry logical axis names (`layers.logical`), which
`mosaics_jax.sharding` maps onto a device mesh; `init_boxed` gives the parameters with them.

Axis legend: b = batch, t = time, m = model width, v = vocabulary.
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mosaics_jax import attention, config as config_lib, layers, memories


def _check_inputs(tokens: jax.Array, segment_ids: jax.Array | None) -> None:
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


def _norm_init(init: nn.initializers.Initializer) -> nn.initializers.Initializer:
  return layers.logical(init, "norm")


def _layer_norm(cfg: config_lib.MosaicV1Config, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      cfg.layer_norm_eps,
      use_bias=cfg.bias,
      scale_init=_norm_init(nn.initializers.ones_init()),
      bias_init=_norm_init(nn.initializers.zeros_init()),
      name=name,
  )


def _rms_norm(cfg: config_lib.MosaicV2Config | config_lib.LlamaConfig, name: str) -> nn.RMSNorm:
  return nn.RMSNorm(
      cfg.norm_eps,
      dtype=jnp.dtype(cfg.dtype),
      scale_init=_norm_init(nn.initializers.ones_init()),
      name=name,
  )


def _embed(cfg: config_lib.ModelConfig, init: nn.initializers.Initializer, name: str) -> nn.Embed:
  return nn.Embed(
      cfg.vocab_size,
      cfg.width,
      embedding_init=layers.logical(init, "vocab", "embed"),
      dtype=jnp.dtype(cfg.dtype),
      name=name,
  )


def _classifier(cfg: config_lib.ModelConfig, init: nn.initializers.Initializer) -> nn.Dense:
  return nn.Dense(
      cfg.vocab_size,
      use_bias=False,
      kernel_init=layers.logical(init, "embed", "vocab"),
      dtype=jnp.dtype(cfg.dtype),
      name="classifier",
  )


def _residual(x: Float[Array, "b t m"]) -> Float[Array, "b t m"]:
  return layers.constrain(x, "batch", "length", "embed")


def _logits(x: Float[Array, "b t v"]) -> Float[Array, "b t v"]:
  return layers.constrain(x, "batch", "length", "vocab").astype(jnp.float32)


class LanguageModel(layers.PlainInit):
  """A model of the zoo: `init` gives plain arrays, `init_boxed` them with logical axis names."""


def _maybe_remat(block: type[nn.Module], remat: bool) -> type[nn.Module]:
  """The block, rematerialised in the backward pass if asked; `deterministic` (last) stays static."""
  if not remat:
    return block
  # static_argnums counts the module as argument 0.
  return nn.remat(block, static_argnums=(len(inspect.signature(block.__call__).parameters) - 1,))


class MosaicV1Block(nn.Module):
  """nanoMosaics Block: x += ContextMem(LN1 x); x += PersistentMem(LN2 x) (pre-LayerNorm)."""

  config: config_lib.MosaicV1Config

  @nn.compact
  def __call__(self, x, segment_ids, deterministic: bool):
    cfg = self.config
    ln = lambda name: _layer_norm(cfg, name)
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    x = x + drop(memories.ContextMemory(cfg, name="attn")(ln("ln_1")(x), segment_ids))
    x = x + drop(memories.PersistentMemoryV1(cfg, name="mlp")(ln("ln_2")(x), segment_ids))
    return x


class MosaicV1(LanguageModel):
  """Memory Mosaics v1 with nanoMosaics' parameter names: wte (tied LM head), h_{i}, ln_f."""

  config: config_lib.MosaicV1Config

  @nn.compact
  def __call__(
      self,
      tokens: Int[Array, "b t"],
      segment_ids: Int[Array, "b t"] | None = None,
      *,
      deterministic: bool = True,
  ) -> Float[Array, "b t v"]:
    cfg = self.config
    _check_inputs(tokens, segment_ids)
    if tokens.shape[1] > cfg.block_size:
      raise ValueError(
          f"sequence length {tokens.shape[1]} exceeds the model's block_size {cfg.block_size}"
      )
    wte = _embed(cfg, nn.initializers.normal(cfg.init_std), "wte")
    x = _residual(nn.Dropout(cfg.dropout, deterministic=deterministic)(wte(tokens)))
    block = _maybe_remat(MosaicV1Block, cfg.remat)
    for i in range(cfg.num_layers):
      x = _residual(block(cfg, name=f"h_{i}")(x, segment_ids, deterministic))
    x = _layer_norm(cfg, "ln_f")(x)
    return _logits(wte.attend(x))


class MosaicV2Block(nn.Module):
  """x += W_o [ShortTerm(N1 x); LongTerm(N1 x)];  x += SwiGLU(N2 x)   (SPEC §3)."""

  config: config_lib.MosaicV2Config
  layer_index: int

  @nn.compact
  def __call__(self, x, segment_ids, ltm_delay, deterministic: bool):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    h = _rms_norm(cfg, "norm1")(x)
    outputs = [
        memories.AssociativeMemory(
            cfg, self.layer_index, hi=cfg.short_term_window - 1, name="short_term"
        )(h, segment_ids, 1)
    ]
    if cfg.long_term_memory:
      y = memories.AssociativeMemory(cfg, self.layer_index, hi=None, name="long_term")(
          h, segment_ids, ltm_delay
      )
      outputs.append(jnp.zeros_like(y) if cfg.drop_long_term_memory else y)
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
    h = _rms_norm(cfg, "norm2")(x)
    ffn = layers.SwiGLU(cfg.ffn_width, self.layer_index, dtype=dtype, name="ffn")
    return x + drop(ffn(h))


class MosaicV2(LanguageModel):
  """Memory Mosaics v2: untied embedding and classifier, RMSNorm pre-norm blocks."""

  config: config_lib.MosaicV2Config

  @nn.compact
  def __call__(
      self,
      tokens: Int[Array, "b t"],
      segment_ids: Int[Array, "b t"] | None = None,
      *,
      ltm_delay: int | jax.Array | None = None,
      deterministic: bool = True,
  ) -> Float[Array, "b t v"]:
    """`ltm_delay` is the long-term delay m (may be traced); None uses config.long_term_delay."""
    cfg = self.config
    _check_inputs(tokens, segment_ids)
    ltm_delay = cfg.long_term_delay if ltm_delay is None else ltm_delay
    init = layers.truncated_normal(layers.depth_scaled_std(cfg.width, 0))
    x = _embed(cfg, init, "embed")(tokens)
    x = _residual(nn.Dropout(cfg.dropout, deterministic=deterministic)(x))
    block = _maybe_remat(MosaicV2Block, cfg.remat)
    for i in range(cfg.num_layers):
      x = _residual(block(cfg, i, name=f"layer_{i}")(x, segment_ids, ltm_delay, deterministic))
    x = _rms_norm(cfg, "final_norm")(x)
    return _logits(_classifier(cfg, init)(x))


class LlamaBlock(nn.Module):
  """x += Attention(N1 x); x += SwiGLU(N2 x)."""

  config: config_lib.LlamaConfig
  layer_index: int

  @nn.compact
  def __call__(self, x, segment_ids, deterministic: bool):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    h = _rms_norm(cfg, "attn_norm")(x)
    x = x + drop(attention.Attention(cfg, self.layer_index, name="attention")(h, segment_ids))
    h = _rms_norm(cfg, "ffn_norm")(x)
    return x + drop(layers.SwiGLU(cfg.ffn_width, self.layer_index, dtype=dtype, name="ffn")(h))


class Llama(LanguageModel):
  """The Transformer baseline: Llama blocks, untied embedding and classifier.

  Initialisation follows the v2 paper's Table 6 like the Memory Mosaics it is compared with
  (ASSUMED: the paper does not give the baseline's).
  """

  config: config_lib.LlamaConfig

  @nn.compact
  def __call__(
      self,
      tokens: Int[Array, "b t"],
      segment_ids: Int[Array, "b t"] | None = None,
      *,
      deterministic: bool = True,
  ) -> Float[Array, "b t v"]:
    cfg = self.config
    _check_inputs(tokens, segment_ids)
    init = layers.truncated_normal(layers.depth_scaled_std(cfg.width, 0))
    x = _embed(cfg, init, "embed")(tokens)
    x = _residual(nn.Dropout(cfg.dropout, deterministic=deterministic)(x))
    block = _maybe_remat(LlamaBlock, cfg.remat)
    for i in range(cfg.num_layers):
      x = _residual(block(cfg, i, name=f"layer_{i}")(x, segment_ids, deterministic))
    x = _rms_norm(cfg, "final_norm")(x)
    return _logits(_classifier(cfg, init)(x))


MODELS: dict[str, type[LanguageModel]] = {"mm1": MosaicV1, "mm2": MosaicV2, "llama": Llama}


def build_model(config: config_lib.ModelConfig) -> LanguageModel:
  """The Flax module of a model config."""
  return MODELS[config.family](config)
