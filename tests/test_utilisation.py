"""MFU in the logs (`analysis/utilisation.py`): the peak a run's MFU is measured against, and the
logged MFU's agreement with `mosaics-bench train`. The fields a `mosaics-train` run logs are
checked on test_run_files.py's run."""

from __future__ import annotations

import dataclasses
import statistics

import jax
import pytest
import tiny_runs

from mosaics_jax import overrides, registry
from mosaics_jax.analysis import bench_train, timing, utilisation
from mosaics_jax.train import loop, metrics


@dataclasses.dataclass(frozen=True)
class Device:
  """What `utilisation.of` reads of a `jax.Device`."""

  device_kind: str
  platform: str


def _experiment(dtype: str = "float32"):
  return overrides.override(tiny_runs.tiny(2), "model.dtype", dtype)


def _timed(dtype: str, n: int = 64) -> timing.Matmul:
  matmul = timing.Matmul(n, dtype)
  matmul.sample(3)
  return matmul


# Dense per-chip peaks from the vendors' pages (Cloud TPU v4/v5e/v5p/v6e; NVIDIA's A100, H100 and
# H200 datasheets, whose tensor-core figures are with sparsity: halved), TFLOP/s.
@pytest.mark.parametrize(
    "kind, bfloat16, float32",
    [
        ("TPU v4", 275, 275),  # float32 matmuls are one bfloat16 pass by default on a TPU.
        ("TPU v5 lite", 197, 197),
        ("TPU v5", 459, 459),  # v5p.
        ("TPU v6 lite", 918, 918),  # v6e, Trillium.
        ("NVIDIA A100-SXM4-80GB", 312, 156),  # float32 is TF32 by default on an A100 or later.
        ("NVIDIA H100 80GB HBM3", 989.5, 494.5),
        ("NVIDIA H100 PCIe", 756.5, 378),
        ("NVIDIA H200", 989.5, 494.5),
    ],
)
def test_the_peak_of_a_known_chip_is_its_dense_rate_in_the_models_dtype(kind, bfloat16, float32):
  for dtype, tflops in (("bfloat16", bfloat16), ("float32", float32)):
    basis = utilisation.of(_experiment(dtype), Device(kind, "tpu" if "TPU" in kind else "gpu"))
    assert basis.peak_flops_per_second == pytest.approx(tflops * 1e12)
    assert basis.device_kind == kind and "table" in basis.peak_source


def test_an_unknown_accelerator_is_measured_and_named_in_a_warning():
  exp = _experiment("bfloat16")
  matmul = _timed("bfloat16")
  with pytest.warns(UserWarning, match="'NVIDIA B300'.*PEAK_FLOPS"):
    basis = utilisation.of(exp, Device("NVIDIA B300", "gpu"), matmul=lambda: matmul)
  assert basis.peak_flops_per_second == matmul.rate()
  assert basis.peak_source == "bfloat16 64^3 matmul timed in this process"
  # The matmul must be in the compute dtype: a float32 one would make a bfloat16 run's MFU high.
  with pytest.raises(ValueError, match="bfloat16 on gpu is a bfloat16 matmul's, not a float32"):
    utilisation.of(exp, Device("NVIDIA B300", "gpu"), matmul=lambda: _timed("float32"))


def test_float32_under_another_matmul_precision_is_measured():
  """The table's float32 column is JAX's default precision; `highest` runs slower than it."""
  h100 = Device("NVIDIA H100 80GB HBM3", "gpu")
  matmul = _timed("float32")
  with jax.default_matmul_precision("highest"):
    with pytest.warns(UserWarning, match="jax_default_matmul_precision=highest"):
      basis = utilisation.of(_experiment("float32"), h100, matmul=lambda: matmul)
    assert basis.peak_flops_per_second == matmul.rate()
    # bfloat16 matmuls do not depend on it.
    assert utilisation.of(_experiment("bfloat16"), h100).peak_flops_per_second == 1979e12 / 2


def test_on_cpu_the_peak_is_a_float32_matmul_timed_here_without_a_warning(recwarn):
  basis = utilisation.of(_experiment("bfloat16"))  # bfloat16 is emulated on a CPU.
  assert basis.device_kind == jax.devices()[0].device_kind == "cpu"
  assert basis.peak_source == f"float32 {timing.MATMUL_SIZE}^3 matmul timed in this process"
  assert 1e8 < basis.peak_flops_per_second < 1e13
  assert not [w for w in recwarn if "MFU" in str(w.message)]


@pytest.mark.slow
def test_logged_mfu_agrees_with_mosaics_bench_train(tmp_path):
  """The MFU `mosaics-train` logs is `mosaics-bench train`'s on the same step, within 20%.

  A timing comparison on a shared machine, made robust rather than lucky. Both run in this process
  on one step: quickstart's, widened (width 192, 2 layers) so that a step (about 0.4 s on one
  core) dwarfs what the loop adds to it, the next batch from the data pipeline and bookkeeping
  (about 10 ms). Both MFUs are medians: of five log intervals of six steps after the first (which
  holds the compilation; evaluation and checkpoints fall outside them), and of five bench repeats
  of six steps. Both divide by a matmul timed in this process, the log's at its start and the
  bench's between its repeats, so load from other processes, which slows step and matmul alike,
  mostly cancels. The bench runs before and after the training and the log is compared with the
  nearer of the two, so a load that changes once during the test cannot fail it; only load that
  swings faster than the medians absorb can (seen at a load of 9 on 2 cores: 0.87 and 0.94).
  """
  exp = overrides.apply(
      registry.get("quickstart"),
      [
          "model.width=192",
          "model.num_layers=2",
          "train.steps=36",
          "train.log_every=6",
          "train.eval_every=36",
          "train.checkpoint_every=36",
          "train.eval_batches=1",
      ],
  )
  before = bench_train.train_throughput(exp, steps=6, repeats=5)
  loop.train(exp, tmp_path, progress=False, utilisation=utilisation.of(exp))
  after = bench_train.train_throughput(exp, steps=6, repeats=5)
  train = [r for r in metrics.read_metrics(tmp_path) if "split" not in r]
  assert [r["step"] for r in train] == [6, 12, 18, 24, 30, 36]
  logged = statistics.median(r["mfu"] for r in train[1:])
  ratios = [logged / before.mfu, logged / after.mfu]
  assert min(abs(r - 1) for r in ratios) < 0.2, (logged, before.mfu, after.mfu)
