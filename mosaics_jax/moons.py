"""The three moons of the v1 paper (section 3): positions of three moons on circular orbits.

Each sequence follows three moons whose periods are a combination of three of {0.5, 1, ..., 3.5}
(`PERIOD_CHOICES`). As the official code (`ThreeMoons/planets.py`, `PlanetsDataset`) does, the
combinations are ranked by their joint period, the least common multiple of the three at a
precision of one decimal (`joint_period`), and the quarter (plus one) with the smallest joint
period is kept (`combinations`); the last of these is held out for evaluation, the others train.
Ties of the joint period at the cut are broken by numpy's default `argsort`, as the official code
does: that picks the held-out combination (1, 2, 3).

Time is a grid of `TOTAL_STEPS` points spaced so that a block of `block_size` steps holds
`min_periods_in_block_size` periods of the longest joint period kept (`Moons.spacing`). A sequence
starts at a random grid point; moon i at time u is at angle 2 pi u / p_i + OFFSET, seen from the
sun (its own sin and cos) or, with `observer="planet"`, from the third moon (the first two moons'
coordinates minus the third's; the third's unchanged), as the official code's "planet" observer.

A sequence's inputs are x = positions[:T] and its targets y = positions[1:T + 1] (the next
position), with 6 features: sin and cos of moon 0, of moon 1, of moon 2.

Axis legend: b = batch (sequences), t = time (steps), f = features (6: sin, cos per moon),
m = moons (3).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Literal

import numpy as np
from jaxtyping import Float

PERIOD_CHOICES = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5)
MOONS = 3
FEATURES = 2 * MOONS
OFFSET = 0.3  # Phase of every moon at time 0.
TOTAL_STEPS = 10_000  # The official `approx_total_tokens`: the grid the sequences start on.
# The official code asserts that the spacing leaves at least this many grid points per unit.
MIN_POINTS_PER_UNIT = 4


def joint_period(periods: tuple[float, ...], precision: int = 1) -> float:
  """The least common multiple of `periods` rounded to `precision` decimals (planets.py's
  `lcm_reduce`): the time after which every moon is back where it started."""
  scale = 10**precision
  ints = [int(round(p, precision) * scale) for p in periods]
  return functools.reduce(math.lcm, ints) / scale


def combinations() -> tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]:
  """(training combinations, held-out combination) of periods, as planets.py selects them."""
  every = list(itertools.combinations(PERIOD_CHOICES, MOONS))
  joint = np.array([joint_period(p) for p in every])
  kept = [every[i] for i in np.argsort(joint)[: len(every) // 4 + 1]]
  return tuple(kept[:-1]), kept[-1]


@dataclasses.dataclass(frozen=True)
class Moons:
  """Sequences of one split of the three moons (module docstring)."""

  block_size: int = 800
  min_periods_in_block_size: int = 3
  observer: Literal["sun", "planet"] = "sun"
  split: Literal["train", "heldout"] = "train"

  def __post_init__(self):
    if self.observer not in ("sun", "planet"):
      raise ValueError(f"observer must be 'sun' or 'planet', got {self.observer!r}")
    if self.split not in ("train", "heldout"):
      raise ValueError(f"split must be 'train' or 'heldout', got {self.split!r}")
    points = self.block_size / self.max_period / self.min_periods_in_block_size
    if points < MIN_POINTS_PER_UNIT:
      raise ValueError(
          f"block_size {self.block_size} holds {self.min_periods_in_block_size} joint periods of"
          f" {self.max_period} at {points:.3g} points per unit, fewer than {MIN_POINTS_PER_UNIT}:"
          " raise block_size or lower min_periods_in_block_size"
      )
    if self.starts < 1:
      raise ValueError(f"block_size {self.block_size} leaves no start point in {TOTAL_STEPS}")

  @property
  def max_period(self) -> float:
    train, held_out = combinations()
    return max(joint_period(p) for p in (*train, held_out))

  @property
  def spacing(self) -> float:
    """Time between two steps."""
    return self.max_period * self.min_periods_in_block_size / self.block_size

  @property
  def starts(self) -> int:
    """Start points drawn from (planets.py's bound)."""
    return TOTAL_STEPS - 2 * self.block_size - 1

  @property
  def periods(self) -> tuple[tuple[float, ...], ...]:
    """The combinations of the split."""
    train, held_out = combinations()
    return train if self.split == "train" else (held_out,)

  def periods_in_steps(self, periods: tuple[float, ...]) -> tuple[tuple[float, ...], float]:
    """(each moon's period, the joint period), in steps."""
    return tuple(p / self.spacing for p in periods), joint_period(periods) / self.spacing

  def positions(
      self, periods: tuple[float, ...], start: int, length: int
  ) -> Float[np.ndarray, "t f"]:
    """The moons' coordinates at grid points start .. start + length - 1."""
    u = np.arange(start, start + length) * self.spacing
    angles = 2 * np.pi * u[None, :] / np.asarray(periods)[:, None] + OFFSET  # [m, t]
    sines, cosines = np.sin(angles), np.cos(angles)
    if self.observer == "planet":
      sines[:-1] -= sines[-1]
      cosines[:-1] -= cosines[-1]
    return np.stack((sines, cosines), axis=1).reshape(FEATURES, length).T

  def batch(
      self, rng: np.random.Generator, batch_size: int, combination: int | None = None
  ) -> tuple[Float[np.ndarray, "b t f"], Float[np.ndarray, "b t f"]]:
    """(x, y) float32 of `batch_size` sequences from random start points; each of a random
    combination of the split, or of `combination` (its index in `periods`)."""
    x = np.empty((batch_size, self.block_size, FEATURES), np.float32)
    y = np.empty_like(x)
    for b in range(batch_size):
      c = rng.integers(len(self.periods)) if combination is None else combination
      data = self.positions(self.periods[c], int(rng.integers(self.starts)), self.block_size + 1)
      x[b], y[b] = data[:-1], data[1:]
    return x, y
