"""The v1 paper's one-layer context memory on continuous inputs (section 3, the three moons), as
the official `ThreeMoons/model.py` (`ContextMemory`) computes it with the scripts' options.

    k_t = W_phi x_t,  v_t = W_psi x_{t+1},  q_t = attn_scale k_t
    y_t = sum_h W_z[h] sum_{s <= t - 1} softmax_s(q_t . k_s)[h] v_s[h],  y_0 = 0

y_t predicts x_{t+1}. The pair (k_s, v_s) is complete at time s + 1, so the band of
`kernels_pallas.retrieve` is lo = 1, hi = None: its empty first row outputs 0, as the official
code zeroes the attention of its first v_shift = 1 rows. The maps are complex-structured
(`complexify`) when `complex` is set. Matrices are stored [in, out] (x @ W), the transpose of
MLX's; complex-structured matrices are closed under transposition, so the maps are the same set.

Not a language-model family (`families.FAMILIES`): it reads continuous vectors, has no vocabulary
or cache, and trains on a clipped squared error (`mosaics_jax.train.moons`).

Axis legend: b = batch, t = time, f = input features, h = heads, d = head dim, i and o = a matrix's
input and output dims, n = generated steps.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

import kernels_pallas
from mosaics_jax import config as config_lib


def complexify(w: Float[Array, "i o"]) -> Float[Array, "i o"]:
  """The orthogonal projection of `w` onto complex-structured matrices: every 2 x 2 block becomes
  [[a, b], [-b, a]] (a complex number acting on pairs of coordinates), with a and b the means of
  the block's diagonal and of its antidiagonal up to sign (the official `complexify`)."""
  rows, cols = w.shape
  blocks = w.reshape(rows // 2, 2, cols // 2, 2)
  a = (blocks[:, 0, :, 0] + blocks[:, 1, :, 1]) / 2
  b = (blocks[:, 0, :, 1] - blocks[:, 1, :, 0]) / 2
  out = jnp.stack([jnp.stack([a, b], -1), jnp.stack([-b, a], -1)], 1)
  return out.reshape(rows, cols)


def _uniform_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """MLX's Linear initialisation: uniform in +-1/sqrt(fan in), fan in the first dim."""
  bound = shape[0] ** -0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class ContextMemory(nn.Module):
  """One context memory layer (module docstring). Returns (prediction, each head's contribution
  to it); the prediction is the sum of the contributions over heads."""

  config: config_lib.ContextMemoryConfig

  def _matrix(self, name: str, rows: int, cols: int) -> Float[Array, "i o"]:
    w = self.param(name, _uniform_init, (rows, cols))
    return complexify(w) if self.config.complex else w

  @nn.compact
  def __call__(
      self, x: Float[Array, "b t f"], observed: Int[Array, ""] | None = None
  ) -> tuple[Float[Array, "b t f"], Float[Array, "b t h f"]]:
    """With `observed`, only x[:, :observed] are observations: the pairs whose value would read a
    later input (s >= observed - 1) keep their keys and hold the value 0, as the official
    `generate` caches them (its values of the last observed and of generated steps are its
    padding)."""
    c = self.config
    b, t, f = x.shape
    if f != c.input_dim:
      raise ValueError(f"inputs have {f} features, the model takes input_dim {c.input_dim}")
    width = c.n_head * c.h_dim
    w_k = self._matrix("key", f, width)
    w_v = self._matrix("value", f, width)
    k = (x @ w_k).reshape(b, t, c.n_head, c.h_dim)
    # v_s = W_psi x_{s+1}; the last row has no next input and is never read (lo = 1).
    v = jnp.pad(x[:, 1:] @ w_v, ((0, 0), (0, 1), (0, 0))).reshape(b, t, c.n_head, c.h_dim)
    if observed is not None:
      v = jnp.where((jnp.arange(t) < observed - 1)[None, :, None, None], v, 0.0)
    # Heads are independent: folded into the batch, the blocked XLA path runs [b h, t, 1, d]
    # arrays 1.6 to 2.5 times faster on CPU than [b, t, h, d] with h = 3, d = 2.
    fold = lambda a: a.transpose(0, 2, 1, 3).reshape(b * c.n_head, t, 1, c.h_dim)
    y = kernels_pallas.retrieve(
        fold(c.attn_scale * k),
        fold(k),
        fold(v),
        lo=1,
        impl=c.retrieve_impl,
        block_size=c.retrieve_block_size,
    )
    y = y.reshape(b, c.n_head, t, c.h_dim).transpose(0, 2, 1, 3)
    if c.out_proj:
      w_z = self._matrix("out", width, f).reshape(c.n_head, c.h_dim, f)
    else:  # The heads' outputs side by side.
      w_z = jnp.eye(width, dtype=x.dtype).reshape(c.n_head, c.h_dim, f)
    heads = jnp.einsum("bthd,hdf->bthf", y, w_z)
    return heads.sum(2), heads


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def rollout(
    config: config_lib.ContextMemoryConfig,
    params: dict,
    x: Float[Array, "b t f"],
    observed: Int[Array, ""],
    steps: int,
) -> Float[Array, "b n f"]:
  """Predictions of x[:, observed] .. x[:, observed + steps - 1] from x[:, :observed] alone: the
  first is the model's output at observed - 1; each later one reads the earlier predictions in
  place of the inputs (autoregressive) as queries and keys, while the memory's values are those
  of the observations only (`ContextMemory` with `observed`), as the official `generate` does.

  Every step recomputes the whole sequence (no cache): the output at t depends on x[:, :t + 1]
  only, so what lies beyond the step is never read. `x` needs observed + steps - 1 <= t, with
  observed >= 1; `observed` may be traced (one compilation serves every value).
  """
  model = ContextMemory(config)

  def step(j, carry):
    buffer, out = carry
    prediction = model.apply({"params": params}, buffer, observed)[0][:, observed - 1 + j]
    out = out.at[:, j].set(prediction)
    # The last prediction would land one past the buffer: clamped, it rewrites an unread row.
    at = jnp.minimum(observed + j, buffer.shape[1] - 1)
    buffer = jax.lax.dynamic_update_slice_in_dim(buffer, prediction[:, None], at, axis=1)
    return buffer, out

  out = jnp.zeros((x.shape[0], steps, x.shape[2]), x.dtype)
  return jax.lax.fori_loop(0, steps, step, (x, out))[1]
