"""Figures of evaluation results (the `plots` extra): a panel per task and metric.

    plot_results(results.read_jsonl("results.jsonl"), "eval.png")

A metric measured at several task lengths is drawn against the length (RULER's curves), an
in-context classification score against the number of shots (its best prompt variant), and the loss
by position of `perplexity` against the position (the middle of each bucket); one line per model
(its path, step and overrides). Drawn on matplotlib's Agg canvas, without pyplot.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib import figure as figure_lib
from matplotlib.backends import backend_agg

STEP_AXIS = "training step"


def _x(record: Mapping[str, Any]) -> tuple[str, float] | None:
  """(the x axis, its value) of a record, or None for a record with no axis."""
  settings = record["settings"]
  if "position_start" in settings:
    return "position", (settings["position_start"] + settings["position_end"]) / 2
  if isinstance(settings.get("step"), int):  # A training run's validation record.
    return STEP_AXIS, settings["step"]
  if isinstance(settings.get("length"), int):
    return "task length (tokens)", settings["length"]
  if isinstance(settings.get("shots"), int) and "variant" not in settings:
    return "shots (demonstrations per class)", settings["shots"]  # The best variant's score.
  return None


def _model(record: Mapping[str, Any]) -> str:
  model = record.get("model") or {}
  label = pathlib.Path(str(model.get("path", "?"))).name
  if model.get("step") is not None:
    label += f" @{model['step']}"
  if model.get("overrides"):
    label += " " + " ".join(model["overrides"])
  return label


def plot_results(
    records: Sequence[Mapping[str, Any]],
    out_path: str | os.PathLike[str],
    *,
    title: str | None = None,
    dpi: int = 100,
) -> pathlib.Path:
  """Draws every (task, metric) measured at two lengths or more, by position, or by training
  step, in its own panel.

  Raises ValueError when there is no such metric.
  """
  # A point measured again (results appended by a later run) keeps its latest value.
  panels: dict[tuple[str, str, str], dict[str, dict[float, float]]] = {}
  for r in records:
    axis = _x(r)
    if axis is None:
      continue
    name, x = axis
    lines = panels.setdefault((r["task"], r["metric"], name), {})
    lines.setdefault(_model(r), {})[x] = r["value"]
  # A curve needs two points: a metric measured at one length alone is a table's, not a plot's.
  panels = {k: v for k, v in panels.items() if max(len(points) for points in v.values()) > 1}
  if not panels:
    raise ValueError(
        "no metric measured at two lengths or more, or by position (run tasks at several lengths,"
        " or perplexity)"
    )
  columns = min(3, len(panels))
  rows = math.ceil(len(panels) / columns)
  fig = figure_lib.Figure(figsize=(4.5 * columns, 3.5 * rows), dpi=dpi, layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  for i, ((task, metric, axis), lines) in enumerate(panels.items()):
    ax = fig.add_subplot(rows, columns, i + 1)
    for j, (label, points) in enumerate(lines.items()):
      xs, ys = zip(*sorted(points.items()))
      ax.plot(xs, ys, "o-", color=f"C{j % 10}", label=label, markersize=4)
    if axis not in ("position", STEP_AXIS):
      ax.set_xscale("log", base=2)
    if metric.startswith("string_match"):
      ax.set_ylim(-3, 103)  # RULER's scores are x100.
    ax.set_title(f"{task}: {metric}")
    ax.set_xlabel(axis)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  if title:
    fig.suptitle(title)
  out_path = pathlib.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_path)
  return out_path
