"""`mosaics-bench accelerator --out DIR`: the prepared check of a GPU or TPU, in one short run.

Accelerator time is rare and short, so everything it should prove is planned here, step by step,
each a subprocess with its own time budget (`Step`): the device-only tests, every retrieve
implementation against the reference on the device (pytest, forward and gradients, both bands,
float32 and bfloat16), the `mosaics-bench kernels` sweep one length at a time, one `mosaics-bench
train` and one `mosaics-bench decode`. A step that overruns its budget is stopped and the run goes
on; every step writes its table as markdown (its stdout) and JSON into DIR as it goes, so what
was measured is kept. `summary.md` / `summary.json` list the steps and mark each target of the
kernels issue met, not met, or not measured (docs/accelerators.md). `--dry-run` runs every step
on tiny sizes on any backend (a CPU test in CI), so the script is known to work before a device
is lent.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable

from mosaics_jax.analysis import bench_kernels

# The kernels issue's targets, at these lengths (design.md, docs/accelerators.md).
DENSE_TARGET_LEN, XLA_TARGET_LEN = 16384, 32768


@dataclasses.dataclass(frozen=True)
class Step:
  """One command of the check: its output goes to DIR/<name>.md, its rows to DIR/<name>.json."""

  name: str
  argv: tuple[str, ...]
  budget_s: float
  kind: str  # "pytest" (rows from its JUnit XML) or "bench" (rows from --json).


@dataclasses.dataclass(frozen=True)
class StepResult:
  name: str
  command: str
  status: str  # "ok", "failed (exit N)" or "over budget (N s)".
  seconds: float


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What the steps measure: the device's sizes, or tiny ones for a dry run."""

  seq_lens: tuple[int, ...]  # One kernels step per length.
  kernels: tuple[str, ...]  # Flags of `mosaics-bench kernels`.
  train: tuple[str, ...]  # Experiment and flags of `mosaics-bench train`.
  decode: tuple[str, ...]  # Experiment and flags of `mosaics-bench decode`.
  correctness: tuple[str, ...]  # pytest's selection of the implementations' tests.


DEVICE = Sizes(
    seq_lens=(4096, 8192, DENSE_TARGET_LEN, XLA_TARGET_LEN),
    kernels=("--repeats", "3"),  # 16 heads, head dims 64 and 128, bfloat16: the defaults.
    train=("mm2-char-small", "--steps", "3", "--repeats", "3"),
    decode=("mm2-char-small", "--new-tokens", "1024", "--repeats", "3"),
    correctness=("-m", "not slow"),
)
DRY_RUN = Sizes(
    seq_lens=(64, 128),
    kernels=("--heads", "2", "--head-dims", "16", "--repeats", "1", "--matmul-size", "64"),
    train=(
        *("mm1-tiny", "--steps", "1", "--repeats", "1", "--matmul-size", "64"),
        *("--set", "train.batch_size=2", "data.seq_len=32"),
    ),
    decode=(
        "mm2-tiny",
        "--prompt-len",
        "8",
        "--new-tokens",
        "16",
        "--bucket",
        "8",
        "--repeats",
        "1",
    ),
    correctness=("-k", "forward_matches_oracle and v1"),
)
# Seconds per step: the whole check stops within TOTAL_BUDGET_S, 8 minutes.
# The tests of the GPU kernels (Triton, then Mosaic GPU), run against the reference on a GPU.
GPU_KERNEL_TESTS = ("tests/test_pallas_gpu.py", "tests/test_pallas_mosaic_gpu.py")
BUDGETS = {"device_tests": 60, "correctness": 90, "kernels": 50, "train": 60, "decode": 40}
TOTAL_BUDGET_S = 480.0


def plan(out: pathlib.Path, backend: str, dry_run: bool = False) -> list[Step]:
  """The steps for `backend` ("gpu" or "tpu"; any, with the tiny sizes of a dry run)."""
  sizes = DRY_RUN if dry_run else DEVICE
  bench = (sys.executable, "-m", "mosaics_jax.cli.bench")
  pytest = (sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "-p", "no:cacheprovider")
  marker = "gpu or tpu" if dry_run else {"gpu": "gpu", "tpu": "tpu"}.get(backend, "gpu or tpu")
  kernel_tests = list(GPU_KERNEL_TESTS) if backend == "gpu" else []
  tests = {
      "device_tests": (
          *("-m", marker, *GPU_KERNEL_TESTS, "tests/test_pallas_tpu.py"),
          "tests/test_aot.py",
      ),
      "correctness": ("tests/test_retrieve.py", *kernel_tests, *sizes.correctness),
  }
  steps = [
      Step(name, (*pytest, *args, "--junitxml", str(out / f"{name}.xml")), BUDGETS[name], "pytest")
      for name, args in tests.items()
  ]
  benches = [
      (f"kernels_{t}", ("kernels", "--seq-lens", str(t), *sizes.kernels)) for t in sizes.seq_lens
  ]
  benches += [("train", ("train", *sizes.train)), ("decode", ("decode", *sizes.decode))]
  for name, args in benches:
    budget = BUDGETS[name.split("_")[0]]
    steps.append(Step(name, (*bench, *args, "--json", str(out / f"{name}.json")), budget, "bench"))
  return steps


def run_step(
    step: Step, out: pathlib.Path, clock: Callable[[], float] = time.monotonic
) -> StepResult:
  """Runs one step with its budget, its stdout and stderr into DIR/<name>.md; never raises."""
  start = clock()
  log = out / f"{step.name}.md"
  with log.open("w") as stdout:
    try:
      completed = subprocess.run(
          step.argv, stdout=stdout, stderr=subprocess.STDOUT, timeout=step.budget_s, check=False
      )
      status = "ok" if completed.returncode == 0 else f"failed (exit {completed.returncode})"
    except subprocess.TimeoutExpired:
      status = f"over budget ({step.budget_s:g} s)"
  return StepResult(step.name, shlex.join(step.argv), status, clock() - start)


def pytest_rows(path: pathlib.Path) -> list[dict[str, str]]:
  """(test, outcome) of every test case in a JUnit XML report that pytest wrote; none when the
  report is missing or unreadable."""
  try:
    root = ElementTree.parse(path).getroot()
  except (FileNotFoundError, ElementTree.ParseError):
    return []  # Not written, or cut short when its step was stopped: the step's status says so.
  rows = []
  for case in root.iter("testcase"):
    outcome = "passed"
    for tag in ("failure", "error", "skipped"):
      if case.find(tag) is not None:
        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
    rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome})
  return rows


@dataclasses.dataclass(frozen=True)
class Target:
  """One target of the kernels issue: the kernel's time against a baseline's, at one length."""

  name: str
  band: str  # A `bench_kernels.KERNEL_BANDS` key.
  seq_len: int
  baseline: str
  # Met when kernel seconds <= factor x baseline seconds (factor < 1: "factor^-1 x faster").
  factor: float


def targets() -> list[Target]:
  """The H100 targets of the kernels issue (issue 4), judged on whatever device runs the check."""
  return [
      Target("short band 10x faster than dense XLA", "short", DENSE_TARGET_LEN, "reference", 0.1),
      Target("short band within 1.2x of cuDNN's window", "short", DENSE_TARGET_LEN, "shift", 1.2),
      Target("long band within 1.3x of cuDNN causal", "long", DENSE_TARGET_LEN, "shift", 1.3),
      Target("short band 5x faster than xla", "short", XLA_TARGET_LEN, "xla", 0.2),
      Target("long band 5x faster than xla", "long", XLA_TARGET_LEN, "xla", 0.2),
  ]


def judge(target: Target, kernel_impl: str, rows: list[dict]) -> list[dict]:
  """The target's verdict per head dim from the kernels rows: met, not met or not measured."""
  label = bench_kernels.KERNEL_BANDS[target.band][0]
  times = {
      (r["impl"], r["head_dim"]): r["seconds"]
      for r in rows
      if r["band"] == label and r["seq_len"] == target.seq_len
  }
  verdicts = []
  for head_dim in sorted({d for _, d in times}) or [None]:
    ours, theirs = times.get((kernel_impl, head_dim)), times.get((target.baseline, head_dim))
    if ours is None or theirs is None:
      verdict, ratio = "not measured", None
    else:
      ratio = ours / theirs
      verdict = "met" if ratio <= target.factor else "not met"
    verdicts.append(
        {"target": target.name, "head_dim": head_dim, "ratio": ratio, "verdict": verdict}
    )
  return verdicts


def judge_memory(
    kernel_impl: str, rows: list[dict], short: int = 4096, long: int = 32768
) -> list[dict]:
  """ "Peak memory linear in T" per band and head dim: the kernel's peak at `long` over its peak
  at `short` within 1.1 x long / short."""
  peaks = {
      (r["band"], r["head_dim"], r["seq_len"]): r["peak_mb"]
      for r in rows
      if r["impl"] == kernel_impl
  }
  verdicts = []
  for band, head_dim in sorted({(b, d) for b, d, _ in peaks}) or [("-", None)]:
    low, high = peaks.get((band, head_dim, short)), peaks.get((band, head_dim, long))
    ratio = None if not low or high is None else high / low
    verdict = (
        "not measured" if ratio is None else "met" if ratio <= 1.1 * long / short else "not met"
    )
    name = f"peak memory linear in T ({band}, {long} vs {short})"
    verdicts.append({"target": name, "head_dim": head_dim, "ratio": ratio, "verdict": verdict})
  return verdicts


def check(
    out: pathlib.Path,
    backend: str,
    *,
    dry_run: bool = False,
    steps: list[Step] | None = None,
    total_budget_s: float = TOTAL_BUDGET_S,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
  """Runs the steps (default: `plan`) within their budgets and the total one, writing each
  step's tables and, after every step, DIR/summary.json and summary.md; returns the summary."""
  out.mkdir(parents=True, exist_ok=True)
  steps = plan(out, backend, dry_run) if steps is None else steps
  deadline = clock() + total_budget_s
  results = []
  summary = _summary(out, backend, dry_run, results)
  for step in steps:
    remaining = deadline - clock()
    if remaining <= 0:
      results.append(
          StepResult(step.name, shlex.join(step.argv), "not run: total budget spent", 0.0)
      )
    else:
      results.append(
          run_step(dataclasses.replace(step, budget_s=min(step.budget_s, remaining)), out, clock)
      )
      if step.kind == "pytest":
        rows = pytest_rows(out / f"{step.name}.xml")
        (out / f"{step.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    summary = _summary(out, backend, dry_run, results)
  return summary


def _kernel_rows(out: pathlib.Path) -> list[dict]:
  rows = []
  for path in sorted(out.glob("kernels_*.json")):
    rows += json.loads(path.read_text())
  return rows


def _summary(out: pathlib.Path, backend: str, dry_run: bool, results: list[StepResult]) -> dict:
  # The backend's Pallas kernels; a dry run on a CPU lists pallas_gpu's targets, unmeasured.
  kernels = bench_kernels.native_kernels(backend) or ("pallas_gpu",)
  rows = _kernel_rows(out)
  verdicts = []
  for kernel in kernels:
    found = [v for t in targets() for v in judge(t, kernel, rows)] + judge_memory(kernel, rows)
    verdicts += [{"kernel": kernel, **v} for v in found]
  summary = {
      "backend": backend,
      "dry_run": dry_run,
      "kernels": list(kernels),
      "steps": [dataclasses.asdict(r) for r in results],
      "targets": verdicts,
  }
  (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  lines = [
      f"accelerator check on {backend}{' (dry run: tiny sizes)' if dry_run else ''},"
      f" kernels {', '.join(kernels)}",
      "",
      "| step | status | seconds |",
      "|---|---|---:|",
      *(f"| {r.name} | {r.status} | {r.seconds:.1f} |" for r in results),
      "",
      "| kernel | target (kernel time / baseline time) | head dim | ratio | verdict |",
      "|---|---|---:|---:|---|",
      *(
          f"| {v['kernel']} | {v['target']} | {v['head_dim'] or '-'} |"
          f" {'-' if v['ratio'] is None else format(v['ratio'], '.3f')} | {v['verdict']} |"
          for v in verdicts
      ),
  ]
  (out / "summary.md").write_text("\n".join(lines) + "\n")
  return summary
