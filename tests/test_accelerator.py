"""`mosaics-bench accelerator`: the prepared device check runs every step (tiny sizes on CPU),
writes every table it promises, keeps to its budgets, and judges the kernels issue's targets."""

from __future__ import annotations

import json
import sys

import jax
import pytest

from mosaics_jax.analysis import accelerator, bench_kernels
from mosaics_jax.cli import bench

STEPS = ["device_tests", "correctness", "kernels_64", "kernels_128", "train", "decode"]


@pytest.mark.slow
def test_dry_run_writes_every_table(tmp_path, capsys):
  assert bench.main(["accelerator", "--out", str(tmp_path), "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "dry run" in out and "| target" in out
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert [s["name"] for s in summary["steps"]] == STEPS
  assert all(s["status"] == "ok" for s in summary["steps"])
  for name in STEPS:
    assert (tmp_path / f"{name}.md").read_text()
    rows = json.loads((tmp_path / f"{name}.json").read_text())
    assert isinstance(rows, list) and rows
  tests = json.loads((tmp_path / "correctness.json").read_text())
  assert {"test", "outcome"} == set(tests[0]) and {t["outcome"] for t in tests} == {"passed"}
  for seq_len in (64, 128):
    kernels = json.loads((tmp_path / f"kernels_{seq_len}.json").read_text())
    assert {r["seq_len"] for r in kernels} == {seq_len}
    assert {"xla", "reference"} <= {r["impl"] for r in kernels}
    assert all(r["seconds"] > 0 for r in kernels if r["skipped"] is None)
  (train,) = json.loads((tmp_path / "train.json").read_text())
  assert train["experiment"] == "mm1-tiny" and train["tokens_per_second"] > 0
  (decode,) = json.loads((tmp_path / "decode.json").read_text())
  assert decode["experiment"] == "mm2-tiny" and decode["decode_tokens_per_second"] > 0
  # No pallas kernel runs natively on CPU: every target is there, none measured.
  assert len(summary["targets"]) == len(accelerator.targets()) + 1  # And the memory one.
  assert {v["verdict"] for v in summary["targets"]} == {"not measured"}


def _step(name, code, budget_s):
  return accelerator.Step(name, (sys.executable, "-c", code), budget_s, "bench")


def test_a_step_over_its_budget_is_stopped_and_the_run_goes_on(tmp_path):
  steps = [
      _step("sleeps", "print('started', flush=True); import time; time.sleep(60)", 2),
      _step("after", "print('done')", 30),
  ]
  summary = accelerator.check(tmp_path, "gpu", steps=steps)
  sleeps, after = summary["steps"]
  assert sleeps["status"] == "over budget (2 s)" and sleeps["seconds"] < 30
  assert (tmp_path / "sleeps.md").read_text() == "started\n"  # What it printed is kept.
  assert after["status"] == "ok" and (tmp_path / "after.md").read_text() == "done\n"
  assert "| sleeps | over budget (2 s) |" in (tmp_path / "summary.md").read_text()


def test_the_total_budget_shortens_and_skips_steps(tmp_path):
  steps = [_step("sleeps", "import time; time.sleep(60)", 30), _step("never", "print(1)", 30)]
  summary = accelerator.check(tmp_path, "gpu", steps=steps, total_budget_s=2)
  sleeps, never = summary["steps"]
  assert sleeps["status"].startswith("over budget") and sleeps["seconds"] < 30
  assert never["status"] == "not run: total budget spent"
  assert not (tmp_path / "never.md").exists()


def test_a_failing_step_is_reported_with_its_exit_code(tmp_path):
  summary = accelerator.check(tmp_path, "gpu", steps=[_step("fails", "raise SystemExit(3)", 30)])
  assert summary["steps"][0]["status"] == "failed (exit 3)"


def _row(band, seq_len, impl, seconds, head_dim=64):
  label = bench_kernels.KERNEL_BANDS[band][0]
  return dict(band=label, seq_len=seq_len, head_dim=head_dim, impl=impl, seconds=seconds)


def test_targets_are_judged_from_the_kernel_rows():
  dense = accelerator.targets()[0]  # Short band 10x faster than dense XLA at 16k.
  n = accelerator.DENSE_TARGET_LEN
  rows = [_row("short", n, "pallas_gpu", 1.0), _row("short", n, "reference", 12.0)]
  rows += [_row("short", n, "pallas_gpu", 1.0, 128), _row("short", n, "reference", 8.0, 128)]
  rows += [_row("long", n, "reference", 1.0)]  # Another band: not used.
  verdicts = accelerator.judge(dense, "pallas_gpu", rows)
  assert [(v["head_dim"], v["verdict"]) for v in verdicts] == [(64, "met"), (128, "not met")]
  assert verdicts[0]["ratio"] == pytest.approx(1 / 12)
  missing = accelerator.judge(dense, "pallas_gpu", rows[:1])
  assert [v["verdict"] for v in missing] == ["not measured"]
  assert accelerator.judge(dense, "pallas_gpu", [])[0]["verdict"] == "not measured"


def test_without_an_accelerator_only_the_dry_run_runs(tmp_path, capsys):
  if jax.default_backend() != "cpu":
    pytest.skip("an accelerator is present")
  assert bench.main(["accelerator", "--out", str(tmp_path)]) == 2
  assert "no GPU or TPU here; --dry-run checks the steps" in capsys.readouterr().err


def test_peak_memory_is_judged_linear_in_t():
  rows = [
      {**_row("short", 4096, "pallas_gpu", 1.0), "peak_mb": 10.0},
      {**_row("short", 32768, "pallas_gpu", 9.0), "peak_mb": 85.0},
      {**_row("long", 4096, "pallas_gpu", 1.0), "peak_mb": 10.0},
      {**_row("long", 32768, "pallas_gpu", 9.0), "peak_mb": 640.0},  # Quadratic: 64x.
      {**_row("long", 32768, "xla", 9.0), "peak_mb": 1.0},  # Another implementation.
  ]
  verdicts = {v["target"]: v["verdict"] for v in accelerator.judge_memory("pallas_gpu", rows)}
  short, long = (bench_kernels.KERNEL_BANDS[band][0] for band in ("short", "long"))
  assert verdicts == {
      f"peak memory linear in T ({short}, 32768 vs 4096)": "met",
      f"peak memory linear in T ({long}, 32768 vs 4096)": "not met",
  }
  assert accelerator.judge_memory("pallas_gpu", rows[:1])[0]["verdict"] == "not measured"


def test_an_unreadable_junit_report_gives_no_rows(tmp_path):
  (tmp_path / "cut.xml").write_text("<testsuites><testsuite><testcase name=")
  assert accelerator.pytest_rows(tmp_path / "cut.xml") == []
  assert accelerator.pytest_rows(tmp_path / "missing.xml") == []


def test_no_steps_still_writes_a_summary(tmp_path):
  summary = accelerator.check(tmp_path, "gpu", steps=[])
  assert summary["steps"] == [] and (tmp_path / "summary.md").exists()
