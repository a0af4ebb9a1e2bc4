"""A reproduction as data: a paper's claim, the runs and evaluations that test it at some scale, the
paper's numbers, and the checks that decide "reproduced".

Experiment modules declare them in `REPRODUCTIONS` (`mosaics_jax.registry.all_reproductions`).
Nothing here runs anything, so experiment files stay declare-only:

    Reproduction(
        name="induction",
        claim="one Memory Mosaics layer learns an induction head, a one-layer Transformer does not",
        source="v1 paper, Section 3",
        runs=(Run(name="mm1", experiment="quickstart"), Run(name="llama", ...)),
        evaluations=(Evaluation(task="training"),),
        checks=(Check(left=Quantity(run="mm1", evaluation="training", metric="val_accuracy",
                                    where=(("last", True),)), op=">=", right=0.9),),
    )
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

# The pseudo-task of a run's own validation record (metrics.jsonl): `val_<name>` for every metric
# of every evaluation during training, at settings {"step": s, "last": whether the final one}.
TRAINING = "training"

# Named accelerators of the dry-run's cost: peak dense bf16 FLOP/s per chip (vendors' figures).
ACCELERATORS = {
    "tpu-v4": 275e12,
    "tpu-v5e": 197e12,
    "tpu-v5p": 459e12,
    "tpu-v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
  """A training run: an experiment with overrides, trained once per seed (train.seed 0, 1, ...)."""

  name: str  # Unique in the reproduction; the workdir is DIR/runs/<name>-seed<k>.
  experiment: str
  overrides: tuple[str, ...] = ()  # KEY=VALUE, as `mosaics-train --set`.
  # Another run of the reproduction whose parameters (of the same seed) this one fine-tunes.
  init_from: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Evaluation:
  """A `mosaics-eval` task (or TRAINING) on some runs, with settings and evaluation-only model
  fields."""

  task: str
  label: str = ""  # Names the evaluation in quantities and tables; default: the task's name.
  settings: tuple[str, ...] = ()  # TASK.KEY=VALUE, as `mosaics-eval --set`.
  model: tuple[str, ...] = ()  # KEY=VALUE of fields that do not shape the parameters.
  runs: tuple[str, ...] = ()  # Default: every run.
  batch_size: int = 8

  @property
  def name(self) -> str:
    return self.label or self.task


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quantity:
  """A number of the results: a metric of one evaluation of one run, at the settings `where`,
  averaged over the seeds."""

  run: str
  evaluation: str  # An Evaluation's name.
  metric: str
  where: tuple[tuple[str, Any], ...] = ()  # (setting, value) pairs the record must have.

  def __str__(self) -> str:
    at = ", ".join(f"{k}={v}" for k, v in self.where)
    return f"{self.run} {self.evaluation} {self.metric}" + (f" ({at})" if at else "")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Check:
  """Holds when `left op scale * right + offset` (right a Quantity or a number).

  A precondition says that the experiment can answer the claim (a baseline learnt the task, a
  task is off its ceiling): when one fails, the verdict is "inconclusive", not "not reproduced".
  """

  description: str
  left: Quantity
  op: Literal[">=", "<="]
  right: Quantity | float
  scale: float = 1.0
  offset: float = 0.0
  precondition: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sweep:
  """A hyperparameter chosen per run before its seeds train: each run of `runs` trains once at
  each of `values` (seed `seed`, with `overrides` after the run's own), and its seeds then train at
  the value of the lowest final validation loss on the training distribution (`val_loss` of
  metrics.jsonl), never on an evaluation of the claim."""

  runs: tuple[str, ...]
  values: tuple[float, ...]
  key: str = "train.learning_rate"
  seed: int = 1000  # Apart from the report's seeds 0 to N - 1.
  overrides: tuple[str, ...] = ()  # KEY=VALUE of the sweep's trainings only (e.g. fewer steps).


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaperNumber:
  """A number of the paper and the quantity of ours that stands beside it."""

  what: str  # E.g. "Memory Mosaics v2 small, 32k, Table 12".
  value: float
  ours: Quantity | None = None  # None at a scale where nothing of ours compares.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reproduction:
  """A claim of a paper, re-run: see the module docstring."""

  name: str
  claim: str
  source: str  # Paper, table or figure.
  scale: Literal["cpu", "paper"]
  runs: tuple[Run, ...]
  evaluations: tuple[Evaluation, ...]
  checks: tuple[Check, ...] = ()
  sweep: Sweep | None = None
  paper: tuple[PaperNumber, ...] = ()
  seeds: int = 2  # Seeds of every run for the report.
  # The first train.seed: a redesigned reproduction trains fresh seeds (first_seed, first_seed +
  # 1, ...), not those its predecessor's results were seen on.
  first_seed: int = 0
  # Groups of runs compared at equal size: their parameter counts agree within 10%.
  equal_params: tuple[tuple[str, ...], ...] = ()
  # How the scale differs from the paper's, and how the hyperparameters were chosen.
  notes: str = ""
  accelerator: str = "tpu-v5p"  # The dry-run's chip-hours are of this chip.

  def train_seeds(self, count: int) -> range:
    """The train.seed of each of `count` seeds."""
    return range(self.first_seed, self.first_seed + count)
