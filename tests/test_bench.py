"""`mosaics-bench` prints its tables (tiny sizes: the numbers themselves are not asserted)."""

from __future__ import annotations

import re

import jax
import pytest

from mosaics_jax.analysis import bench_kernels, profile
from mosaics_jax.cli import bench


@pytest.mark.slow
def test_train_table(capsys):
  assert (
      bench.main(
          [
              "train",
              "mm1-tiny",
              "--steps",
              "2",
              "--repeats",
              "1",
              "--matmul-size",
              "256",
              "--set",
              "train.batch_size=2",
              "data.seq_len=32",
          ]
      )
      == 0
  )
  out = capsys.readouterr().out
  header = [c.strip() for c in out.splitlines()[3].strip("|").split("|")]
  assert header == [
      "experiment",
      "step (s)",
      "tokens/s",
      "train FLOPs/token",
      "model GFLOP/s",
      "matmul GFLOP/s",
      "peak GFLOP/s",
      "MFU",
      "peak memory (MB)",
  ]
  assert "3 x forward FLOPs" in out
  row = [line for line in out.splitlines() if line.startswith("| mm1-tiny")][0]
  cells = [c.strip() for c in row.strip("|").split("|")]
  mfu, tokens_per_second, peak_mb = float(cells[7].rstrip("%")), float(cells[2]), float(cells[8])
  assert mfu > 0 and tokens_per_second > 0 and peak_mb > 0
  # On a CPU the peak is the float32 matmul timed here, as mosaics-train logs it.
  assert "float32 256^3 matmul timed in this process" in out and cells[5] == cells[6]


def test_train_unknown_key(capsys):
  assert bench.main(["train", "mm1-tiny", "--set", "train.batch=2"]) == 2
  assert "did you mean batch_size" in capsys.readouterr().err


# A stand-in for the official nanoMosaics/mosaic_model.py, with its interface (MemoryMosaicConfig
# of model_args, MemoryMosaic(idx, targets) -> (logits, loss), configure_optimizers), built from our
# own PyTorch v1 (`port.torch_models`); it logs the shape of every batch it trains on.
_STAND_IN = """
import dataclasses, pathlib
import torch
from torch.nn import functional as F
from mosaics_jax.port import nanomosaics, torch_models

@dataclasses.dataclass
class MemoryMosaicConfig:
  block_size: int
  vocab_size: int
  n_layer: int
  n_head: int
  n_embd: int
  dropout: float
  pmem_size: int
  pmem_count: int
  bias: bool
  leaky_cuda: bool = False

class MemoryMosaic(torch_models.MemoryMosaic):
  def __init__(self, config):
    super().__init__(nanomosaics.config_from_model_args(dataclasses.asdict(config)))

  def forward(self, idx, targets):
    with open(pathlib.Path(__file__).with_name("steps.log"), "a") as log:
      log.write(f"{tuple(idx.shape)}\\n")
    logits = super().forward(idx)
    return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

  def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
    print("parameter counts")
    return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas)
"""

TRAIN_ARGS = ["--matmul-size", "64", "--set", "train.batch_size=2", "data.seq_len=32"]


def _official_checkout(tmp_path, source=_STAND_IN):
  folder = tmp_path / "MemoryMosaics" / "nanoMosaics"
  folder.mkdir(parents=True)
  (folder / "mosaic_model.py").write_text(source)
  return tmp_path / "MemoryMosaics"


@pytest.mark.slow
def test_train_against_official_is_timed_interleaved(capsys, tmp_path):
  pytest.importorskip("torch")
  checkout = _official_checkout(tmp_path)
  args = ["train", "mm1-tiny", "--steps", "2", "--repeats", "3", "--official", str(checkout)]
  assert bench.main([*args, *TRAIN_ARGS]) == 0
  out = capsys.readouterr().out
  # One warm-up step, then 2 steps in each of 3 repeats, all on the experiment's batch shape.
  steps = (checkout / "nanoMosaics" / "steps.log").read_text().splitlines()
  assert steps == ["(2, 32)"] * 7
  assert "parameter counts" not in out
  ours = [line for line in out.splitlines() if line.startswith("| mm1-tiny")][0]
  theirs = [line for line in out.splitlines() if line.startswith("| official nanoMosaics")][0]
  assert "cpu" in theirs or "cuda" in theirs
  ours_tps, theirs_tps = (float(row.split("|")[3]) for row in (ours, theirs))
  ratio = float(re.search(r"ours / official nanoMosaics .*: ([\d.]+)x the tokens/s", out).group(1))
  assert ratio == pytest.approx(ours_tps / theirs_tps, rel=0.01)


def test_train_official_errors_are_named(capsys, tmp_path):
  assert bench.main(["train", "mm1-tiny", "--official", str(tmp_path), *TRAIN_ARGS]) == 2
  assert "no nanoMosaics/mosaic_model.py there" in capsys.readouterr().err
  checkout = _official_checkout(tmp_path, "x = 1\n")
  assert bench.main(["train", "mm2-tiny", "--official", str(checkout), *TRAIN_ARGS]) == 2
  assert "compares nanoMosaics' MemoryMosaic with mm1" in capsys.readouterr().err
  pytest.importorskip("torch")
  assert bench.main(["train", "mm1-tiny", "--official", str(checkout), *TRAIN_ARGS]) == 2
  assert "defines no MemoryMosaic: not nanoMosaics' model file" in capsys.readouterr().err


_ATTN = "jit(step)/jvp(MosaicV1)/h_0/attn"
_HLO = f"""
%fused_computation.3 (param_0: f32[8,4], param_1: f32[8,4]) -> f32[8,8] {{
  %param_0 = f32[8,4]{{1,0}} parameter(0)
  %param_1 = f32[8,4]{{1,0}} parameter(1)
  ROOT %dot.2 = f32[8,8]{{1,0}} dot(%param_0, %param_1)
}}

%fused_computation.4 (param_0: f32[8,8]) -> f32[8] {{
  %param_0 = f32[8,8]{{1,0}} parameter(0)
  ROOT %reduce.1 = f32[8]{{0}} reduce(%param_0)
}}

ENTRY %main (p: f32[8,4]) -> f32[8] {{
  %p = f32[8,4]{{1,0}} parameter(0)
  %exp.1 = f32[8,4]{{1,0}} exponential(%p), metadata={{op_name="{_ATTN}/exp"}}
  %ynn_fusion.3 = f32[8,8]{{1,0}} fusion(%exp.1, %p), kind=kCustom, calls=%fused_computation.3
  ROOT %ynn_fusion.4 = f32[8]{{0}} fusion(%ynn_fusion.3), kind=kCustom, calls=%fused_computation.4
}}
"""


def test_profile_attributes_library_fusions_to_their_producers():
  """CPU library fusions have no metadata: they take their operand's module (through chains of
  such fusions), as a matmul when they fuse a dot."""
  names = profile.hlo_op_names(_HLO)
  assert names["exp.1"] == f"{_ATTN}/exp"
  assert names["ynn_fusion.3"] == f"{_ATTN}/dot_general"
  assert profile._op_group(names["ynn_fusion.3"], "MosaicV1") == ("h_*/attn", "forward", "matmul")
  assert profile._op_group(names["ynn_fusion.4"], "MosaicV1") == ("h_*/attn", "forward", "other")


def _kernel_rows(out):
  """{(band, impl): cells after the impl} of the `kernels` table."""
  rows = {}
  for line in out.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if line.startswith("| ") and len(cells) == 8 and cells[1].isdigit():
      rows[cells[0].split()[0], cells[3]] = cells[4:]
  return rows


KERNELS_ARGS = [
    "kernels",
    "--seq-lens",
    "512",
    "--heads",
    "2",
    "--head-dims",
    "16",
    "--dtype",
    "float32",
    "--repeats",
    "1",
    "--matmul-size",
    "128",
]


def test_kernels_table(capsys):
  assert bench.main(KERNELS_ARGS) == 0
  out = capsys.readouterr().out
  assert "float32 matmul (128^3)" in out and "backward = 2.5 x forward" in out
  header = [c.strip() for c in out.splitlines()[2].strip("|").split("|")]
  assert header == [
      "band",
      "T",
      "head dim",
      "impl",
      "time (ms)",
      "useful TFLOP/s",
      "of matmul",
      "peak memory (MB)",
  ]
  impls = bench_kernels.available_impls("cpu")
  assert {"reference", "xla"} <= set(impls)
  assert not any(name.startswith("pallas") for name in impls)
  rows = _kernel_rows(out)
  assert set(rows) == {(band, impl) for band in ("short-term", "long-term") for impl in impls}
  for time_ms, tflops, fraction, peak_mb in rows.values():
    assert float(time_ms) > 0 and float(tflops) > 0 and float(peak_mb) > 0
    assert fraction.endswith("%")


def test_kernels_skips_dense_impls_that_do_not_fit(capsys):
  assert bench.main([*KERNELS_ARGS, "--bands", "v1", "--max-dense-gb", "1e-4"]) == 0
  rows = _kernel_rows(capsys.readouterr().out)
  assert rows["v1", "reference"][0].startswith("skipped (does not fit")
  assert float(rows["v1", "xla"][0]) > 0  # Memory linear in T: runs whatever the limit.


def test_kernels_rejects_impls_foreign_to_the_backend(capsys):
  assert "pallas_tpu" not in bench_kernels.available_impls("cpu")
  assert "pallas_tpu" in bench_kernels.available_impls("tpu")
  assert bench_kernels.impl_unavailable_reason("pallas_tpu", "gpu") == "runs on tpu only"
  assert "pallas_mosaic_gpu" in bench_kernels.available_impls("gpu", "bfloat16")
  assert "pallas_mosaic_gpu" not in bench_kernels.available_impls("gpu", "float32")
  assert "pallas_gpu" in bench_kernels.available_impls("gpu", "float32")
  reason = bench_kernels.impl_unavailable_reason("pallas_mosaic_gpu", "gpu", "float32")
  assert reason == "takes bfloat16 and float16 inputs only"
  if jax.default_backend() == "cpu":
    assert bench.main([*KERNELS_ARGS, "--impls", "pallas_tpu"]) == 2
    assert "interpret mode on CPU is not a benchmark" in capsys.readouterr().err


@pytest.mark.slow
def test_train_profile_attributes_time_to_model_components(capsys, tmp_path):
  trace_dir = str(tmp_path / "trace")
  assert (
      bench.main(
          [
              "train",
              "mm1-tiny",
              "--steps",
              "1",
              "--repeats",
              "1",
              "--matmul-size",
              "64",
              "--set",
              "train.batch_size=2",
              "data.seq_len=32",
              "--profile",
              trace_dir,
          ]
      )
      == 0
  )
  out = capsys.readouterr().out
  rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
  groups = {tuple(c.strip() for c in row[:3]) for row in rows}
  # Both memories of the layers, both passes, matmuls among them; the optimizer apart.
  for component in ("h_*/attn", "h_*/mlp"):
    assert {(component, "forward", "matmul"), (component, "backward", "matmul")} <= groups
  assert any(
      component.startswith(("outside the model", "unattributed")) for component, _, _ in groups
  )
  shares = [float(row[4].strip().rstrip("%")) for row in rows if row[4].strip().endswith("%")]
  assert 95.0 <= sum(shares) <= 100.5  # Rows under 0.1% are left out.
  assert list((tmp_path / "trace").rglob("*.xplane.pb"))


@pytest.mark.slow  # Re-runs the full context once per new token: a compile per length.
def test_decode_table(capsys):
  """The decode benchmark prints its table; the cache of v2 without long-term memory is constant."""
  args = ["decode", "mm2-tiny", "--prompt-len", "8", "--new-tokens", "16", "--bucket", "8"]
  assert bench.main([*args, "--repeats", "1", "--set", "model.long_term_memory=false"]) == 0
  out = capsys.readouterr().out
  assert "| positions | cached µs/token | full re-run µs/token | ratio |" in out
  assert "| 8-15 |" in out and "| 16-23 |" in out
  assert "(constant:" in out
  assert bench.main([*args, "--no-rerun", "--repeats", "1"]) == 0
  out = capsys.readouterr().out
  assert "full re-run: not run" in out and "(grows with max_len" in out


def test_kernels_times_block_selection_on_unbounded_bands(capsys):
  """`--select-blocks`: one row per K on the long-term band only, its useful FLOPs counted over
  the pairs it reads (fewer than the full band's, so at equal speed a lower rate)."""
  args = [*KERNELS_ARGS, "--impls", "xla", "--select-blocks", "1", "--select-blocks", "3"]
  args += ["--select-block-size", "32"]
  assert bench.main(args) == 0
  rows = _kernel_rows(capsys.readouterr().out)
  assert set(rows) == {
      ("short-term", "xla"),
      ("long-term", "xla"),
      ("long-term", "select 1+1/32"),
      ("long-term", "select 3+1/32"),
  }
  for time_ms, tflops, _, _ in rows.values():
    assert float(time_ms) > 0 and float(tflops) > 0


def test_kernels_names_a_bad_selection(capsys):
  assert bench.main([*KERNELS_ARGS, "--select-blocks", "2", "--select-recent", "0"]) == 2
  assert "recent must be >= 1" in capsys.readouterr().err


def test_decode_past_a_length_its_parameters_fix_is_refused(capsys):
  # GPT-2's position table has block_size rows: no longer cache or baseline exists.
  args = ["decode", "gpt2-tiny", "--prompt-len", "8", "--new-tokens", "4096", "--bucket", "8"]
  assert bench.main(args) == 2
  assert "gpt2-tiny reads at most" in capsys.readouterr().err
