"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Axis legend: b = batch, v = vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

# Temperatures below float32's smallest normal number are greedy: in float32 they are 0 or
# subnormal (flushed to 0 on some backends), and the logits divided by them overflow.
GREEDY_BELOW = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to draw tokens: temperature 0 (or below GREEDY_BELOW, ~1.2e-38) is greedy (argmax);
  top_k keeps the k likeliest tokens and top_p the smallest set whose probability reaches p,
  before drawing at the temperature."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):
      raise ValueError(f"temperature must be >= 0 and finite (0: greedy), got {self.temperature}")
    if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
      raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")


def sample(logits: Float[Array, "b v"], key: jax.Array, sampling: Sampling) -> Int[Array, " b"]:
  """One token per row."""
  logits = logits.astype(jnp.float32)
  if sampling.temperature < GREEDY_BELOW:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # The best token at 0 and the others below it before dividing: however small the temperature,
  # the quotients are 0 for the best and <= 0 (-inf at worst) for the others, never NaN.
  top = jnp.max(logits, axis=-1, keepdims=True)
  logits = jnp.where(logits == top, 0.0, logits - top) / sampling.temperature
  if sampling.top_k is not None:
    k = min(sampling.top_k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token stays if the likelier tokens before it do not reach p yet: the first always stays.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < sampling.top_p
    keep = (
        jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    )
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
