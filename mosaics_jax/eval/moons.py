"""Evaluates a three-moons run (`mosaics_jax.train.moons`) as the v1 paper's section 3 does.

(a) The prediction error on the held-out combination against the number of observed steps n:
the mean of |generated - truth| over the `generated` steps that the model generates
autoregressively after observing x[:, :n] (`context_memory.rollout`: its predictions are queries
and keys, the memory's values are the observations', as the official `generate`), over
`batch_size` held-out sequences from random start points (the official `plotctx`: 25 steps, 512
sequences, every n). Step j's truth is x[:, n + j]; `plotctx` compares x[:, n + j] with the
prediction of x[:, n + j + 1], one step off, which we do not copy.
`steps_to_threshold` is the first n of the grid from which the error stays below `threshold`
(one past the grid when it never does). The held-out moons' periods and their joint period, in
steps, come with the results (`period_steps`, `joint_period_steps`), for the plot.

(b) Which moon each head predicts: the share of the variance of each head's contribution to the
output (its retrieval through W_z) that each moon's coordinates at the predicted time explain,
by least squares (R^2, with an intercept), over positions `analysis_from` onwards of the
held-out sequences. Each head's moon is the one explaining most of it; `permutation` is 1 when
the heads have as many distinct moons as there are moons and heads.

Axis legend: b = batch, t = time, f = features, h = heads, m = moons, n = generated steps.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from mosaics_jax import checkpoints, config as config_lib, moons
from mosaics_jax.eval import harness as harness_lib, results as results_lib
from mosaics_jax.model import context_memory

NAME = "moons"


@dataclasses.dataclass(frozen=True)
class Settings:
  batch_size: int = 16  # Held-out sequences (the paper: 512).
  stride: int = 15  # Observed lengths 1, 1 + stride, ... (the paper: every length).
  generated: int = 25  # Steps generated after each observed length.
  threshold: float = 0.1  # Of `steps_to_threshold`.
  analysis_from: int = 400  # First position of the head x moon regression.
  # Generation recomputes the sequence up to the next multiple of this many steps, not the block.
  bucket: int = 100
  seed: int = 0  # Of the held-out sequences' start points.


def load(workdir: str | os.PathLike) -> tuple[dict, int]:
  """(parameters, step) of the newest checkpoint of a three-moons run."""
  manager = checkpoints.Checkpoints(
      pathlib.Path(workdir) / checkpoints.CHECKPOINTS_DIR, keep=1, read_only=True
  )
  restored = manager.restore_latest(None)
  manager.close()
  if restored is None:
    raise checkpoints.CheckpointError(f"{workdir} has no checkpoint of a three-moons run")
  return restored[1]["params"], restored[0]


def heldout(
    experiment: config_lib.MoonsExperiment, batch_size: int, seed: int
) -> tuple[moons.Moons, Float[np.ndarray, "b t f"], Float[np.ndarray, "b t f"]]:
  data = moons.Moons(
      block_size=experiment.data.seq_len,
      min_periods_in_block_size=experiment.data.min_periods_in_block_size,
      observer=experiment.data.observer,
      split="heldout",
  )
  x, y = data.batch(np.random.default_rng(seed), batch_size)
  return data, x, y


def error_curve(
    config: config_lib.ContextMemoryConfig,
    params: dict,
    x: Float[np.ndarray, "b t f"],
    y: Float[np.ndarray, "b t f"],
    observed: list[int],
    generated: int,
    bucket: int,
) -> list[float]:
  """For each n of `observed`: mean |generated - truth| over the `generated` steps after x[:, :n]
  (the truth of step j is y[:, n - 1 + j] = x[:, n + j])."""
  t = x.shape[1]
  out = []
  for n in observed:
    if not 1 <= n <= t - generated + 1:
      raise ValueError(f"observed length {n} leaves no {generated} steps in a block of {t}")
    length = min(t, -(-(n + generated - 1) // bucket) * bucket)
    predictions = context_memory.rollout(config, params, jnp.asarray(x[:, :length]), n, generated)
    out.append(float(np.abs(np.asarray(predictions) - y[:, n - 1 : n - 1 + generated]).mean()))
  return out


def steps_to_threshold(observed: list[int], errors: list[float], threshold: float) -> int:
  """The first n of `observed` from which every error is below `threshold`; one past the grid's
  last n when the last error is not."""
  first = observed[-1] + 1
  for n, error in reversed(list(zip(observed, errors))):
    if error >= threshold:
      break
    first = n
  return first


def head_moon_shares(
    heads: Float[np.ndarray, "b t h f"], target: Float[np.ndarray, "b t f"]
) -> Float[np.ndarray, "h m"]:
  """R^2 of each head's contribution regressed on each moon's (sin, cos) in `target`."""
  b, t, h, f = heads.shape
  out = np.zeros((h, moons.MOONS))
  for m in range(moons.MOONS):
    design = target[..., 2 * m : 2 * m + 2].reshape(b * t, 2)
    design = np.concatenate([design, np.ones((b * t, 1))], axis=1)
    for head in range(h):
      z = heads[:, :, head].reshape(b * t, f).astype(np.float64)
      coef, *_ = np.linalg.lstsq(design, z, rcond=None)
      residual = ((z - design @ coef) ** 2).sum()
      total = ((z - z.mean(0)) ** 2).sum()
      out[head, m] = 1.0 - residual / total if total > 0 else 0.0
  return out


def run(
    experiment: config_lib.MoonsExperiment, workdir: str | os.PathLike, settings: Settings
) -> tuple[list[results_lib.Result], results_lib.Model]:
  """The results of (a) and (b) (module docstring) of the run of `experiment` in `workdir`."""
  params, step = load(workdir)
  config = experiment.model
  data, x, y = heldout(experiment, settings.batch_size, settings.seed)
  observed = list(range(1, experiment.data.seq_len - settings.generated + 2, settings.stride))
  errors = error_curve(config, params, x, y, observed, settings.generated, settings.bucket)
  plain = dataclasses.asdict(settings)
  count = settings.batch_size

  def result(metric: str, value: float, **row) -> results_lib.Result:
    return results_lib.Result(NAME, metric, float(value), count, row, plain)

  periods, joint = data.periods_in_steps(data.periods[0])
  out = [result("period_steps", p, variant=f"moon{m}") for m, p in enumerate(periods)]
  out.append(result("joint_period_steps", joint))
  out += [result("error", e, length=n) for n, e in zip(observed, errors)]
  out.append(result("steps_to_threshold", steps_to_threshold(observed, errors, settings.threshold)))
  heads = np.asarray(
      context_memory.ContextMemory(config).apply({"params": params}, jnp.asarray(x))[1]
  )
  shares = head_moon_shares(heads[:, settings.analysis_from :], y[:, settings.analysis_from :])
  for h in range(config.n_head):
    for m in range(moons.MOONS):
      out.append(result("head_moon_share", shares[h, m], variant=f"head{h}-moon{m}"))
  best = shares.argmax(1)
  distinct = len(set(best.tolist()))
  out.append(result("permutation", distinct == config.n_head == moons.MOONS))
  out.append(result("best_moon_share", shares.max(1).mean()))
  model = results_lib.Model(path=str(pathlib.Path(workdir).absolute()), step=step, overrides=())
  return out, model


def run_harness(harness: harness_lib.Harness, settings: Settings) -> list[results_lib.Result]:
  """The task on a language model: an error, as it evaluates three-moons runs only."""
  del settings
  raise harness_lib.EvalError(
      f"the {NAME} task evaluates a three-moons run (`mosaics-repro three-moons`), not the"
      f" language model {harness.info.path}"
  )


def plot(records: list[dict[str, Any]], path: str | os.PathLike) -> pathlib.Path:
  """The paper's figure of a three-moons reproduction's records (`repro.report.gather`): the
  held-out error against the observed steps per run (mean over seeds, their range shaded), with
  the moons' periods (grey), the joint period (red) and the threshold (dashed); and per seed, the
  head x moon shares of every run with several heads (head labels differ between seeds, so they
  are not averaged). Needs matplotlib (the `plots` extra)."""
  from matplotlib import figure as figure_lib  # matplotlib is the optional `plots` extra.
  from matplotlib.backends import backend_agg

  mine = [r for r in records if r["task"] == NAME]
  curves: dict[str, dict[int, list[float]]] = {}
  shares: dict[tuple[str, int], dict[str, float]] = {}
  for r in mine:
    if r["metric"] == "error":
      curves.setdefault(r["run"], {}).setdefault(r["settings"]["length"], []).append(r["value"])
    elif r["metric"] == "head_moon_share":
      shares.setdefault((r["run"], r["train_seed"]), {})[r["settings"]["variant"]] = r["value"]
  periods = sorted({r["value"] for r in mine if r["metric"] == "period_steps"})
  joints = sorted({r["value"] for r in mine if r["metric"] == "joint_period_steps"})
  matrices = {key: _matrix(found) for key, found in sorted(shares.items())}
  matrices = {key: m for key, m in matrices.items() if m.shape[0] > 1}
  fig = figure_lib.Figure(figsize=(6 + 2.6 * len(matrices), 4), dpi=100, layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  grid = fig.add_gridspec(1, 1 + len(matrices), width_ratios=[2.3] + [1] * len(matrices))
  ax = fig.add_subplot(grid[0, 0])
  for i, (run, points) in enumerate(sorted(curves.items())):
    xs = sorted(points)
    values = [points[x] for x in xs]
    ax.plot(xs, [np.mean(v) for v in values], "-", color=f"C{i}", label=f"{run} (mean)")
    ax.fill_between(
        xs, [min(v) for v in values], [max(v) for v in values], color=f"C{i}", alpha=0.2
    )
  for p in periods:
    ax.axvline(p, color="grey", linewidth=1)
  for j in joints:
    ax.axvline(j, color="red", linewidth=1, label="joint period")
  for threshold in sorted({r["settings"]["threshold"] for r in mine if r["metric"] == "error"}):
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
  ax.set_xlabel("observed steps")
  ax.set_ylabel("mean |generated - truth| over the next 25 steps")
  ax.set_title("held-out combination (grey: moons' periods)")
  ax.set_ylim(-0.02, 1)
  ax.legend(fontsize="small")
  for k, ((run, seed), matrix) in enumerate(matrices.items()):
    ax = fig.add_subplot(grid[0, 1 + k])
    ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for (h, m), value in np.ndenumerate(matrix):
      ax.text(m, h, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.5 else "k")
    ax.set_xticks(range(matrix.shape[1]), [f"moon {m}" for m in range(matrix.shape[1])])
    ax.set_yticks(range(matrix.shape[0]), [f"head {h}" for h in range(matrix.shape[0])])
    ax.set_title(f"{run} seed {seed}: R^2")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  return path


def _matrix(found: dict[str, float]) -> np.ndarray:
  """The head x moon matrix of `head_moon_share` values keyed "head{h}-moon{m}"."""
  keys = [tuple(int(part[4:]) for part in key.split("-")) for key in found]
  out = np.zeros((max(h for h, _ in keys) + 1, max(m for _, m in keys) + 1))
  for (h, m), value in zip(keys, found.values()):
    out[h, m] = value
  return out
