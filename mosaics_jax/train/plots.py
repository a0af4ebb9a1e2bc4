"""Loss curves of training runs, drawn from their metrics.jsonl files (the `plots` extra).

    plot_runs(["runs/mm2", "runs/llama"], "loss.png", log_y=True, smoothing=0.9)

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so nothing needs a display
and no global backend is switched.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import figure as figure_lib, lines as lines_lib
from matplotlib.backends import backend_agg

from mosaics_jax.train import metrics


def ema(values: Sequence[float] | np.ndarray, smoothing: float) -> np.ndarray:
  """The debiased exponential moving average of `values`, as TensorBoard smooths curves.

  Non-finite values are skipped: they stay NaN, a gap in the curve, and do not enter the
  average.

  Args:
    values: the series.
    smoothing: the weight of the past, in [0, 1); 0 returns the series unchanged.
  """
  if not 0 <= smoothing < 1:
    raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
  smoothed = np.full(len(values), np.nan)
  average = weight = 0.0
  for i, value in enumerate(values):
    if math.isfinite(value):
      average = smoothing * average + (1 - smoothing) * value
      # Dividing by the total weight so far removes the pull towards the zero start.
      weight = smoothing * weight + (1 - smoothing)
      smoothed[i] = average / weight
  return smoothed


def _loss_curve(records: list[dict[str, Any]], split: str) -> tuple[np.ndarray, np.ndarray]:
  """The steps and losses of the records of `split`, by step; a null loss becomes NaN."""
  points = sorted(
      (
          (r["step"], np.nan if r["loss"] is None else r["loss"])
          for r in records
          if r.get("split", "train") == split and "loss" in r
      ),
      key=lambda point: point[0],
  )
  steps, losses = zip(*points) if points else ((), ())
  return np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)


def _labels(paths: list[pathlib.Path]) -> list[str]:
  """The runs' directory names, or their paths where two runs share a name."""
  names = [path.resolve().name for path in paths]
  return names if len(set(names)) == len(names) else [str(path) for path in paths]


def plot_runs(
    dirs: Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    log_y: bool = False,
    title: str | None = None,
    smoothing: float = 0.0,
    size: tuple[float, float] = (8.0, 5.0),
    dpi: int = 100,
) -> pathlib.Path:
  """Draws the train loss (lines) and val loss (markers) of runs against the step.

  Args:
    dirs: run directories, each with a metrics.jsonl; the legend names them.
    out_path: the image file; its suffix picks the format (.png, .pdf, .svg).
    log_y: a logarithmic loss axis.
    title: the figure's title.
    smoothing: EMA weight of the past for the train loss (see `ema`); above 0 the raw curve
      stays as a faint line under the smoothed one.
    size: the figure's width and height in inches; a PNG is `size * dpi` pixels.
    dpi: pixels per inch.

  Returns:
    `out_path`, as a path.

  Raises:
    FileNotFoundError: a directory has no metrics.jsonl.
    ValueError: no directory, a malformed metrics.jsonl, a run without any loss record, or
      `smoothing` outside [0, 1).
  """
  if not dirs:
    raise ValueError("no run directory to plot")
  paths = [pathlib.Path(d) for d in dirs]
  # Every run is read before anything is drawn, so one bad directory fails the plot at once.
  curves = []
  for path in paths:
    if not (path / metrics.METRICS_FILE).is_file():
      raise FileNotFoundError(f"{path}: no {metrics.METRICS_FILE}, not a run directory")
    records = metrics.read_metrics(path)
    train, val = _loss_curve(records, "train"), _loss_curve(records, "val")
    if not (train[0].size or val[0].size):
      raise ValueError(f"{path}: {metrics.METRICS_FILE} has no loss record")
    curves.append((train, val))

  fig = figure_lib.Figure(figsize=size, dpi=dpi, layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  handles = []
  for i, (label, ((train_steps, train_loss), (val_steps, val_loss))) in enumerate(
      zip(_labels(paths), curves)
  ):
    color = f"C{i % 10}"  # The default colour cycle, one colour per run.
    if smoothing:
      ax.plot(train_steps, train_loss, color=color, linewidth=0.6, alpha=0.3)
      ax.plot(train_steps, ema(train_loss, smoothing), color=color, linewidth=1.0)
    else:
      ax.plot(train_steps, train_loss, color=color, linewidth=1.0)
    ax.plot(
        val_steps,
        val_loss,
        "o",
        color=color,
        markersize=5,
        markeredgecolor="white",
        markeredgewidth=0.5,
        zorder=3,
    )
    handles.append(lines_lib.Line2D([], [], color=color, marker="o", markersize=5, label=label))
  train_key = f"train (EMA {smoothing:g})" if smoothing else "train"
  handles += [
      lines_lib.Line2D([], [], color="grey", linewidth=1.0, label=train_key),
      lines_lib.Line2D(
          [], [], color="grey", marker="o", linestyle="none", markersize=5, label="val"
      ),
  ]
  ax.legend(handles=handles, loc="upper right", fontsize="small")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  if log_y:
    ax.set_yscale("log")
  if title:
    ax.set_title(title)
  ax.grid(True, which="major", alpha=0.3)

  out_path = pathlib.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_path, dpi=dpi)
  return out_path
