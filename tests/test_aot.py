"""Tests of compiling for TPUs ahead of time (`mosaics_jax.aot`, `mosaics-info --compile-for`).

The compilation tests need libtpu (`pip install "jax[tpu]"`) and skip without it, as in CI; the
rest run everywhere. libtpu lets one process at a time load it: run this file without xdist
(`python -m pytest -p no:xdist tests/test_aot.py`) where libtpu is installed.
"""

from __future__ import annotations

import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import pytest
from jax._src import mesh as mesh_lib

import kernels_pallas
from mosaics_jax import config as config_lib, overrides, registry
from mosaics_jax.analysis import aot
from mosaics_jax.cli import bench, info
from mosaics_jax.model import families

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
TOPOLOGY = "v5e:2x2"  # The smallest slice libtpu describes by default: 4 chips, one device each.
RETRIEVAL_KERNELS = {"forward_kernel", "correction_kernel", "dq_kernel", "dkv_kernel"}


def test_model_on_a_tpu_mesh_lowers_the_tpu_kernels():
  """On a mesh of TPU devices the model's retrievals lower to the Mosaic kernels, forward and
  backward, even where the host is a CPU: the mesh's platform picks the implementation."""
  experiment = registry.get("mm2-tiny")
  model = families.build_model(experiment.model)
  tokens = jax.ShapeDtypeStruct((2, 128), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  tpu = mesh_lib.AbstractDevice(device_kind="TPU v5 lite", num_cores=None, platform="tpu")
  mesh = jax.sharding.AbstractMesh((1, 1, 1), config_lib.MESH_AXES, abstract_device=tpu)

  def loss(params, tokens):
    logits = model.apply({"params": params}, tokens, jnp.zeros_like(tokens), ltm_delay=64)
    return jnp.sum(logits)

  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=["tpu"])(params, tokens)
  names = set(re.findall(r'kernel_name = "(\w+)"', exported.mlir_module()))
  assert names == RETRIEVAL_KERNELS


@pytest.mark.skipif(HAS_LIBTPU, reason="checks the error without libtpu")
def test_without_libtpu_the_error_says_what_to_install(capsys):
  with pytest.raises(aot.AotError, match=r"needs libtpu.*pip install 'jax\[tpu\]"):
    aot.topology_devices(TOPOLOGY)
  assert info.main(["mm2-tiny", "--compile-for", TOPOLOGY]) == 2
  assert "needs libtpu" in capsys.readouterr().err
  assert bench.main(["kernels", "--compile-for", TOPOLOGY]) == 2
  assert "needs libtpu" in capsys.readouterr().err


def test_compile_for_needs_an_experiment():
  with pytest.raises(SystemExit):
    info.main(["--compile-for", TOPOLOGY])


@pytest.mark.tpu
def test_train_step_compiles_for_a_tpu_slice():
  report = aot.compile_for_topology(registry.get("mm2-tiny"), TOPOLOGY, {"data": 2, "fsdp": 2})
  assert (report.devices, report.device_kind) == (4, "TPU v5 lite")
  assert report.mesh == {"data": 2, "fsdp": 2, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1}
  # Two retrieval shapes (short- and long-term) of four kernels each; the layers share them.
  assert report.mosaic_kernels == 2 * len(RETRIEVAL_KERNELS)
  # The state is donated: the new one is written over it.
  assert 0 < report.alias_bytes <= report.output_bytes
  assert report.argument_bytes > 0 and report.temp_bytes > 0
  assert report.hbm_bytes == 16 * 2**30 and report.peak_bytes < report.hbm_bytes


@pytest.mark.tpu
def test_rest_of_the_devices_and_slices():
  """-1 takes the devices the other sizes leave; dcn sizes compile for several slices."""
  experiment = registry.get("mm2-tiny")
  report = aot.compile_for_topology(experiment, TOPOLOGY, {"fsdp": -1, "dcn_data": 2})
  assert report.devices == 8
  assert report.mesh == {"data": 1, "fsdp": 4, "tensor": 1, "dcn_data": 2, "dcn_fsdp": 1}
  assert report.hbm_bytes == 16 * 2**30


@pytest.mark.tpu
def test_two_core_chips_are_one_device():
  """A v4 chip's two TensorCores are one "megacore" device with the chip's 32 GiB."""
  devices = aot.topology_devices("v4:2x2x1")
  assert len(devices) == 4
  report = aot.compile_train_step(registry.get("mm2-tiny"), devices, "v4:2x2x1")
  assert report.hbm_bytes == 32 * 2**30


@pytest.mark.tpu
def test_unknown_topology_names_the_format():
  with pytest.raises(aot.AotError, match=r"'v9z:2x2'.*e\.g\. v5p:2x2x1"):
    aot.topology_devices("v9z:2x2")


@pytest.mark.tpu
def test_mesh_that_does_not_fit_the_slice():
  with pytest.raises(config_lib.ConfigError, match="has 2 devices but there are 4"):
    aot.compile_for_topology(registry.get("mm2-tiny"), TOPOLOGY, {"data": 2})


@pytest.mark.tpu
def test_cli_prints_the_plan_beside_the_compiled_step(capsys):
  assert info.main(["mm2-tiny", "--compile-for", TOPOLOGY, "--batch", "16", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  compiled, plan = out["compiled"], out["memory_plan"]
  assert compiled["global_batch"] == plan["global_batch"] == 16
  # The experiment's mesh (data=-1) resolved on the slice, and the plan made for the same one.
  assert compiled["mesh"]["data"] == plan["axis_sizes"]["data"] == 4
  assert compiled["peak_bytes"] > 0


@pytest.mark.tpu
@pytest.mark.parametrize("topology", ["v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_retrieval_kernels_compile_for_every_generation(topology):
  """Mosaic compiles the TPU kernels and splash attention, forward and backward, for each TPU
  generation: bfloat16 and float32, a window and the long band with a traced lo, documents."""
  device = aot.topology_devices(topology)[0]
  on_device = jax.sharding.SingleDeviceSharding(device)
  ids = jax.ShapeDtypeStruct((1, 1000), jnp.int32, sharding=on_device)
  lo = jax.ShapeDtypeStruct((), jnp.int32, sharding=on_device)
  for dtype in (jnp.bfloat16, jnp.float32):
    q = jax.ShapeDtypeStruct((1, 1000, 4, 64), dtype, sharding=on_device)
    for impl, hi in (("pallas_tpu", 255), ("pallas_tpu", None), ("shift", 255), ("shift", None)):

      def loss(q, k, v, ids, lo, impl=impl, hi=hi):
        lo = 64 if impl == "shift" and hi is not None else lo  # Splash windows are static.
        y = kernels_pallas.retrieve(
            q, k, v, lo=lo, hi=hi, segment_ids=ids, impl=impl, backend="tpu"
        )
        return jnp.sum(y.astype(jnp.float32))

      grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      lowered = grads.trace(q, q, q, ids, lo).lower()
      assert lowered.as_text().count(aot.MOSAIC_CALL) >= 3, (impl, hi)
      lowered.compile()  # Raises if Mosaic rejects a kernel.


@pytest.mark.tpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_block_selection_kernels_compile(topology):
  """Mosaic compiles the block-selection kernels (per-head lists in SMEM, the rows' selected
  blocks as a VMEM input), forward and backward, bfloat16 and float32, with documents."""
  device = aot.topology_devices(topology)[0]
  on_device = jax.sharding.SingleDeviceSharding(device)
  ids = jax.ShapeDtypeStruct((1, 1000), jnp.int32, sharding=on_device)
  lo = jax.ShapeDtypeStruct((), jnp.int32, sharding=on_device)
  selection = kernels_pallas.BlockSelection(blocks=3, block_size=128)
  for dtype in (jnp.bfloat16, jnp.float32):
    q = jax.ShapeDtypeStruct((1, 1000, 4, 64), dtype, sharding=on_device)

    def loss(q, k, v, ids, lo):
      y = kernels_pallas.retrieve_selected(
          q, k, v, lo=lo, segment_ids=ids, selection=selection, impl="pallas_tpu", backend="tpu"
      )
      return jnp.sum(y.astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q, ids, lo).lower()
    assert lowered.as_text().count(aot.MOSAIC_CALL) == 4
    lowered.compile()  # Raises if Mosaic rejects a kernel.


@pytest.mark.tpu
def test_kernel_table_compiled_for_a_tpu(capsys):
  """The kernels sweep compiled for a TPU: peak memory of the TPU implementations, no times."""
  args = [
      "kernels",
      "--compile-for",
      TOPOLOGY,
      "--seq-lens",
      "2048",
      "4096",
      "--heads",
      "2",
      "--head-dims",
      "64",
      "--bands",
      "short",
  ]
  assert bench.main(args) == 0
  rows = [
      line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| short")
  ]
  assert sorted({row[4].strip() for row in rows}) == ["pallas_tpu", "reference", "shift", "xla"]
  assert all(row[5].strip() == "compiled only" and float(row[8]) > 0 for row in rows)
  peak = {(row[4].strip(), int(row[2])): float(row[8]) for row in rows}
  # The dense reference grows as T^2; the Pallas kernel's memory grows linearly.
  assert peak["reference", 4096] > 3 * peak["reference", 2048]
  assert peak["pallas_tpu", 4096] < 2.5 * peak["pallas_tpu", 2048]


@pytest.mark.tpu
def test_scanned_layers_compile_one_block_for_a_tpu_slice():
  """With scan_layers the lowered step holds one block whatever the depth: at 4 layers its
  StableHLO is well under the unrolled step's, and the same size as at 2 layers."""
  mesh = {"data": 2, "fsdp": 2}

  def hlo(layers: int, scan: bool) -> int:
    experiment = overrides.apply(
        registry.get("mm2-tiny"),
        [f"model.num_layers={layers}", f"model.scan_layers={str(scan).lower()}"],
    )
    return aot.compile_for_topology(experiment, TOPOLOGY, mesh).hlo_bytes

  scanned = hlo(4, True)
  assert scanned < 0.6 * hlo(4, False)
  assert scanned == pytest.approx(hlo(2, True), rel=0.02)
