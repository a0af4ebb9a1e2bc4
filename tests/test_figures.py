"""Figures across reproductions: the v1 RegBench figure reads each directory's own results and the
paper's numbers of its declaration."""

from __future__ import annotations

import statistics

import pytest

from mosaics_jax import registry
from mosaics_jax.cli import plot as plot_cli
from mosaics_jax.repro import figures, plan as plan_lib, report, runner

# (run, seed) -> (accuracy, l1, 3-gram accuracy, 3-gram l1), made up.
VALUES = {
    ("mm1-library", 0): (0.9, 0.6, 0.8, 0.7),
    ("mm1-library", 1): (0.8, 0.5, 0.8, 0.7),
    ("gpt2", 0): (0.5, 0.9, 0.8, 0.7),
    ("gpt2", 1): (0.4, 1.0, 0.8, 0.7),
}


def _reproduction_dir(root, name):
  repro = registry.get_reproduction(name)
  runner.write_json(root / runner.MANIFEST, {"reproduction": name, "set": []})
  metrics = ("accuracy", "l1", "ngram3_accuracy", "ngram3_l1")
  for (run, seed), values in VALUES.items():
    records = [
        {"task": "regbench", "metric": m, "value": v, "num_examples": 500, "settings": {}}
        for m, v in zip(metrics, values, strict=True)
    ]
    runner.write_jsonl(runner.results_path(root, repro, run, seed, "regbench"), records)
  report.write(repro, root, seeds=2)
  return root


def test_regbench_points_are_the_means_over_seeds_beside_the_paper(tmp_path):
  languages, points = figures.regbench_points(_reproduction_dir(tmp_path, "regbench-paper-500"))
  assert languages == 500
  mean, std, paper = points[("mm1-library-regbench", "accuracy")]
  assert mean == pytest.approx(0.85) and std == pytest.approx(statistics.stdev([0.9, 0.8]))
  assert paper == 0.93  # The figure's Memory Mosaics at 500 languages.
  assert points[("gpt2-regbench", "l1")][::2] == (pytest.approx(0.95), 0.64)
  assert points[("in-context 3-gram", "accuracy")] == (pytest.approx(0.8), 0.0, None)


def test_mosaics_plot_draws_the_figure_and_names_a_wrong_directory(tmp_path, capsys):
  dirs = [_reproduction_dir(tmp_path / n, n) for n in ("regbench-paper", "regbench-paper-1000")]
  out = tmp_path / "regbench.png"
  assert plot_cli.main(["--regbench", *map(str, dirs), "-o", str(out)]) == 0
  assert out.stat().st_size > 10_000
  runner.write_json(tmp_path / "other" / runner.MANIFEST, {"reproduction": "induction", "set": []})
  assert plot_cli.main(["--regbench", str(tmp_path / "other"), "-o", str(out)]) == 2
  assert "holds induction, not a RegBench reproduction" in capsys.readouterr().err
  with pytest.raises(plan_lib.ReproError, match="not a reproduction's directory"):
    figures.regbench_points(tmp_path / "nowhere")
