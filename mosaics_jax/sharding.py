"""Device meshes and the shardings of parameters, optimizer state and batches on them.

A `MeshConfig` gives the mesh axes data, fsdp and tensor; its rules map the logical axis names that
every parameter and key activation carries (`layers.logical`, `layers.constrain`) onto them:

    mesh = make_mesh(experiment.mesh)
    shardings = logical_shardings(abstract_boxed_params, mesh, experiment.mesh.rules)

Axis legend: b = batch, t = time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils

from mosaics_jax import config as config_lib


class ShardingError(config_lib.ConfigError):
  """A mesh that does not fit the devices, or an array dimension that does not fit its mesh axes."""


def mesh_shape(cfg: config_lib.MeshConfig, device_count: int) -> tuple[tuple[int, ...], ...]:
  """(per-slice sizes, cross-slice sizes) of the axes data, fsdp, tensor; -1 resolved."""
  dcn = (cfg.dcn_data, cfg.dcn_fsdp, 1)
  ici = [cfg.data, cfg.fsdp, cfg.tensor]
  sizes = ", ".join(f"{n}={getattr(cfg, n)}" for n in ("data", "fsdp", "tensor"))
  if cfg.dcn_data * cfg.dcn_fsdp > 1:
    sizes += f", dcn_data={cfg.dcn_data}, dcn_fsdp={cfg.dcn_fsdp}"
  if ici.count(-1) > 1:
    raise ShardingError(f"at most one of mesh.data, fsdp, tensor may be -1, got {sizes}")
  if -1 in ici:
    known = math.prod(dcn) * math.prod(s for s in ici if s != -1)
    if device_count % known:
      raise ShardingError(
          f"the mesh ({sizes}) does not fit {device_count} devices: {device_count} is not a"
          f" multiple of {known}"
      )
    ici[ici.index(-1)] = device_count // known
  if math.prod(ici) * math.prod(dcn) != device_count:
    raise ShardingError(
        f"the mesh ({sizes}) has {math.prod(ici) * math.prod(dcn)} devices but there are"
        f" {device_count}; set mesh sizes whose product is {device_count}, or one of them to -1"
    )
  return tuple(ici), dcn


def make_mesh(
    cfg: config_lib.MeshConfig, devices: Sequence[Any] | None = None
) -> jax.sharding.Mesh:
  """The mesh of `cfg` over `devices` (default: all), spread across slices when a dcn size > 1."""
  devices = jax.devices() if devices is None else list(devices)
  ici, dcn = mesh_shape(cfg, len(devices))
  if math.prod(dcn) > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    grid = mesh_utils.create_device_mesh(ici, devices)
  return jax.sharding.Mesh(
      grid, config_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(ici)
  )


def logical_specs(boxed: Any) -> Any:
  """The tree of logical `PartitionSpec`s of a tree holding `nn.LogicallyPartitioned` leaves."""
  return nn.get_partition_spec(boxed)


def logical_shardings(boxed: Any, mesh: jax.sharding.Mesh, rules: config_lib.AxisRules) -> Any:
  """A `NamedSharding` per leaf of `boxed` (with the tree structure of `nn.meta.unbox(boxed)`)."""
  return nn.logical_to_mesh_sharding(logical_specs(boxed), mesh, rules)


def param_shardings(
    model: nn.Module, tokens: jax.Array, mesh: jax.sharding.Mesh, rules: config_lib.AxisRules
) -> Any:
  """The sharding of each parameter of `model` (a plain tree like `model.init(...)["params"]`)."""
  boxed = jax.eval_shape(model.init_boxed, jax.random.key(0), tokens)["params"]
  return logical_shardings(boxed, mesh, rules)


def batch_sharding(
    mesh: jax.sharding.Mesh, rules: config_lib.AxisRules
) -> jax.sharding.NamedSharding:
  """The sharding of [b, t] batch arrays."""
  return nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("batch", "length"), mesh, rules)


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _axis_size(mesh_axes: str | tuple[str, ...] | None, axis_sizes: Mapping[str, int]) -> int:
  if mesh_axes is None:
    return 1
  names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
  return math.prod(axis_sizes[n] for n in names)


def check_divisible(boxed: Any, axis_sizes: Mapping[str, int], rules: config_lib.AxisRules) -> None:
  """Raises `ShardingError` naming the first array whose dimension its mesh axes do not divide.

  Args:
    boxed: a tree of `nn.LogicallyPartitioned` (abstract) arrays, e.g. `init_boxed`'s params.
    axis_sizes: mesh axis name -> size, e.g. `mesh.shape`.
    rules: the logical axis rules.
  """
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  for path, leaf in leaves:
    if not isinstance(leaf, nn.LogicallyPartitioned):
      continue
    spec = nn.logical_to_mesh_axes(leaf.names, rules)
    for dim, (name, mesh_axes) in enumerate(zip(leaf.names, spec)):
      size = _axis_size(mesh_axes, axis_sizes)
      if leaf.value.shape[dim] % size:
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ShardingError(
            f"parameter {where} of shape {tuple(leaf.value.shape)}: dimension {dim} ({name!r},"
            f" {leaf.value.shape[dim]}) is not divisible by mesh axis {mesh_axes!r} of size"
            f" {size}; change the mesh sizes or the rule for {name!r} in mesh.rules"
        )


def check_activations(
    model: config_lib.ModelConfig,
    micro_batch: int,
    axis_sizes: Mapping[str, int],
    rules: config_lib.AxisRules,
) -> None:
  """Raises `ShardingError` if the (micro-)batch or the heads do not divide by their mesh axes."""
  spec = nn.logical_to_mesh_axes(("batch", "heads"), rules)
  for name, value, field, mesh_axes in zip(
      ("batch", "heads"), (micro_batch, model.num_heads), ("micro-batch", "model.num_heads"), spec
  ):
    size = _axis_size(mesh_axes, axis_sizes)
    if value % size:
      raise ShardingError(
          f"{field} {value} is not divisible by mesh axis {mesh_axes!r} of size {size} (the"
          f" {name!r} rule); change the mesh sizes or mesh.rules"
      )


def memory_available() -> int:
  """Bytes of memory of all local devices together; on CPU, the host's physical memory."""
  limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices()]
  if all(limits):
    return sum(limits)
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def put_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict:
  """A host batch (this process's rows) as global arrays sharded over the batch axis."""
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }
