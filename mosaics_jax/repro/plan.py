"""A reproduction's plan: its runs as experiments (checked), their sizes, tokens and FLOPs, and an
estimate of their cost here and on the declared accelerator.

FLOPs follow `mosaics-info` (`analysis.flops.count`, the paper's convention) at the run's training
context; training FLOPs are 3x the forward ones (the backward costs twice the forward). Costs are
estimates: the FLOPs over this machine's measured matmul rate (or the accelerator's peak) times an
assumed utilisation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mosaics_jax import config as config_lib, overrides, registry
from mosaics_jax.analysis import flops
from mosaics_jax.eval import tasks as tasks_lib
from mosaics_jax.repro import declaration as decl

# ASSUMED model-FLOPs utilisations of the cost estimates: the small models of the CPU
# reproductions reach about 15% of the matmul rate on a 2-core CPU (mm2-char-small trains in 287 s);
# 40% is what large runs reach on TPU pods and GPU clusters.
HOST_UTILISATION = 0.15
ACCELERATOR_UTILISATION = 0.4
# Parameter counts of an `equal_params` group agree within this fraction of the largest.
EQUAL_PARAMS_TOLERANCE = 0.1
# Settings a quantity may select besides a task's own: the rows' (training step, length, ...).
# The task that evaluates three-moons runs (`mosaics_jax.eval.moons`), and no other run.
MOONS_TASK = "moons"
ROW_KEYS = ("step", "last", "length", "position_start", "position_end", "shots", "variant")


class ReproError(ValueError):
  """A reproduction that cannot be planned, run or reported; the message says why."""


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """A run of the plan: its experiment (declared overrides and the command's applied) and cost."""

  run: decl.Run
  experiment: config_lib.Experiment | config_lib.MoonsExperiment
  params: int
  flops_per_token: float  # Forward, at the training context (mosaics-info's convention).
  tokens: int  # steps x batch x context.
  swept: float | None = None  # The sweep's value this training tries (`sweep_plan`).

  @property
  def train_flops(self) -> float:
    return 3.0 * self.flops_per_token * self.tokens

  def host_hours(self, matmul_flops_per_second: float) -> float:
    return self.train_flops / (matmul_flops_per_second * HOST_UTILISATION) / 3600

  def chip_hours(self, accelerator: str) -> float:
    return self.train_flops / (decl.ACCELERATORS[accelerator] * ACCELERATOR_UTILISATION) / 3600


def split_assignments(
    repro: decl.Reproduction, assignments: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The command's --set assignments as (those of every run's experiment, those of the
  evaluations' tasks: TASK.KEY=VALUE for a task the reproduction evaluates)."""
  tasks = {e.task for e in repro.evaluations}
  of_tasks = tuple(a for a in assignments if a.partition(".")[0] in tasks)
  return tuple(a for a in assignments if a not in of_tasks), of_tasks


def task_settings(evaluation: decl.Evaluation, task_assignments: tuple[str, ...] = ()) -> Any:
  """The settings of an evaluation's task: its own, then the command's for that task."""
  mine = [a for a in task_assignments if a.partition(".")[0] == evaluation.task]
  return tasks_lib.settings([evaluation.task], (*evaluation.settings, *mine))[evaluation.task]


def experiment(
    name: str, assignments: tuple[str, ...]
) -> config_lib.Experiment | config_lib.MoonsExperiment:
  """The experiment called `name` (a language model's, or a three-moons one's) with the KEY=VALUE
  `assignments` applied (`overrides.apply`)."""
  moons = registry.all_moons_experiments()
  if name not in moons:
    return overrides.apply(registry.get(name), assignments)
  return overrides.assign(moons[name], assignments)


def _moons_flops(e: config_lib.MoonsExperiment) -> float:
  """Forward FLOPs per step of a context memory: its matrices, then scores and weighted sums
  over half the block on average."""
  width = e.model.n_head * e.model.h_dim
  return 2.0 * e.model.params + 2.0 * 2 * width * e.data.seq_len / 2


def plan(repro: decl.Reproduction, assignments: tuple[str, ...] = ()) -> list[PlannedRun]:
  """Every run of `repro` with `assignments` (the command's --set) applied after its own
  overrides, validated (`validate`); assignments to an evaluated task's settings are checked."""
  validate(repro)
  if any(a.partition("=")[0] == "train.seed" for a in assignments):
    raise ReproError(
        "--set train.seed: a reproduction sets each run's seed itself (0 to --seeds - 1)"
    )
  if repro.sweep is not None and any(a.partition("=")[0] == repro.sweep.key for a in assignments):
    raise ReproError(f"--set {repro.sweep.key}: the reproduction's sweep chooses it")
  assignments, task_assignments = split_assignments(repro, assignments)
  for evaluation in repro.evaluations:
    if evaluation.task != decl.TRAINING:
      try:
        task_settings(evaluation, task_assignments)
      except config_lib.ConfigError as e:
        raise ReproError(f"{repro.name}: evaluation {evaluation.name}: {e}") from None
  out = []
  for run in repro.runs:
    try:
      found = experiment(run.experiment, (*run.overrides, *assignments))
    except config_lib.ConfigError as e:
      raise ReproError(f"{repro.name}: run {run.name}: {e}") from None
    out.append(_planned(run, found))
  _check_equal_params(repro, {p.run.name: p.params for p in out})
  models = {p.run.name: p.experiment.model for p in out}
  for p in out:
    if p.run.init_from is not None:
      differing = config_lib.fine_tune_mismatch(models[p.run.init_from], p.experiment.model)
      if differing:
        raise ReproError(
            f"{repro.name}: run {p.run.name} fine-tunes {p.run.init_from}, another model: "
            + ", ".join(differing)
        )
  return out


def _planned(
    run: decl.Run,
    found: config_lib.Experiment | config_lib.MoonsExperiment,
    swept: float | None = None,
) -> PlannedRun:
  tokens = found.train.steps * found.train.batch_size * found.data.seq_len
  if isinstance(found, config_lib.MoonsExperiment):
    return PlannedRun(run, found, found.model.params, _moons_flops(found), tokens, swept)
  report = flops.count(found.model, found.data.seq_len)
  return PlannedRun(run, found, report.params, report.flops_per_token, tokens, swept)


def sweep_plan(repro: decl.Reproduction, planned: list[PlannedRun]) -> list[PlannedRun]:
  """The sweep's trainings (`decl.Sweep`): each swept run of `planned` at each value, at the
  sweep's seed and with its overrides; none without a sweep."""
  sweep = repro.sweep
  if sweep is None:
    return []
  out = []
  for p in planned:
    if p.run.name in sweep.runs:
      base = overrides.override(p.experiment, "train.seed", sweep.seed)
      base = overrides.apply(base, sweep.overrides)
      for value in sweep.values:
        out.append(_planned(p.run, overrides.override(base, sweep.key, value), value))
  return out


def validate(repro: decl.Reproduction) -> None:
  """ReproError naming the first problem: an unknown experiment, override, task, setting or
  accelerator, a quantity of nothing evaluated, a run fine-tuned from a later one."""
  where = f"reproduction {repro.name}"
  if repro.first_seed < 0:
    raise ReproError(f"{where}: first_seed must be >= 0, got {repro.first_seed}")
  if repro.seeds < 1:
    raise ReproError(f"{where}: seeds must be >= 1, got {repro.seeds}")
  if repro.accelerator not in decl.ACCELERATORS:
    raise ReproError(
        f"{where}: unknown accelerator {repro.accelerator!r}; known: {sorted(decl.ACCELERATORS)}"
    )
  names = [run.name for run in repro.runs]
  if len(set(names)) != len(names) or not names:
    raise ReproError(f"{where}: runs need distinct names, got {names}")
  for i, run in enumerate(repro.runs):
    try:
      found = experiment(run.experiment, run.overrides)
    except config_lib.ConfigError as e:
      raise ReproError(f"{where}: run {run.name}: {e}") from None
    init_from = getattr(found, "init_from", None)  # A moons experiment fine-tunes nothing.
    if init_from is not None and run.init_from is None:
      raise ReproError(
          f"{where}: run {run.name}: {run.experiment} fine-tunes {init_from}; declare"
          " the run it starts from with init_from"
      )
    if run.init_from is not None and run.init_from not in names[:i]:
      raise ReproError(
          f"{where}: run {run.name} fine-tunes from {run.init_from!r}, which is not an earlier run"
      )
  evaluations: dict[str, decl.Evaluation] = {}
  for evaluation in repro.evaluations:
    if evaluation.name in evaluations:
      raise ReproError(f"{where}: two evaluations are called {evaluation.name!r}; set a label")
    evaluations[evaluation.name] = evaluation
    unknown = sorted(set(evaluation.runs) - set(names))
    if unknown:
      raise ReproError(f"{where}: evaluation {evaluation.name} names unknown runs {unknown}")
    if evaluation.task != decl.TRAINING:
      try:
        task_settings(evaluation)
      except config_lib.ConfigError as e:
        raise ReproError(f"{where}: evaluation {evaluation.name}: {e}") from None
    for run in repro.runs:
      if run.name in (evaluation.runs or names):
        found = experiment(run.experiment, ())
        moons = isinstance(found, config_lib.MoonsExperiment)
        if moons != (evaluation.task == MOONS_TASK) and evaluation.task != decl.TRAINING:
          raise ReproError(
              f"{where}: evaluation {evaluation.name} ({evaluation.task}) of run {run.name}: the"
              f" {MOONS_TASK} task evaluates three-moons runs, and they no other task"
          )
        if not moons:
          _check_model_overrides(where, evaluation, found.model)
  if repro.checks and all(c.precondition for c in repro.checks):
    raise ReproError(f"{where}: every check is a precondition; the claim needs one of its own")
  if repro.sweep is not None:
    _check_sweep(where, repro, names)
  quantities = [c.left for c in repro.checks]
  quantities += [c.right for c in repro.checks if isinstance(c.right, decl.Quantity)]
  quantities += [p.ours for p in repro.paper if p.ours is not None]
  for quantity in quantities:
    _check_quantity(where, quantity, names, evaluations)


def _check_sweep(where: str, repro: decl.Reproduction, names: list[str]) -> None:
  sweep = repro.sweep
  unknown = sorted(set(sweep.runs) - set(names))
  if unknown or not sweep.runs:
    raise ReproError(f"{where}: the sweep names unknown runs {unknown or 'none'}")
  if len(set(sweep.values)) != len(sweep.values) or len(sweep.values) < 2:
    raise ReproError(f"{where}: the sweep needs 2 or more distinct values, got {sweep.values}")
  if sweep.seed in repro.train_seeds(repro.seeds):
    raise ReproError(
        f"{where}: the sweep's seed {sweep.seed} is one of the report's seeds"
        f" {list(repro.train_seeds(repro.seeds))}; the chosen value would be tested on its own"
        " training"
    )
  if any(a.partition("=")[0] in ("train.seed", sweep.key) for a in sweep.overrides):
    raise ReproError(f"{where}: the sweep's overrides set train.seed or {sweep.key}, its own")
  for run in repro.runs:
    if run.name not in sweep.runs:
      continue
    found = experiment(run.experiment, run.overrides)
    if isinstance(found, config_lib.MoonsExperiment) or run.init_from is not None:
      raise ReproError(
          f"{where}: the sweep's run {run.name} is a three-moons run or a fine-tune; it sweeps"
          " language models trained from scratch"
      )
    try:
      overrides.apply(found, (*sweep.overrides, f"{sweep.key}={sweep.values[0]}"))
    except config_lib.ConfigError as e:
      raise ReproError(f"{where}: the sweep: {e}") from None


def _check_model_overrides(where: str, evaluation: decl.Evaluation, model: Any) -> None:
  for assignment in evaluation.model:
    key = assignment.partition("=")[0]
    if key not in model.runtime_fields:
      raise ReproError(
          f"{where}: evaluation {evaluation.name} sets model.{key}, which is not a field that"
          f" changes evaluation only ({', '.join(model.runtime_fields)})"
      )
    try:
      overrides.apply(
          config_lib.Experiment(name="", description="", model=model), ["model." + assignment]
      )
    except config_lib.ConfigError as e:
      raise ReproError(f"{where}: evaluation {evaluation.name}: {e}") from None


def _check_quantity(
    where: str, quantity: decl.Quantity, runs: list[str], evaluations: dict[str, decl.Evaluation]
) -> None:
  if quantity.run not in runs:
    raise ReproError(f"{where}: quantity {quantity} names unknown run {quantity.run!r}")
  evaluation = evaluations.get(quantity.evaluation)
  if evaluation is None:
    raise ReproError(
        f"{where}: quantity {quantity} names unknown evaluation {quantity.evaluation!r};"
        f" known: {sorted(evaluations)}"
    )
  if evaluation.runs and quantity.run not in evaluation.runs:
    raise ReproError(f"{where}: quantity {quantity}: {evaluation.name} does not evaluate it")
  known = set(ROW_KEYS)
  if evaluation.task != decl.TRAINING:
    known |= {f.name for f in dataclasses.fields(tasks_lib.get(evaluation.task).settings_class)}
  unknown = sorted({key for key, _ in quantity.where} - known)
  if unknown:
    raise ReproError(f"{where}: quantity {quantity} selects unknown settings {unknown}")


def _check_equal_params(repro: decl.Reproduction, params: dict[str, int]) -> None:
  for group in repro.equal_params:
    missing = sorted(set(group) - set(params))
    if missing:
      raise ReproError(f"reproduction {repro.name}: equal_params names unknown runs {missing}")
    sizes = {name: params[name] for name in group}
    if max(sizes.values()) - min(sizes.values()) > EQUAL_PARAMS_TOLERANCE * max(sizes.values()):
      raise ReproError(
          f"reproduction {repro.name}: runs {list(group)} should have equal parameter counts"
          f" (within {EQUAL_PARAMS_TOLERANCE:.0%}), got {sizes}"
      )


def format_plan(
    repro: decl.Reproduction,
    planned: list[PlannedRun],
    seeds: int,
    matmul_flops_per_second: float,
) -> str:
  """The markdown table of `mosaics-repro --dry-run`."""
  chip = repro.accelerator
  lines = [
      f"# {repro.name} ({repro.scale} scale): {repro.claim}",
      f"source: {repro.source}; {seeds} seed(s) per run",
      "",
      f"| run | experiment | overrides | params | context | steps | tokens | FLOPs/token | train"
      f" FLOPs | hours here | {chip} chip-hours |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  swept = sweep_plan(repro, planned)
  for p in [*planned, *swept]:
    name = p.run.name if p.swept is None else f"{p.run.name} (sweep {repro.sweep.key}={p.swept})"
    lines.append(
        f"| {name} | {p.run.experiment} | {' '.join(p.run.overrides) or '-'} |"
        f" {p.params:,} | {p.experiment.data.seq_len} | {p.experiment.train.steps} |"
        f" {p.tokens:.3g} | {p.flops_per_token:.4g} | {p.train_flops:.3g} |"
        f" {p.host_hours(matmul_flops_per_second):.3g} | {p.chip_hours(chip):.3g} |"
    )
  # The report's seeds train every run; the sweep trains each of its rows once.
  counted = [*(p for p in planned for _ in range(seeds)), *swept]
  flops_total = sum(p.train_flops for p in counted)
  host = sum(p.host_hours(matmul_flops_per_second) for p in counted)
  chips = sum(p.chip_hours(chip) for p in counted)
  sweep = f" and the sweep's {len(swept)} training(s)" if swept else ""
  lines += [
      "",
      f"total over {seeds} seed(s){sweep}: {flops_total:.3g} training FLOPs; about {host:.3g}"
      f" hours on this machine (its matmul rate {matmul_flops_per_second / 1e9:.1f} GFLOP/s at"
      f" {HOST_UTILISATION:.0%} utilisation), {chips:.3g} {chip} chip-hours (peak"
      f" {decl.ACCELERATORS[chip] / 1e12:.0f} TFLOP/s at {ACCELERATOR_UTILISATION:.0%});"
      " evaluations not included.",
  ]
  return "\n".join(lines)
