"""Results files keep what they hold (issue 29, cases 4, 5 and 7): a `mosaics-repro` command with
fewer seeds than an earlier one removes none of their results, `mosaics-eval --out` refuses a
target that cannot take JSON lines before any model loads and appends whole records or none (a
write that fails partway leaves the file as it was), and a damaged timing file, results file or
non-numeric result of a reproduction is a one-line error naming it."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
import test_repro

from mosaics_jax import registry
from mosaics_jax.cli import eval as eval_cli, plot as plot_cli, repro as repro_cli
from mosaics_jax.eval import harness as harness_lib, results as results_lib, tasks as tasks_lib
from mosaics_jax.repro import report as report_lib, runner
from mosaics_jax.train import loop

# tests/test_repro.py's two runs of equal size and its check, with one evaluation (at two lengths).
REPRO = dataclasses.replace(
    test_repro.TINY, name="files", evaluations=test_repro.TINY.evaluations[1:], paper=()
)


def _value(run: str, seed: int, length: int, version: int) -> float:
  """A result that differs by run, seed, length and evaluation (`version`)."""
  return (run == "mm1") + seed / 10 + length / 1000 + version / 100


def _evaluated(root: pathlib.Path, seeds: int, version: int) -> None:
  """Each run's evaluation files of seeds 0 to `seeds` - 1, written as the runner does."""
  for run in ("mm1", "llama"):
    for seed in range(seeds):
      records = [
          {
              "task": "synthetic",
              "metric": "accuracy",
              "value": _value(run, seed, n, version),
              "num_examples": 8,
              "settings": {"length": n},
              "seed": 0,
              "model": {},
              "date": None,
          }
          for n in (64, 128)
      ]
      runner.write_jsonl(runner.results_path(root, REPRO, run, seed, "synthetic"), records)


@pytest.fixture
def repro(monkeypatch):
  """`mosaics-repro files --workdir DIR --seeds N` as a function of (DIR, N, version), its
  runner a stand-in that evaluates every seed of the command again (no training)."""
  monkeypatch.setattr(registry, "all_reproductions", lambda: {"files": REPRO})

  def command(root, seeds, version=0):
    def run(repro, root, *, seeds, **_):
      _evaluated(pathlib.Path(root), seeds, version)
      return runner.Progress(0, 2 * seeds, None)

    monkeypatch.setattr(runner, "run", run)
    return repro_cli.main(["files", "--workdir", str(root), "--seeds", str(seeds), "--no-progress"])

  return command


def _rows(root: pathlib.Path) -> dict[tuple, float]:
  """results.jsonl by (run, seed, length); a row twice fails."""
  rows = {}
  for line in (root / report_lib.RESULTS).read_text().splitlines():
    r = json.loads(line)
    key = (r["run"], r["train_seed"], r["settings"]["length"])
    assert key not in rows, key
    rows[key] = r["value"]
  return rows


def test_a_rerun_with_fewer_seeds_keeps_the_other_seeds_results(repro, tmp_path, capsys):
  # The case: --seeds 4, then --seeds 2 (whose seeds are evaluated again: version 1).
  assert repro(tmp_path, 4) == 0
  assert len(_rows(tmp_path)) == 2 * 4 * 2
  assert repro(tmp_path, 2, version=1) == 0
  expected = {
      (run, seed, n): _value(run, seed, n, 1 if seed < 2 else 0)
      for run in ("mm1", "llama")
      for seed in range(4)
      for n in (64, 128)
  }
  assert _rows(tmp_path) == pytest.approx(expected)
  assert "results.jsonl (seeds 0-3)" in capsys.readouterr().out
  # The report is of seeds 0-1, and says that results.jsonl keeps 2-3.
  text = (tmp_path / report_lib.REPORT).read_text()
  assert "Seeds: 0-1 (`--seeds 2`)" in text
  assert "also keeps seeds 2-3 of earlier commands, left out here (`--seeds 4`" in text
  mean = np.mean([_value("mm1", s, 128, 1) for s in range(2)])
  assert f"| mm1 | accuracy | length=128 | {mean:.4g} |" in text


def test_a_check_waits_for_every_seed_of_both_sides(repro, tmp_path):
  assert repro(tmp_path, 2) == 0
  assert "**Verdict: reproduced**" in (tmp_path / report_lib.REPORT).read_text()
  # llama's seed 1 lost: mm1's mean over 0-1 against llama's over 0 alone would be another test.
  runner.results_path(tmp_path, REPRO, "llama", 1, "synthetic").unlink()
  report = report_lib.write(REPRO, tmp_path, seeds=2)
  (outcome,) = report.outcomes
  assert report.verdict == "incomplete" and outcome.holds is None and outcome.missing == (1,)
  assert "no result yet of seed(s) 1" in report.path.read_text()


def _fail(*args, **kwargs):
  raise AssertionError("work started before the input was checked")


def _one_line_error(capsys, prog: str, *names: str) -> str:
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
  assert all(name in err for name in names), err
  return err


@pytest.mark.parametrize(
    "text, named",
    [
        ('{"train_seconds": 12.5, "eval_sec', "is unreadable"),  # Cut off.
        ('{"train_seconds": "12 s"}', "train_seconds is '12 s', not a number"),
        ("[12.5]", "not a JSON object"),
    ],
)
def test_a_damaged_timing_file_is_named_before_any_training(
    text, named, tmp_path, monkeypatch, capsys
):
  monkeypatch.setattr(registry, "all_reproductions", lambda: {"files": REPRO})
  monkeypatch.setattr(loop, "train", _fail)
  path = runner.run_dir(tmp_path, "llama", 0) / runner.RESULTS_DIR / runner.TIMING
  path.parent.mkdir(parents=True)
  path.write_text(text)
  argv = ["files", "--workdir", str(tmp_path), "--seeds", "1", "--no-progress"]
  assert repro_cli.main(argv) == 2
  _one_line_error(capsys, "mosaics-repro", str(path), named, "delete it")
  assert path.read_text() == text


@pytest.mark.parametrize("value", ["0.9", None, True])
def test_a_non_numeric_result_is_named_with_its_line(value, repro, tmp_path, monkeypatch, capsys):
  assert repro(tmp_path, 1) == 0
  before = (tmp_path / report_lib.RESULTS).read_text()
  path = runner.results_path(tmp_path, REPRO, "llama", 0, "synthetic")
  lines = path.read_text().splitlines()
  bad = {**json.loads(lines[1]), "value": value}
  path.write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
  # Report what is there: evaluate nothing again.
  monkeypatch.setattr(runner, "run", lambda *a, **k: runner.Progress(0, 0, None))
  assert repro_cli.main(["files", "--workdir", str(tmp_path), "--seeds", "1"]) == 2
  _one_line_error(capsys, "mosaics-repro", f"{path}:2", "is not a number", "delete it")
  assert (tmp_path / report_lib.RESULTS).read_text() == before


def test_a_damaged_results_jsonl_is_named_and_kept(repro, tmp_path, monkeypatch, capsys):
  assert repro(tmp_path, 1) == 0
  gathered = tmp_path / report_lib.RESULTS
  text = gathered.read_text() + '{"run": "mm1", "train_se\n'
  gathered.write_text(text)
  monkeypatch.setattr(runner, "run", _fail)
  assert repro_cli.main(["files", "--workdir", str(tmp_path), "--seeds", "1"]) == 2
  _one_line_error(capsys, "mosaics-repro", f"{gathered}:5", "move it away")
  assert gathered.read_text() == text


# mosaics-eval --out


@pytest.fixture
def no_model(monkeypatch):
  """Loading a model fails the test: a refused --out must come before it."""
  monkeypatch.setattr(harness_lib.Harness, "load", _fail)


def _targets(tmp_path: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
  """Targets that cannot take results: (path, what the error names)."""
  text = tmp_path / "input.txt"
  text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
  binary = tmp_path / "tokens.bin"
  binary.write_bytes(np.arange(300, dtype=np.uint16).tobytes())
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text('{"step": 2, "loss": 3.1}\n')
  return {
      "a directory": (tmp_path, "is a directory"),
      "a missing directory": (tmp_path / "missing" / "results.jsonl", "does not exist"),
      "the input text": (text, f"{text}:1 is not JSON"),
      "a binary file": (binary, "is a binary file"),
      "a run's metrics": (metrics, f"{metrics}:1 is not an evaluation record"),
  }


@pytest.mark.parametrize(
    "target",
    ["a directory", "a missing directory", "the input text", "a binary file", "a run's metrics"],
)
def test_out_is_refused_before_the_model_loads(target, no_model, tmp_path, capsys):
  path, named = _targets(tmp_path)[target]
  before = path.read_bytes() if path.is_file() else None
  argv = ["--task", "perplexity", "--set", f"perplexity.path={tmp_path / 'input.txt'}"]
  assert eval_cli.main([str(tmp_path / "model"), *argv, "--out", str(path)]) == 2
  _one_line_error(capsys, "mosaics-eval", f"--out {path}", named)
  if before is not None:
    assert path.read_bytes() == before
  assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only files and directories")
def test_an_unwritable_out_is_refused_before_the_model_loads(no_model, tmp_path, capsys):
  locked = tmp_path / "locked"
  locked.mkdir()
  results = tmp_path / "results.jsonl"
  results.write_text("")
  results.chmod(0o444)
  locked.chmod(0o555)
  for path, named in ((locked / "results.jsonl", "is not writable"), (results, "not writable")):
    assert eval_cli.main([str(tmp_path), "--task", "synthetic", "--out", str(path)]) == 2
    _one_line_error(capsys, "mosaics-eval", str(path), named)


def _result(length: int, value: float) -> results_lib.Result:
  return results_lib.Result("synthetic", "accuracy", value, 8, {"length": length}, {"kind": "mqar"})


def test_a_full_disk_leaves_the_file_as_it_was_and_prints_the_results(
    tmp_path, monkeypatch, capsys
):
  out = tmp_path / "results.jsonl"
  model = results_lib.Model("m", 3, ())
  old = [results_lib.record(_result(n, 0.5), model=model, seed=0) for n in (64, 128)]
  results_lib.append_jsonl(out, old)
  before = out.read_bytes()
  found = [_result(n, v) for n, v in ((64, 0.25), (128, 0.75), (256, 0.125))]
  monkeypatch.setattr(
      harness_lib.Harness, "load", lambda *a, **k: types.SimpleNamespace(info=model)
  )
  task = dataclasses.replace(tasks_lib.get("synthetic"), run=lambda harness, settings: found)
  monkeypatch.setattr(tasks_lib, "get", lambda name: task)
  write = os.write
  calls = []

  def full(fd, data):  # Takes half of the first write, then the disk is full.
    calls.append(len(data))
    if len(calls) == 1:
      return write(fd, bytes(data[: len(data) // 2]))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "write", full)
  assert eval_cli.main(["model", "--task", "synthetic", "--no-progress", "--out", str(out)]) == 2
  monkeypatch.undo()
  assert len(calls) == 2 and out.read_bytes() == before
  captured = capsys.readouterr()
  assert captured.err.count("\n") == 1 and "No space left on device" in captured.err
  printed = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
  assert [(r["settings"]["length"], r["value"]) for r in printed] == [
      (64, 0.25),
      (128, 0.75),
      (256, 0.125),
  ]


def test_a_write_cut_short_by_a_file_size_limit_leaves_the_file_as_it_was(tmp_path):
  """A real partial write: the process may not grow the file past its size, as on a full disk."""
  out = tmp_path / "results.jsonl"
  model = results_lib.Model("m", 3, ())
  results_lib.append_jsonl(out, [results_lib.record(_result(64, 0.5), model=model, seed=0)])
  before = out.read_bytes()
  script = f"""
import json, resource, signal, sys
from mosaics_jax.eval import results
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 100}, resource.RLIM_INFINITY))
record = json.loads(open({str(out)!r}).readline())
try:
  results.append_jsonl({str(out)!r}, [record] * 10)
except OSError as e:
  sys.exit(f"refused: {{e}}")
"""
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert "refused: [Errno 27] File too large" in done.stderr, done.stderr
  assert out.read_bytes() == before


def test_appends_are_whole_lines_after_a_last_line_without_its_newline(tmp_path):
  out = tmp_path / "results.jsonl"
  model = results_lib.Model("m", 3, ())
  first, second = (results_lib.record(_result(n, 0.5), model=model, seed=0) for n in (64, 128))
  out.write_text(json.dumps(first))  # Edited by hand: no newline at the end.
  results_lib.append_jsonl(out, [second])
  assert results_lib.read_jsonl(out) == [first, second]


def test_plot_refuses_a_non_numeric_value_naming_its_line(tmp_path, capsys):
  pytest.importorskip("matplotlib")
  out = tmp_path / "results.jsonl"
  model = results_lib.Model("m", 3, ())
  records = [results_lib.record(_result(n, 0.5), model=model, seed=0) for n in (64, 128, 256)]
  records[1]["value"] = "0.5"
  out.write_text("".join(json.dumps(r) + "\n" for r in records))
  assert plot_cli.main([str(out), "-o", str(tmp_path / "eval.png")]) == 2
  _one_line_error(capsys, "mosaics-plot", f"{out}:2", "'0.5' is not a number")
  assert not (tmp_path / "eval.png").exists()
