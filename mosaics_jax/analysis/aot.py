"""Ahead-of-time compilation of the train step for a TPU slice, on any host (`--compile-for`).

    devices = aot.topology_devices("v5p:4x4x4")
    report = aot.compile_train_step(experiment, devices)
    print(aot.format_report(report))

libtpu (`pip install "jax[tpu]"`) compiles for a TPU topology given by name with no TPU attached,
as MaxText's train_compile does. What compiles is exactly the step `mosaics-train` runs: the same
model, shardings, optimizer and, through the mesh's platform, the TPU Pallas kernels compiled with
Mosaic. The report holds XLA's own per-device memory, not an estimate (compare
`mosaics_jax.memory_plan`), and a step that does not fit fails here, not hours into a queue.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.experimental import topologies

from mosaics_jax import config as config_lib, sharding
from mosaics_jax.analysis import memory_plan
from mosaics_jax.model import families
from mosaics_jax.train import data, optim, step as step_lib

# Topology names as libtpu parses them: generation, then chips per dimension.
TOPOLOGY_EXAMPLES = "v5p:2x2x1, v5p:4x4x4, v5e:2x2, v5e:4x4, v6e:4x4, v4:2x2x1"
# HBM per chip by device kind (Google Cloud's TPU system architecture pages). A chip whose
# TensorCores are separate devices shares it among them.
HBM_PER_CHIP = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,
    "TPU v5": 95 * 2**30,
    "TPU v6 lite": 32 * 2**30,
}

# The custom call of a Mosaic kernel in the lowered program.
MOSAIC_CALL = "tpu_custom_call"


class AotError(config_lib.ConfigError):
  """A topology that cannot be compiled for: no libtpu, or a name libtpu does not know."""


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """Per-device bytes of one compiled train step, as XLA reports them."""

  experiment: str
  topology: str
  device_kind: str
  devices: int
  mesh: dict[str, int]  # The sizes of memory_plan.MESH_SIZES, -1 resolved.
  global_batch: int
  context: int
  compile_seconds: float  # Tracing, lowering and compiling.
  hlo_bytes: int  # The lowered step's StableHLO text: what XLA compiles (scan_layers shrinks it).
  argument_bytes: int  # Parameters, optimizer state and the batch shard.
  output_bytes: int
  alias_bytes: int  # Outputs written over donated arguments (the state).
  temp_bytes: int  # Activations and every other buffer live during the step.
  code_bytes: int
  mosaic_kernels: int  # Pallas TPU kernels in the step (retrieval forward and backward).
  hbm_bytes: int | None  # Per device; None for a device kind not in HBM_PER_CHIP.

  @property
  def peak_bytes(self) -> int:
    return (
        self.argument_bytes
        + self.output_bytes
        - self.alias_bytes
        + self.temp_bytes
        + self.code_bytes
    )

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}


def topology_devices(topology: str, num_slices: int = 1) -> list[Any]:
  """Compile-only devices of `num_slices` TPU slices of `topology` (e.g. "v5p:4x4x4")."""
  describe = functools.partial(
      topologies.get_topology_desc, platform="tpu", topology_name=topology, num_slices=num_slices
  )
  try:
    try:
      # A chip of two TensorCores is one device ("megacore"), as on TPU VMs and as JAX's mesh
      # utilities require; chips of one TensorCore have no such configuration.
      desc = describe(chip_config_name="megacore")
    except RuntimeError as e:
      if "chip config" not in str(e):
        raise
      desc = describe(chip_config_name="default")
  except RuntimeError as e:  # JaxRuntimeError included.
    if "not installed" in str(e):
      raise AotError(
          "compiling for a TPU topology needs libtpu, which is not installed: pip install"
          f" 'jax[tpu]=={jax.__version__}'"
      ) from None
    raise AotError(
        f"libtpu could not describe the topology {topology!r}: {e}. A topology is a generation"
        f" and the chips along each dimension, e.g. {TOPOLOGY_EXAMPLES}"
    ) from None
  return list(desc.devices)


def hbm_per_device(devices: Sequence[Any]) -> int | None:
  """HBM_PER_CHIP shared among the devices of a chip (TensorCores that are devices of their own)."""
  hbm = HBM_PER_CHIP.get(devices[0].device_kind)
  if hbm is None:
    return None
  chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices}
  return hbm * len(chips) // len(devices)


def compile_for_topology(
    experiment: config_lib.Experiment, topology: str, mesh_sizes: Mapping[str, int] | None = None
) -> CompileReport:
  """Compiles the train step of `experiment` for a TPU topology (one slice per dcn mesh index).

  Args:
    experiment: the experiment; its mesh, batch size and context apply.
    topology: libtpu's name of one slice, e.g. "v5p:4x4x4".
    mesh_sizes: sizes of `memory_plan.MESH_SIZES` for the mesh, missing ones 1 (one of data,
      fsdp, tensor may be -1: the rest of the devices); None keeps the experiment's mesh.
  """
  cfg = experiment.mesh
  if mesh_sizes is not None:
    sizes = {**dict.fromkeys(memory_plan.MESH_SIZES, 1), **mesh_sizes}
    cfg = dataclasses.replace(cfg, **sizes)
  experiment = dataclasses.replace(experiment, mesh=cfg)
  num_slices = cfg.dcn_data * cfg.dcn_fsdp
  return compile_train_step(experiment, topology_devices(topology, num_slices), topology)


def compile_train_step(
    experiment: config_lib.Experiment,
    devices: Sequence[Any],
    topology: str = "",
) -> CompileReport:
  """Compiles the train step of `experiment` on its mesh over `devices`; nothing runs.

  Raises:
    sharding.ShardingError: the mesh does not fit the devices, or an array its mesh axes.
    AotError: XLA could not compile the step (out of memory included); the message is XLA's.
  """
  ici, dcn = sharding.mesh_shape(experiment.mesh, len(devices))
  mesh_sizes = dict(zip(config_lib.MESH_AXES, ici)) | {"dcn_data": dcn[0], "dcn_fsdp": dcn[1]}
  model = families.build_model(experiment.model)
  tx = optim.make_optimizer(experiment.train)
  placement = step_lib.make_placement(experiment, model, tx, devices)
  if placement is None:  # A one-device mesh: make_placement leaves it unsharded.
    raise AotError("compiling ahead of time needs a topology of more than one device")
  state = step_lib.abstract_state(experiment, model, tx, placement)
  shape = (experiment.train.batch_size, experiment.data.seq_len)
  batch = {
      name: jax.ShapeDtypeStruct(shape, dtype, sharding=placement.batch)
      for name, dtype in data.BATCH_DTYPES.items()
  }
  in_shardings, out_shardings = step_lib.train_step_shardings(placement)
  step = jax.jit(
      step_lib.train_step_fn(experiment, model, tx),
      in_shardings=in_shardings,
      out_shardings=out_shardings,
      donate_argnums=0,
  )
  start = time.perf_counter()
  with placement.context():
    lowered = step.trace(state, batch).lower()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    raise AotError(
        f"XLA could not compile the train step for {topology or 'the devices'}: {e}"
    ) from None
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  hlo = lowered.as_text()
  return CompileReport(
      experiment=experiment.name,
      topology=topology,
      device_kind=devices[0].device_kind,
      devices=len(devices),
      mesh=mesh_sizes,
      global_batch=experiment.train.batch_size,
      context=experiment.data.seq_len,
      compile_seconds=seconds,
      hlo_bytes=len(hlo),
      argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      code_bytes=memory.generated_code_size_in_bytes,
      mosaic_kernels=hlo.count(MOSAIC_CALL),
      hbm_bytes=hbm_per_device(devices),
  )


def format_report(r: CompileReport) -> str:
  """The report as a table of per-device bytes."""
  mesh = ", ".join(f"{k}={v}" for k, v in r.mesh.items() if v != 1 or not k.startswith("dcn"))
  rows = [
      ("arguments (state, batch)", r.argument_bytes),
      ("outputs", r.output_bytes),
      ("  of which over donated arguments", r.alias_bytes),
      ("temporaries (activations)", r.temp_bytes),
      ("generated code", r.code_bytes),
      ("peak", r.peak_bytes),
  ]
  width = max(len(name) for name, _ in rows)
  lines = [
      f"compiled for {r.topology} ({r.devices} x {r.device_kind}, mesh {mesh})"
      f" in {r.compile_seconds:.1f} s: {r.experiment}, global batch {r.global_batch} x context"
      f" {r.context}",
      f"  {r.mosaic_kernels} Pallas TPU kernel calls compiled with Mosaic; StableHLO"
      f" {memory_plan.human_bytes(r.hlo_bytes)}",
      "  memory per device (XLA's memory analysis)",
  ]
  lines += [f"  {name:<{width}} {memory_plan.human_bytes(n)}" for name, n in rows]
  if r.hbm_bytes is not None:
    verdict = "fits" if r.peak_bytes <= r.hbm_bytes else "DOES NOT FIT"
    lines.append(f"  {'HBM':<{width}} {memory_plan.human_bytes(r.hbm_bytes)}  ({verdict})")
  return "\n".join(lines)
