"""Key and value feature extractors of Memory Mosaics (design.md).

v1 (nanoMosaics): leaky-average keys with a learned per-head scale, and values that mix the next
token's projection; v2: gated time-varying keys (Eq. 8) and convolutional values (Eq. 9).
Every recurrence runs in float32 through `kernels_pallas.linear_scan` and restarts at document
boundaries.

Axis legend: b = batch, t = time, m = model width, h = heads, d = head dim.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Shaped

import kernels_pallas
from kernels_pallas import scans
from mosaics_jax.model import layers


def l2_normalize(
    z: Float[Array, "... d"], eps: float | Float[Array, "... 1"]
) -> Float[Array, "... d"]:
  """Norm(z) = z / (||z||_2 + eps): 0 at z = 0, with a finite gradient there (1 / eps, or 1 when
  eps is 0)."""
  squares = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
  # The gradient of ||z|| is NaN at 0, where that of z / (||z|| + eps) is 1 / eps.
  positive = squares > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)
  denominator = norm + eps
  return z / jnp.where(denominator > 0, denominator, 1.0)


def next_in_document(
    v: Float[Array, "b t h d"], segment_ids: Int[Array, "b t"] | None
) -> Float[Array, "b t h d"]:
  """v_{t+1}, zero past the last position and past the end of each document."""
  nxt = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
  if segment_ids is None:
    return nxt
  same_doc = jnp.concatenate(
      [segment_ids[:, 1:] == segment_ids[:, :-1], jnp.zeros_like(segment_ids[:, :1], bool)], axis=1
  )
  return jnp.where(same_doc[:, :, None, None], nxt, 0)


@flax.struct.dataclass
class ValueMix:
  """v_t = scale * Norm(weight * v~_t + (1 - weight) * v~_{t+1}), per head: a value looks one step
  ahead, so the pair of position t is complete only once v~_{t+1} is known."""

  weight: Float[Array, " h"]
  scale: Float[Array, " h"]
  eps: float = flax.struct.field(pytree_node=False)

  def __call__(
      self, raw: Float[Array, "b t h d"], raw_next: Float[Array, "b t h d"]
  ) -> Float[Array, "b t h d"]:
    c = self.weight[:, None]
    return self.scale[:, None] * l2_normalize(c * raw + (1 - c) * raw_next, self.eps)


def _per_head(init: nn.initializers.Initializer) -> nn.initializers.Initializer:
  return layers.logical(init, "heads")


def _per_head_dense(features: int, bias: bool, init, dtype, name: str) -> nn.Dense:
  """A projection onto per-head features (h*d, heads-major, or one per head)."""
  return nn.Dense(
      features,
      use_bias=bias,
      kernel_init=layers.logical(init, "embed", "heads"),
      bias_init=_per_head(nn.initializers.zeros_init()),
      dtype=dtype,
      name=name,
  )


class LeakyAverage(nn.Module):
  """v1 leaky average kbar_t = k_t + lambda * kbar_{t-1}, lambda = exp(-|b| * exp_scaling).

  The parameter `leaky_key_beta` is nanoMosaics' b, stored divided by exp_scaling. With
  `unit_gain`, k_t enters as (1 - lambda) k_t, as the Library's.
  """

  num_heads: int
  exp_scaling: float
  init_range: tuple[float, float]
  scan_impl: str
  scan_chunk_size: int
  unit_gain: bool = False

  @nn.compact
  def __call__(
      self,
      k: Float[Array, "b t h d"],
      reset: Bool[Array, "b t"] | None,
      initial: Float[Array, "b h d"] | None = None,
  ) -> Float[Array, "b t h d"]:
    low, high = self.init_range
    b = self.param(
        "leaky_key_beta",
        layers.logical(lambda _, n: jnp.linspace(low, high, n) / self.exp_scaling, "heads"),
        self.num_heads,
    )
    decay = jnp.exp(-jnp.abs(b) * self.exp_scaling)
    k = k.astype(jnp.float32)
    return kernels_pallas.linear_scan(
        decay,
        k * (1 - decay)[:, None] if self.unit_gain else k,
        reset=reset,
        initial=initial,
        impl=self.scan_impl,
        chunk_size=self.scan_chunk_size,
    )


class KeyFeatureExtractorV1(nn.Module):
  """v1 keys: k_t = Norm(LeakyAverage(W_k x)_t) * exp(min(p * exp_scaling * s_k, key_scale_max)).

  `scale_pow` p is 1 for the contextual memory and 2 for the persistent memory, whose stored keys
  carry no scale. The result is float32.
  """

  num_heads: int
  bias: bool
  init_std: float
  exp_scaling: float
  key_scale_init: float
  key_scale_max: float
  leaky_init: tuple[float, float]
  eps: float
  scan_impl: str
  scan_chunk_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "b t m"],
      reset: Bool[Array, "b t"] | None,
      scale_pow: int,
      initial: Float[Array, "b h d"] | None = None,
  ) -> tuple[Float[Array, "b t h d"], Float[Array, "b t h d"]]:
    """(k, kbar): the keys, and the leaky average they normalise (a decode cache keeps its last
    state, the `initial` of the next call)."""
    k_proj = _per_head_dense(
        x.shape[-1], self.bias, nn.initializers.normal(self.init_std), self.dtype, "W_k"
    )(x)
    leaky_average = LeakyAverage(
        self.num_heads,
        self.exp_scaling,
        self.leaky_init,
        self.scan_impl,
        self.scan_chunk_size,
        name="leaky_avg",
    )
    kbar = leaky_average(layers.split_heads(k_proj, self.num_heads), reset, initial)
    scale = self.param(
        "key_scale", _per_head(nn.initializers.constant(self.key_scale_init)), (self.num_heads,)
    )
    log_scale = jnp.minimum(scale_pow * self.exp_scaling * scale, self.key_scale_max)
    return l2_normalize(kbar, self.eps) * jnp.exp(log_scale)[:, None], kbar


class ValueFeatureExtractorV1(nn.Module):
  """v1 values: v_t = Norm(c * v~_t + (1 - c) * v~_{t+1}) * exp(exp_scaling * s_v), v~ = W_v x."""

  num_heads: int
  bias: bool
  init_std: float
  exp_scaling: float
  val_scale_init: float
  eps: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "b t m"]) -> tuple[Float[Array, "b t h d"], ValueMix]:
    """(v~, the mixing that makes values of it), v~ in float32."""
    v = _per_head_dense(
        x.shape[-1], self.bias, nn.initializers.normal(self.init_std), self.dtype, "W_v"
    )(x)
    coef = self.param("coef", _per_head(nn.initializers.uniform(1.0)), (self.num_heads,))
    scale = self.param(
        "val_scale", _per_head(nn.initializers.constant(self.val_scale_init)), (self.num_heads,)
    )
    raw = layers.split_heads(v, self.num_heads).astype(jnp.float32)
    return raw, ValueMix(coef, jnp.exp(self.exp_scaling * scale), self.eps)


class GatedKeyExtractor(nn.Module):
  """v2 keys (Eq. 8): kbar_t = g_t * W_phi x_t + lambda_t * kbar_{t-1}, k_t = Norm(kbar_t).

  g_t = exp(w_g . x_t) and lambda_t = exp(-|w_lambda . x_t|) are one scalar per head and time.
  The result is float32 and unit-norm.
  """

  num_heads: int
  layer_index: int
  gate_bias: bool
  eps: float
  scan_impl: str
  scan_chunk_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "b t m"],
      reset: Bool[Array, "b t"] | None,
      initial: Float[Array, "b h d"] | None = None,
      initial_log_scale: Float[Array, "b h"] | None = None,
  ) -> tuple[Float[Array, "b t h d"], Float[Array, "b t h d"], Float[Array, "b t h"]]:
    """(k, kbar / exp(m), m): the unit keys, and the recurrence they normalise as a scaled state
    and its log-scale m, finite for any finite gates where kbar itself would overflow float32
    (about e^88). A decode cache keeps the last state and m, the `initial` and
    `initial_log_scale` of the next call."""
    width = x.shape[-1]
    init = layers.truncated_normal(layers.depth_scaled_std(width, self.layer_index))
    k = _per_head_dense(width, False, init, self.dtype, "W_phi")(x)
    # Gates stay float32: g_t is unbounded and the recurrence sums many of them.
    gate = _per_head_dense(self.num_heads, self.gate_bias, init, jnp.float32, "w_g")(x)
    forget = _per_head_dense(self.num_heads, self.gate_bias, init, jnp.float32, "w_lambda")(x)
    k = layers.split_heads(k, self.num_heads).astype(jnp.float32)
    # kbar = exp(log_scale) scaled, where scaled stays finite when exp(gate) and kbar overflow.
    scaled, log_scale = scans.gated_linear_scan(
        -jnp.abs(forget),
        gate,
        k,
        reset=reset,
        initial=initial,
        initial_log_scale=initial_log_scale,
        impl=self.scan_impl,
        chunk_size=self.scan_chunk_size,
    )
    # Norm(kbar) = scaled / (||scaled|| + eps exp(-log_scale)): the scale cancels exactly.
    unit = l2_normalize(scaled, self.eps * jnp.exp(-log_scale)[..., None])
    return unit, scaled, log_scale


class ConvValueExtractor(nn.Module):
  """v2 values (Eq. 9): v_t = alpha * Norm(gamma * v~_t + (1 - gamma) * v~_{t+1}), v~ = W_psi x.

  alpha = exp(min(|theta|, value_scale_max)); gamma ~ U(0, 1) per head (ASSUMED per head).
  """

  num_heads: int
  layer_index: int
  eps: float
  scale_init: float
  scale_max: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "b t m"]) -> tuple[Float[Array, "b t h d"], ValueMix]:
    """(v~, the mixing that makes values of it), v~ in float32."""
    width = x.shape[-1]
    init = layers.truncated_normal(layers.depth_scaled_std(width, self.layer_index))
    v = _per_head_dense(width, False, init, self.dtype, "W_psi")(x)
    gamma = self.param("gamma", _per_head(nn.initializers.uniform(1.0)), (self.num_heads,))
    theta = self.param(
        "theta", _per_head(nn.initializers.constant(self.scale_init)), (self.num_heads,)
    )
    alpha = jnp.exp(jnp.minimum(jnp.abs(theta), self.scale_max))
    raw = layers.split_heads(v, self.num_heads).astype(jnp.float32)
    return raw, ValueMix(gamma, alpha, self.eps)


def shifted(
    x: Shaped[Array, "b t ..."], offset: int, segment_ids: Int[Array, "b t"] | None
) -> Shaped[Array, "b t ..."]:
  """x_{t+offset}, zero outside the sequence and outside the document of t."""
  length = x.shape[1]
  if abs(offset) >= length:
    return jnp.zeros_like(x)
  pad = jnp.zeros_like(x[:, : abs(offset)])
  if offset >= 0:
    moved = jnp.concatenate([x[:, offset:], pad], axis=1)
  else:
    moved = jnp.concatenate([pad, x[:, : length + offset]], axis=1)
  if segment_ids is None or offset == 0:
    return moved
  inside = shifted(jnp.ones_like(segment_ids, bool), offset, None)
  same_doc = inside & (shifted(segment_ids, offset, None) == segment_ids)
  return jnp.where(same_doc.reshape(same_doc.shape + (1,) * (x.ndim - 2)), moved, 0)


class CausalConv(nn.Module):
  """y_t = sum_j x_{t+j-left} W_j + b over j < kernel_size, within t's document: PyTorch's
  `Conv1d` after `ZeroPad1d((left, kernel_size - 1 - left))` on a single document."""

  features: int
  kernel_size: int
  left: int  # Taps before t; negative: the window starts after t.
  bias: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x: Float[Array, "b t m"], segment_ids: Int[Array, "b t"] | None
  ) -> Float[Array, "b t n"]:
    fan_in = x.shape[-1] * self.kernel_size
    kernel = self.param(
        "kernel",
        layers.logical(nn.initializers.normal(fan_in**-0.5), "taps", "embed", "heads"),
        (self.kernel_size, x.shape[-1], self.features),
    )
    taps = [shifted(x, j - self.left, segment_ids) for j in range(self.kernel_size)]
    y = jnp.einsum("jbtm,jmn->btn", jnp.stack(taps).astype(self.dtype), kernel.astype(self.dtype))
    if self.bias:
      b = self.param("bias", _per_head(nn.initializers.zeros_init()), (self.features,))
      y = y + b.astype(self.dtype)
    return y


class LibraryFeatureExtractor(nn.Module):
  """The Library's `FeatureExtractor`: per-head features of x looking `shift` steps ahead, float32.

  "linearconv": a causal convolution whose window ends at t + shift; "lowrlinearconv":
  (1 - c) * W x_{t+shift} + c * W x_t, c per head. `normalize` makes them unit vectors, without
  eps (0 stays 0, where the Library gives NaN); `scale` (per head) multiplies them.
  """

  fe_type: str
  shift: int
  kernel_size: int
  num_heads: int
  bias: bool
  normalize: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "b t m"],
      segment_ids: Int[Array, "b t"] | None,
      scale: Float[Array, " h"] | None = None,
  ) -> tuple[Float[Array, "b t h d"], Float[Array, "b t h d"] | None, ValueMix | None]:
    """(the features; for normalised "lowrlinearconv" features, W x and the `ValueMix` that makes
    them of it, else None, None)."""
    width = x.shape[-1]
    scale = jnp.ones((self.num_heads,)) if scale is None else scale
    if self.fe_type == "linearconv":
      left = self.kernel_size - 1 - self.shift
      y = CausalConv(width, self.kernel_size, left, self.bias, self.dtype, name="conv")(
          x, segment_ids
      )
      y = layers.split_heads(y, self.num_heads).astype(jnp.float32)
      y = l2_normalize(y, 0.0) if self.normalize else y
      return y * scale[:, None], None, None
    z = _per_head_dense(
        width, self.bias, nn.initializers.normal(width**-0.5), self.dtype, "linear"
    )(x)
    z = layers.split_heads(z, self.num_heads).astype(jnp.float32)
    c = self.param("coef", _per_head(nn.initializers.uniform(1.0)), (self.num_heads,))
    if self.normalize:
      mix = ValueMix(c, scale, 0.0)
      return mix(z, shifted(z, self.shift, segment_ids)), z, mix
    y = shifted(z, self.shift, segment_ids) * (1 - c[:, None]) + z * c[:, None]
    return y * scale[:, None], None, None
