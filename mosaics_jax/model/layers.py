"""Building blocks shared by the model families: initialisers, logical axes, SwiGLU, RoPE.

Every parameter and the key activations carry logical axis names, which `mosaics_jax.sharding`
maps onto mesh axes with `MeshConfig.rules`: batch, length, embed (model width), heads (per-head
parameters, and the h*d dimension of per-head projections, heads-major), kv (head dim), mlp (SwiGLU
width), vocab, norm (norm scales and biases), pmem and pairs (v1 persistent memories).

Axis legend: b = batch, t = time, m = model width, f = SwiGLU width, h = heads, d = head dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

import kernels_pallas
from kernels_pallas import bands as bands_lib


def logical(init: nn.initializers.Initializer, *names: str) -> nn.initializers.Initializer:
  """`init` whose parameter carries the logical axis names of its dimensions."""
  return nn.with_logical_partitioning(init, names)


def constrain(x: Any, *names: str | None) -> Any:
  """x sharded as its logical axis names say; a no-op outside `nn.logical_axis_rules`."""
  return nn.with_logical_constraint(x, names)


def dropped_retrieve(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t h d"],
    v: Float[Array, "b t h e"],
    *,
    lo: int,
    hi: int | None,
    segment_ids: Int[Array, "b t"] | None,
    dropout: Callable[[jax.Array], jax.Array],
) -> Float[Array, "b t h e"]:
  """`retrieve` with `dropout` on its attention weights, densely (O(t^2)): what the Library's
  ic_dropout and nanoGPT's attn_dropout do in training. A query with no pair reads nothing."""
  scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
  time = jnp.arange(k.shape[1])
  mask = bands_lib.band_mask(time[:, None], time[None, :], lo, hi)[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  weights = jnp.where(mask.any(-1, keepdims=True), weights, 0.0)
  return jnp.einsum("bhts,bshe->bthe", dropout(weights), v.astype(jnp.float32)).astype(v.dtype)


def retrieve(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t h d"],
    v: Float[Array, "b t h e"],
    *,
    lo: int | jax.Array,
    hi: int | None,
    segment_ids: Int[Array, "b t"] | None,
    impl: str,
    selection: kernels_pallas.BlockSelection | None = None,
) -> Float[Array, "b t h e"]:
  """`kernels_pallas.retrieve` (or `retrieve_selected` with a block `selection`), run shard by
  shard when a mesh is set (`jax.set_mesh`).

  Rows and heads never interact in the op, so each device computes its own (batch, heads) shard
  with no communication. `shard_map` says so explicitly: XLA cannot partition a Pallas kernel
  itself (nor should it guess for the blocked XLA path). The op is compiled for the platform of
  the mesh's devices, which need not be the host's (`mosaics_jax.aot` compiles for TPUs on a CPU).
  """
  mesh = jax.sharding.get_abstract_mesh()
  # An abstract mesh built without devices has no platform: then JAX's default backend.
  device = None if mesh.empty else mesh.abstract_device
  backend = None if device is None else device.platform
  op = kernels_pallas.retrieve
  if selection is not None:
    op = functools.partial(kernels_pallas.retrieve_selected, selection=selection)
  call = functools.partial(op, hi=hi, impl=impl, backend=backend)
  if mesh.empty or mesh.size == 1:
    return call(q, k, v, lo=lo, segment_ids=segment_ids)
  batch, _, heads, _ = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
  heads_spec = PartitionSpec(batch, None, heads, None)
  # Optional operands go in only when present; a Python int lo stays static (compiled in).
  optional = []
  if segment_ids is not None:
    optional.append((segment_ids, PartitionSpec(batch, None)))
  traced_lo = not isinstance(lo, int)
  if traced_lo:
    optional.append((jnp.asarray(lo, jnp.int32), PartitionSpec()))

  def per_shard(q, k, v, *rest):
    rest = list(rest)
    shard_segments = rest.pop(0) if segment_ids is not None else None
    shard_lo = rest.pop(0) if traced_lo else lo
    return call(q, k, v, lo=shard_lo, segment_ids=shard_segments)

  specs = (heads_spec,) * 3 + tuple(spec for _, spec in optional)
  args = (q, k, v) + tuple(x for x, _ in optional)
  # check_vma=False: pallas_call's outputs carry no varying-axes type for shard_map to check.
  return jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=heads_spec, check_vma=False)(
      *args
  )


class PlainInit(nn.Module):
  """A module whose `init` gives plain arrays and `init_boxed` them with logical axis names."""

  @nn.nowrap
  def init(self, *args, **kwargs):
    """`nn.Module.init`, its variables plain arrays."""
    return nn.meta.unbox(self.init_boxed(*args, **kwargs))

  @nn.nowrap
  def init_boxed(self, *args, **kwargs):
    """`nn.Module.init`, every parameter an `nn.LogicallyPartitioned` holding its axis names."""
    return super().init(*args, **kwargs)


def truncated_normal(std: float) -> nn.initializers.Initializer:
  """Normal(0, std) truncated at +-3 std (v2 paper, Table 6)."""
  return nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def depth_scaled_std(fan_in: int, layer_index: int) -> float:
  """sigma = 1 / sqrt(2 * fan_in * (l + 1)) of the v2 paper's Table 6 (l counted from 0)."""
  return 1.0 / math.sqrt(2.0 * fan_in * (layer_index + 1))


class SwiGLU(PlainInit):
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
    gate = dense(self.hidden, logical(in_init, "embed", "mlp"), "w1")(x)
    up = dense(self.hidden, logical(in_init, "embed", "mlp"), "w3")(x)
    hidden = constrain(nn.silu(gate) * up, "batch", "length", "mlp")
    return dense(width, logical(out_init, "mlp", "embed"), "w2")(hidden)


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
