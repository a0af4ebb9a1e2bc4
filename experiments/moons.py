"""The three moons of the v1 paper (section 3) and the `three-moons` reproduction.

One context memory layer (`mosaics_jax.model.context_memory`) on the moons' 6 coordinates, trained
with the official scripts' recipe (`ThreeMoons/train_planets-1head.py` and `-3heads.py`, the
defaults of `config.MoonsExperiment`): 1 head of dim 6, or 3 heads of dim 2.

The checks were fixed here before the runs, from the paper's claim and not from our results:

- "each head predicts one moon": with 3 heads, each moon is predicted mainly by a different head
  (the heads' best-explained moons are a permutation: `permutation` is 1) in most seeds (a mean
  over seeds >= 0.6: 2 of the 3 default seeds).
- "3 heads need about one period of the slowest moon, 1 head the joint period": the held-out
  combination is (1, 2, 3), so the slowest moon's period is 133.3 steps and the joint period
  266.7, a ratio of 2. The check asks the number of observed steps after which the error of the
  next 25 generated steps stays below 0.1 to be at least 1.5 times larger with 1 head than with 3
  (1.5 leaves room for "about"). 0.1 is the threshold: a mean absolute error of 0.1 on
  coordinates of amplitude 1 is a sixth of the error of predicting 0 (2 / pi = 0.64), the level
  from which the paper's figure shows the curves fall; it lies above the 0.05 floor that the
  official plotting code's one-step offset adds (docs/reproductions.md).
"""

from __future__ import annotations

from mosaics_jax.config import ContextMemoryConfig, MoonsExperiment
from mosaics_jax.repro.declaration import (
    Check,
    Evaluation,
    PaperNumber,
    Quantity,
    Reproduction,
    Run,
)

_RECIPE = "official recipe: AdamW, lr 1e-2 -> 5e-6 linear over 500 steps, batch 64, block 800"

EXPERIMENTS_MOONS = (
    MoonsExperiment(
        name="moons-1head",
        description=f"context memory, 1 head of dim 6, on the three moons ({_RECIPE})",
        model=ContextMemoryConfig(n_head=1, h_dim=6),
    ),
    MoonsExperiment(
        name="moons-3heads",
        description=f"context memory, 3 heads of dim 2, on the three moons ({_RECIPE})",
        model=ContextMemoryConfig(n_head=3, h_dim=2),
    ),
)

THRESHOLD = 0.1
FACTOR = 1.5
SLOWEST_PERIOD = 133.3  # Steps: the held-out combination's slowest moon (period 3).
JOINT_PERIOD = 266.7  # Steps: its joint period 6.


def _moons(run: str, metric: str, **where) -> Quantity:
  return Quantity(run=run, evaluation="moons", metric=metric, where=tuple(where.items()))


REPRODUCTIONS = (
    Reproduction(
        name="three-moons",
        claim=(
            "predictive disentanglement: with 3 heads each head predicts one moon, and the error"
            " on a held-out combination falls after about one period of the slowest moon, where"
            " 1 head needs the joint period"
        ),
        source="v1 paper, Section 3 (three moons)",
        scale="cpu",
        runs=(
            Run(name="1head", experiment="moons-1head"),
            Run(name="3heads", experiment="moons-3heads"),
        ),
        evaluations=(Evaluation(task="moons", settings=(f"moons.threshold={THRESHOLD}",)),),
        checks=(
            Check(
                description="with 3 heads, the heads predict different moons in most seeds",
                left=_moons("3heads", "permutation"),
                op=">=",
                right=0.6,
            ),
            Check(
                description=(
                    f"1 head needs >= {FACTOR} x the observed steps of 3 heads to bring the"
                    f" held-out error below {THRESHOLD}"
                ),
                left=_moons("1head", "steps_to_threshold"),
                op=">=",
                right=_moons("3heads", "steps_to_threshold"),
                scale=FACTOR,
            ),
        ),
        paper=(
            PaperNumber(
                what="3 heads: error falls after about the slowest moon's period (steps)",
                value=SLOWEST_PERIOD,
                ours=_moons("3heads", "steps_to_threshold"),
            ),
            PaperNumber(
                what="1 head: error falls after about the joint period (steps)",
                value=JOINT_PERIOD,
                ours=_moons("1head", "steps_to_threshold"),
            ),
        ),
        seeds=3,
        notes=(
            "The official recipe and data (`ThreeMoons/`); the error curve is measured on 16"
            " held-out sequences (the paper: 512) every 15 observed steps (the paper: every"
            " step). `steps_to_threshold` is the first observed length on that grid from which the"
            f" error stays below {THRESHOLD}; a run that never gets there reads 767, one past the"
            " grid's last length. The head x moon shares are R^2 of each head's contribution to"
            " the output regressed on each moon's coordinates, over positions 400 to 799 of the"
            " held-out sequences. Generation follows the official `generate`: the predictions"
            " are fed back as queries and keys, the memory's values are the observations' (a"
            " first evaluation that stored the predictions' values too diverged for a 3-head seed"
            " at small n; docs/reproductions.md keeps it)."
        ),
    ),
)
