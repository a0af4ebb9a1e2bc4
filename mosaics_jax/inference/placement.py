"""Where inference's arrays live on a mesh: parameters and decode caches sharded as their logical
axes say (batch over the data axes, heads over tensor); without a mesh, as they are.

    with mesh_context(mesh, rules):
      params = put_params(model, params, mesh, rules, batch)
      ...  # Jitted calls that end with constrain_cache(cache).

Axis legend: b = batch, s = stored pairs, h = heads, d = head dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mosaics_jax import config as config_lib, sharding
from mosaics_jax.model import cache as cache_lib


def _cache_spec(path: tuple, leaf: jax.Array) -> tuple[str | None, ...]:
  """The logical axes of a cache leaf: batch first (after the layer axis of scanned layers');
  heads and head dim where a leaf has them."""
  layer = (cache_lib.STACKED,) * cache_lib.row_axis(path)
  ndim = leaf.ndim - len(layer)
  if ndim == 4:  # Stored keys or values [b, s, h, d].
    return (*layer, "batch", None, "heads", "kv")
  if ndim == 3:  # A pending key or value, a key state [b, h, d].
    return (*layer, "batch", "heads", "kv")
  return (*layer, "batch") + (None,) * (ndim - 1)


def constrain_cache(cache: cache_lib.Cache) -> cache_lib.Cache:
  """The cache sharded as its logical axes say (a no-op outside `nn.logical_axis_rules`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: nn.with_logical_constraint(x, _cache_spec(path, x)), cache
  )


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh | None, rules: config_lib.AxisRules) -> Iterator[None]:
  """The mesh and the logical axis rules, for the model's sharding constraints (none without a
  mesh)."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def put_params(
    model: nn.Module,
    params: Any,
    mesh: jax.sharding.Mesh | None,
    rules: config_lib.AxisRules,
    batch: int,
) -> Any:
  """`params` sharded over `mesh` as their logical axes say; unchanged without a mesh. `batch`,
  the rows of the calls to come, must split over the data axes (the model traces a batch)."""
  if mesh is None:
    return params
  tokens = jnp.zeros((batch, 1), jnp.int32)
  return jax.device_put(params, sharding.param_shardings(model, tokens, mesh, rules))
