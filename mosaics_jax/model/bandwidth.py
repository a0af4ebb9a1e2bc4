"""Adaptive kernel bandwidth of the v2 associative memories (v2 paper Eq. 6 and Table 6).

    beta_t = beta1 * n_t ** alpha + beta0
    beta0 = exp(min(theta0, max)),  beta1 = exp(min(theta1, max)),  alpha = min(|theta_a|, 1)

n_t is the number of pairs visible to the query at time t, counted inside its document
(`kernels_pallas.visible_counts`). More pairs -> larger beta -> a narrower kernel.

Axis legend: b = batch, t = time, h = heads.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mosaics_jax.model import layers


def adaptive_bandwidth(
    counts: Int[Array, "b t"],
    theta0: Float[Array, " h"],
    theta1: Float[Array, " h"],
    theta_a: Float[Array, " h"],
    max_log: float,
) -> Float[Array, "b t h"]:
  """beta_t per head from the reparameterised (theta0, theta1, theta_a)."""
  beta0 = jnp.exp(jnp.minimum(theta0, max_log))
  beta1 = jnp.exp(jnp.minimum(theta1, max_log))
  alpha = jnp.minimum(jnp.abs(theta_a), 1.0)
  n = counts.astype(jnp.float32)[..., None]
  # n ** alpha at n = 0 is 0, but its derivative in alpha (n^a log n) is NaN: route n = 0 through 1.
  safe_n = jnp.where(n > 0, n, 1.0)
  n_pow = jnp.where(n > 0, safe_n**alpha, 0.0)
  return beta1 * n_pow + beta0


class AdaptiveBandwidth(nn.Module):
  """Holds (theta0, theta1, theta_a) per head (ASSUMED per head, per memory)."""

  num_heads: int
  initial: tuple[float, float, float]
  max_log: float

  @nn.compact
  def __call__(self, counts: Int[Array, "b t"]) -> Float[Array, "b t h"]:
    theta0, theta1, theta_a = (
        self.param(
            name, layers.logical(nn.initializers.constant(value), "heads"), (self.num_heads,)
        )
        for name, value in zip(("theta0", "theta1", "theta_a"), self.initial)
    )
    return adaptive_bandwidth(counts, theta0, theta1, theta_a, self.max_log)
