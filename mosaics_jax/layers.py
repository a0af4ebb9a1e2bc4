"""Building blocks shared by the model families: initialisers, norms, SwiGLU, RoPE.

Axis legend: b = batch, t = time, m = model width, f = SwiGLU width, h = heads, d = head dim.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def truncated_normal(std: float) -> nn.initializers.Initializer:
  """Normal(0, std) truncated at +-3 std (v2 paper, Table 6)."""
  return nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def depth_scaled_std(fan_in: int, layer_index: int) -> float:
  """sigma = 1 / sqrt(2 * fan_in * (l + 1)) of the v2 paper's Table 6 (l counted from 0)."""
  return 1.0 / math.sqrt(2.0 * fan_in * (layer_index + 1))


class SwiGLU(nn.Module):
  """The v2 persistent memory: W2(silu(W1 x) * W3 x), with Table 6's depth-scaled init."""

  hidden: int
  layer_index: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "b t m"]) -> Float[Array, "b t m"]:
    width = x.shape[-1]
    in_init = truncated_normal(depth_scaled_std(width, self.layer_index))
    out_init = truncated_normal(depth_scaled_std(self.hidden, self.layer_index))
    dense = lambda n, init, name: nn.Dense(
        n, use_bias=False, kernel_init=init, dtype=self.dtype, name=name
    )
    gate = dense(self.hidden, in_init, "w1")(x)
    up = dense(self.hidden, in_init, "w3")(x)
    return dense(width, out_init, "w2")(nn.silu(gate) * up)


def rope(
    x: Float[Array, "b t h d"], positions: Int[Array, "b t"], theta: float
) -> Float[Array, "b t h d"]:
  """Rotary position embedding, rotating the two halves of each head (the "rotate-half" layout)."""
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * freqs  # [b t d/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def split_heads(x: Float[Array, "b t m"], num_heads: int) -> Float[Array, "b t h d"]:
  """[b, t, h*d] -> [b, t, h, d]; channel c = h * d + j, as nanoMosaics' `.view(B, nh, hs, T)`."""
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: Float[Array, "b t h d"]) -> Float[Array, "b t m"]:
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
