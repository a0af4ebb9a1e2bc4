"""Model-FLOPs utilisation (MFU): what a training step's FLOPs are measured against.

MFU = tokens/s per device x train FLOPs per token / one device's peak FLOP/s; one formula
(`train.metrics.Utilisation.mfu`) serves `mosaics-train`'s log and `mosaics-bench train`.

* Train FLOPs per token follow the paper convention: 3 x the forward FLOPs of `flops.count` at the
  run's context (the backward costs twice the forward). Recomputation under remat is not counted:
  model FLOPs are the model's, however the step computes them.
* The peak is `PEAK_FLOPS`'s dense rate per chip (one JAX device on these chips), keyed by
  `jax.Device.device_kind`, for the model's compute dtype. Its float32 column is what float32
  matmuls run at under JAX's default precision: one bfloat16 pass on a TPU, TF32 tensor cores on
  an A100, H100 or H200 (https://docs.jax.dev/en/latest/201/precision.html).
* Where the table does not apply, the peak is the rate of a matmul timed in this process
  (`timing.Matmul`, as `mosaics-bench train` times it): on a CPU, in float32 (bfloat16 is emulated
  there); on an accelerator the table lacks, in the compute dtype, with a warning naming the kind;
  in float32 under a non-default `jax_default_matmul_precision`, which the table's float32 column
  does not describe. A measured matmul runs below the datasheet peak, so an MFU against it reads
  high; the warning and the run's record of split "mfu" (`peak_source`) say which peak was used.
  Leaving MFU out instead would leave a run on a new chip with no utilisation at all, while a
  matmul's rate is what that chip does reach, and is how MFU is read on a CPU anyway.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax

from mosaics_jax import config as config_lib
from mosaics_jax.analysis import flops, timing
from mosaics_jax.train import metrics


def _rates(bfloat16: float, float32: float) -> Mapping[str, float]:
  return MappingProxyType({"bfloat16": bfloat16, "float32": float32})


# Dense peak FLOP/s per chip by compute dtype. TPUs: Cloud TPU's pages for v4, v5e, v5p and v6e (the
# bf16 peaks MaxText and Levanter use); float32 is one bf16 pass. NVIDIA: the A100, H100 and H200
# datasheets; they list tensor-core rates with 2:4 sparsity, halved here; float32 is TF32.
_TPU_V4 = _rates(275e12, 275e12)
_TPU_V5E = _rates(197e12, 197e12)
_TPU_V5P = _rates(459e12, 459e12)
_TPU_V6E = _rates(918e12, 918e12)
_A100 = _rates(312e12, 156e12)
_HOPPER_SXM = _rates(1979e12 / 2, 989e12 / 2)  # H100 SXM and H200 SXM.
_HOPPER_NVL = _rates(1671e12 / 2, 835e12 / 2)  # H100 NVL and H200 NVL (one GPU).
_H100_PCIE = _rates(1513e12 / 2, 756e12 / 2)

# Keyed by `jax.Device.device_kind`. TPU kinds as JAX's own chip_version_from_device_kind
# (jax/_src/pallas/mosaic/tpu_info.py) reads them, which also accepts the Cloud names; NVIDIA kinds
# are CUDA's device names, as in Levanter's and Marin's device-kind tables (levanter
# utils/flop_utils.py, marin fray device_flops.py). An H200 NVL that names itself plain "NVIDIA
# H200" gets the SXM peak, and so an MFU about 16% low.
PEAK_FLOPS: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        "TPU v4": _TPU_V4,
        "TPU v5 lite": _TPU_V5E,
        "TPU v5e": _TPU_V5E,
        "TPU v5": _TPU_V5P,
        "TPU v5p": _TPU_V5P,
        "TPU v6 lite": _TPU_V6E,
        "TPU v6e": _TPU_V6E,
        "NVIDIA A100-SXM4-40GB": _A100,
        "NVIDIA A100-SXM4-80GB": _A100,
        "NVIDIA A100-PCIE-40GB": _A100,
        "NVIDIA A100 80GB PCIe": _A100,
        "NVIDIA H100 80GB HBM3": _HOPPER_SXM,
        "NVIDIA H100 PCIe": _H100_PCIE,
        "NVIDIA H100 NVL": _HOPPER_NVL,
        "NVIDIA H200": _HOPPER_SXM,
        "NVIDIA H200 NVL": _HOPPER_NVL,
    }
)

# Matmuls timed for the peak when the table does not apply (`timing.matmul_flops_per_second`'s).
MATMUL_SAMPLES = 5


def train_flops_per_token(experiment: config_lib.Experiment) -> float:
  """Model FLOPs of one trained token: 3 x the forward FLOPs per token at the run's seq_len."""
  return 3 * flops.count(experiment.model, context=experiment.data.seq_len).flops_per_token


def table_peak(device_kind: str, dtype: str) -> float | None:
  """`PEAK_FLOPS` of one `device_kind` device computing in `dtype`; None where the table does not
  apply: a kind it lacks, or float32 under a non-default matmul precision."""
  rates = PEAK_FLOPS.get(device_kind)
  if rates is None or (dtype == "float32" and jax.config.jax_default_matmul_precision is not None):
    return None
  return rates[dtype]


def matmul_dtype(platform: str, dtype: str) -> str:
  """The dtype of the matmul timed for a peak the table does not give (module docstring)."""
  return "float32" if platform == "cpu" else dtype


def of(
    experiment: config_lib.Experiment,
    device: Any = None,
    matmul: Callable[[], timing.Matmul] | None = None,
) -> metrics.Utilisation:
  """What `experiment`'s MFU is measured against on `device` (default: the first device).

  Args:
    experiment: the run; its `model.dtype` picks the peak's column.
    device: anything with a `device_kind` and a `platform`, like a `jax.Device`.
    matmul: where the table does not apply, a timed `timing.Matmul` in
      `matmul_dtype(platform, dtype)` (`mosaics-bench train` interleaves its samples with the
      steps); default: one of `timing.MATMUL_SIZE` timed `MATMUL_SAMPLES` times, now.
  """
  device = jax.devices()[0] if device is None else device
  dtype = experiment.model.dtype
  rate = table_peak(device.device_kind, dtype)
  if rate is not None:
    source = f"{device.device_kind} peak dense {dtype} FLOP/s (table)"
  else:
    measured = matmul_dtype(device.platform, dtype)
    if matmul is None:
      timed = timing.Matmul(timing.MATMUL_SIZE, measured)
      timed.sample(MATMUL_SAMPLES)
    else:
      timed = matmul()
    if timed.dtype != measured:
      raise ValueError(
          f"the peak of {dtype} on {device.platform} is a {measured} matmul's, not a"
          f" {timed.dtype} one's"
      )
    rate = timed.rate()
    source = f"{measured} {timed.n}^3 matmul timed in this process"
    if device.platform != "cpu":
      why = (
          f"no peak for {device.device_kind!r} in analysis.utilisation.PEAK_FLOPS"
          if device.device_kind not in PEAK_FLOPS
          else f"jax_default_matmul_precision={jax.config.jax_default_matmul_precision}"
      )
      warnings.warn(
          f"MFU is against a {measured} matmul timed here ({rate / 1e12:.3g} TFLOP/s), not the"
          f" chip's peak ({why}): it reads higher than against the datasheet",
          stacklevel=2,
      )
  return metrics.Utilisation(
      train_flops_per_token=train_flops_per_token(experiment),
      peak_flops_per_second=rate,
      peak_source=source,
      device_kind=device.device_kind,
  )
