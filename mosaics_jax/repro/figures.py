"""Figures that span reproductions: the v1 paper's RegBench figure, accuracy and L1 against the
number of training languages (`mosaics-plot --regbench DIR...`), ours beside the paper's.

Each DIR is a `regbench-paper*` reproduction's directory (`experiments/repro_v1.py`): its manifest
names the reproduction, whose runs say the number of training languages
(`data.regbench_languages=N`) and whose paper numbers give the paper's points; its results.jsonl
gives ours, means over seeds with their standard deviations, and the in-context 3-gram's on the
same sequences. Drawn on matplotlib's Agg canvas (the `plots` extra).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

from mosaics_jax import registry
from mosaics_jax.repro import plan as plan_lib, report, runner

_LANGUAGES = "data.regbench_languages="
_METRICS = (("accuracy", "accuracy"), ("l1", "L1 (seq_icl's TVD, no 1/2)"))
NGRAM = "ngram3_"  # The in-context 3-gram's metrics in the regbench task's records.


def regbench_points(root: str | os.PathLike) -> tuple[int, dict[tuple[str, str], tuple]]:
  """(training languages, {(series, metric): (ours mean, ours std, paper value or None)}) of one
  reproduction directory; series are the runs' experiments and "in-context 3-gram"."""
  root = pathlib.Path(root)
  try:
    name = json.loads((root / runner.MANIFEST).read_text())["reproduction"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise plan_lib.ReproError(f"{root} is not a reproduction's directory ({e})") from None
  repro = registry.get_reproduction(name)
  found = {a.removeprefix(_LANGUAGES) for r in repro.runs for a in r.overrides}
  counts = {int(a) for a in found if a.isdigit()}
  if repro.evaluations[0].task != "regbench" or len(counts) != 1:
    raise plan_lib.ReproError(
        f"{root} holds {name}, not a RegBench reproduction with one number of training languages"
    )
  experiments = {r.name: r.experiment for r in repro.runs}
  paper = {(p.ours.run, p.ours.metric): p.value for p in repro.paper if p.ours is not None}
  points = {}
  for (run, _, _, metric, _), value in report.aggregate(report.read_results(root)).items():
    base = metric.removeprefix(NGRAM)
    if base not in dict(_METRICS):
      continue
    if metric.startswith(NGRAM):  # The same sequences for every run: one series.
      points[("in-context 3-gram", base)] = (value.mean, value.std, None)
    else:
      points[(experiments[run], base)] = (value.mean, value.std, paper.get((run, metric)))
  return counts.pop(), points


def regbench(roots: Sequence[str | os.PathLike], output: str | os.PathLike) -> pathlib.Path:
  """Draws accuracy and L1 against training languages for the runs of `roots` (module doc)."""
  from matplotlib import figure as figure_lib  # The optional `plots` extra.
  from matplotlib.backends import backend_agg

  by_languages = dict(regbench_points(root) for root in roots)
  if not any(by_languages.values()):
    raise ValueError(f"no RegBench results in {', '.join(map(str, roots))}: run mosaics-repro")
  fig = figure_lib.Figure(figsize=(10, 4))
  backend_agg.FigureCanvasAgg(fig)
  series = sorted({s for points in by_languages.values() for s, _ in points})
  languages = sorted(by_languages)
  for i, (metric, label) in enumerate(_METRICS):
    ax = fig.add_subplot(1, 2, i + 1)
    for k, name in enumerate(series):
      color = f"C{k}"
      rows = [(n, by_languages[n].get((name, metric))) for n in languages]
      rows = [(n, p) for n, p in rows if p is not None]
      if not rows:
        continue
      xs = [n for n, _ in rows]
      style = ":" if name == "in-context 3-gram" else "-"
      ax.errorbar(
          xs, [p[0] for _, p in rows], yerr=[p[1] for _, p in rows], fmt="o" + style, color=color,
          label=f"{name} (ours)", capsize=3,
      )  # fmt: skip
      paper = [(n, p[2]) for n, p in rows if p[2] is not None]
      if paper:
        ax.plot(*zip(*paper), "s--", color=color, alpha=0.5, label=f"{name} (paper)")
    ax.set_xscale("log")
    ax.set_xlabel("training languages")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  fig.axes[0].legend(fontsize=7)
  fig.suptitle("RegBench, held-out languages: means over seeds (bars: std)")
  fig.tight_layout()
  path = pathlib.Path(output)
  fig.savefig(path, dpi=120)
  return path
