"""Runs a reproduction: trains every run of every seed that is not done, evaluates what is not
evaluated, and writes the report.

    DIR/reproduction.json                    what the directory reproduces (name, --set)
    DIR/runs/<run>-seed<k>/                  a training workdir (mosaics_jax.load reads it)
    DIR/runs/<run>-seed<k>/repro/<name>/<eval>.jsonl  its results of one evaluation
    DIR/runs/<run>-seed<k>/repro/timing.json  wall seconds of its training and evaluations
    DIR/sweep/<run>-<value>/                 a training of the sweep (`decl.Sweep`), first
    DIR/sweep.json                           the sweep's final validation losses and choices
    DIR/results.jsonl, DIR/report.md, DIR/plots.png   (`report`)

Every step is resumable: a run resumes from its newest checkpoint (`train.loop`), a finished run
is not touched again, and an evaluation's file is written whole (renamed into place) once it
completes, so the same command after an interruption goes on where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

from mosaics_jax import checkpoints, config as config_lib, overrides
from mosaics_jax.eval import (
    harness as harness_lib,
    moons as eval_moons,
    results as results_lib,
    tasks as tasks_lib,
)
from mosaics_jax.port import pretrained
from mosaics_jax.repro import declaration as decl, plan as plan_lib
from mosaics_jax.train import loop, metrics, moons as train_moons, preemption as preemption_lib

MANIFEST = "reproduction.json"
RESULTS_DIR = "repro"
TIMING = "timing.json"
SWEEP = "sweep.json"
DIVERGED = (
    "diverged.json"  # In a sweep training's RESULTS_DIR: why it stopped (loop.DivergedError).
)


def run_dir(root: pathlib.Path, run: str, seed: int) -> pathlib.Path:
  return root / "runs" / f"{run}-seed{seed}"


def results_path(
    root: pathlib.Path, repro: decl.Reproduction, run: str, seed: int, evaluation: str
) -> pathlib.Path:
  """Where a run's results of one evaluation of `repro` are: apart from other reproductions', so
  that a run linked into several directories keeps each one's evaluations."""
  return run_dir(root, run, seed) / RESULTS_DIR / repro.name / f"{evaluation}.jsonl"


def sweep_dir(root: pathlib.Path, run: str, value: float) -> pathlib.Path:
  return root / "sweep" / f"{run}-{value!r}"


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where a reproduction stands after `run`."""

  trained: int  # Runs trained (or resumed) by this call.
  evaluated: int  # Evaluations run by this call.
  stopped_by: preemption_lib.Preemption | None  # A signal stopped training (checkpointed).
  stopped_run: pathlib.Path | None = None


def run(
    repro: decl.Reproduction,
    root: str | os.PathLike,
    *,
    seeds: int,
    assignments: tuple[str, ...] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Progress:
  """Trains and evaluates what `root` lacks of `repro` over `seeds` seeds (module docstring)."""
  root = pathlib.Path(root).absolute()
  planned = plan_lib.plan(repro, assignments)
  _check_manifest(root, repro, assignments)
  for seed in repro.train_seeds(
      seeds
  ):  # A damaged timing file is named before any work, not after it.
    for p in planned:
      timing(run_dir(root, p.run.name, seed))
  trained = evaluated = 0
  chosen: dict[str, float] = {}
  if repro.sweep is not None:
    if repro.sweep.seed in repro.train_seeds(seeds):
      raise plan_lib.ReproError(
          f"--seeds {seeds} includes the sweep's seed {repro.sweep.seed}: its choice would be"
          " tested on its own training"
      )
    for p in plan_lib.sweep_plan(repro, planned):
      workdir = sweep_dir(root, p.run.name, p.swept)
      if _finished(workdir, p.experiment) or (workdir / RESULTS_DIR / DIVERGED).exists():
        continue
      log(f"sweep: training {p.run.name} at {repro.sweep.key}={p.swept} in {workdir}")
      start = time.perf_counter()
      try:
        result = loop.train(p.experiment, workdir, progress=progress)
      except loop.DivergedError as e:  # A value too high for the run: the sweep goes on.
        write_json(workdir / RESULTS_DIR / DIVERGED, {"error": str(e)})
        log(f"sweep: {p.run.name} at {repro.sweep.key}={p.swept} diverged: {e}")
        continue
      finally:
        _add_seconds(workdir, "train_seconds", time.perf_counter() - start)
      trained += 1
      if result.stopped_by is not None:
        return Progress(trained, evaluated, result.stopped_by, workdir)
    results = sweep_results(repro, root, planned)
    chosen = chosen_values(repro, results)
    write_json(root / SWEEP, [{**r, "chosen": chosen[r["run"]] == r["value"]} for r in results])
  for seed in repro.train_seeds(seeds):
    for p in planned:
      workdir = run_dir(root, p.run.name, seed)
      experiment = overrides.override(p.experiment, "train.seed", seed)
      if p.run.name in chosen:
        experiment = overrides.override(experiment, repro.sweep.key, chosen[p.run.name])
      if _finished(workdir, experiment):
        continue
      log(f"training {p.run.name} seed {seed} ({experiment.name}) in {workdir}")
      start = time.perf_counter()
      if isinstance(
          experiment, config_lib.MoonsExperiment
      ):  # Resumes from its checkpoints; it takes no signals (Ctrl-C: the last one).
        train_moons.train(experiment, workdir)
        _add_seconds(workdir, "train_seconds", time.perf_counter() - start)
        trained += 1
        continue
      result = loop.train(
          experiment,
          workdir,
          progress=progress,
          init_from=_init_from(root, p.run, seed, workdir),
      )
      _add_seconds(workdir, "train_seconds", time.perf_counter() - start)
      trained += 1
      if result.stopped_by is not None:
        return Progress(trained, evaluated, result.stopped_by, workdir)
  _, task_assignments = plan_lib.split_assignments(repro, assignments)
  for seed in repro.train_seeds(seeds):
    for p in planned:
      evaluated += _evaluate(repro, root, p, seed, task_assignments, progress, log)
  return Progress(trained, evaluated, None)


def sweep_results(
    repro: decl.Reproduction, root: pathlib.Path, planned: list[plan_lib.PlannedRun]
) -> list[dict[str, Any]]:
  """Each training of the sweep as {"run", "value", "val_loss", "diverged", "seconds"}: the final
  validation loss once it finished (else None), and why it diverged (else None)."""
  out = []
  for p in plan_lib.sweep_plan(repro, planned):
    workdir = sweep_dir(root, p.run.name, p.swept)
    diverged = workdir / RESULTS_DIR / DIVERGED
    loss = None
    if _finished(workdir, p.experiment):
      losses = [r for r in training_records(workdir) if r["metric"] == "val_loss"]
      loss = next((r["value"] for r in losses if r["settings"]["last"]), None)
    out.append(
        {
            "run": p.run.name,
            "value": p.swept,
            "val_loss": loss,
            "diverged": json.loads(diverged.read_text())["error"] if diverged.exists() else None,
            "seconds": timing(workdir).get("train_seconds", 0.0),
        }
    )
  return out


def chosen_values(repro: decl.Reproduction, results: list[dict[str, Any]]) -> dict[str, float]:
  """Each swept run's value of the lowest final validation loss among `sweep_results`. Raises
  ReproError when a training is neither finished nor diverged, or every value of a run diverged."""
  for r in results:
    if r["val_loss"] is None and r["diverged"] is None:
      raise plan_lib.ReproError(
          f"the sweep's training of {r['run']} at {repro.sweep.key}={r['value']} has neither"
          " finished nor diverged: run the command again"
      )
  chosen = {}
  for run in repro.sweep.runs:
    finite = [
        r
        for r in results
        if r["run"] == run and r["val_loss"] is not None and math.isfinite(r["val_loss"])
    ]
    if not finite:
      raise plan_lib.ReproError(
          f"every value of the sweep of {run} ({repro.sweep.key}: {repro.sweep.values}) diverged;"
          " declare lower ones"
      )
    chosen[run] = min(finite, key=lambda r: r["val_loss"])["value"]
  return chosen


def _check_manifest(root: pathlib.Path, repro: decl.Reproduction, assignments: tuple[str, ...]):
  """The directory holds this reproduction with these --set assignments, or nothing yet."""
  path = root / MANIFEST
  mine = {"reproduction": repro.name, "set": list(assignments)}
  if path.exists():
    try:
      theirs = json.loads(path.read_text())
    except (ValueError, OSError) as e:
      raise plan_lib.ReproError(f"{path} is unreadable ({e}); use another --workdir") from None
    if not isinstance(theirs, dict):
      raise plan_lib.ReproError(
          f"{path} holds a {type(theirs).__name__}, not this project's manifest (a JSON object);"
          " use another --workdir"
      )
    started = any(checkpoints.saved_steps(w) for w in (root / "runs").glob("*"))
    # A command that failed before any run trained (a missing data path) binds nothing.
    if theirs != mine and (started or theirs.get("reproduction") != repro.name):
      raise plan_lib.ReproError(
          f"{root} holds {theirs}, not {mine}: mixing them would mix their results; use another"
          " --workdir"
      )
    if theirs == mine:
      return
  root.mkdir(parents=True, exist_ok=True)
  write_json(path, mine)


def _finished(
    workdir: pathlib.Path, experiment: config_lib.Experiment | config_lib.MoonsExperiment
) -> bool:
  steps = checkpoints.saved_steps(workdir)
  return bool(steps) and steps[-1] >= experiment.train.steps


def _init_from(
    root: pathlib.Path, run: decl.Run, seed: int, workdir: pathlib.Path
) -> loop.InitFrom | None:
  if run.init_from is None or checkpoints.saved_steps(workdir):
    return None  # From scratch, or a fine-tune that resumes.
  source_dir = run_dir(root, run.init_from, seed)
  source = pretrained.load(source_dir)
  return loop.InitFrom(params=source.params, origin=str(source_dir), step=source.step)


def _evaluate(
    repro: decl.Reproduction,
    root: pathlib.Path,
    planned: plan_lib.PlannedRun,
    seed: int,
    task_assignments: tuple[str, ...],
    progress: bool,
    log: Callable[[str], None],
) -> int:
  """Runs the evaluations of a run (seed `seed`) that have no results file yet; their count."""
  run = planned.run
  workdir = run_dir(root, run.name, seed)
  harnesses: dict[tuple[str, ...], harness_lib.Harness] = {}  # By evaluation-only overrides.
  done = 0
  for evaluation in repro.evaluations:
    out = results_path(root, repro, run.name, seed, evaluation.name)
    if (evaluation.runs and run.name not in evaluation.runs) or out.exists():
      continue
    log(f"evaluating {run.name} seed {seed}: {evaluation.name}")
    start = time.perf_counter()
    if evaluation.task == decl.TRAINING:
      records = training_records(workdir)
    elif evaluation.task == plan_lib.MOONS_TASK:
      settings = plan_lib.task_settings(evaluation, task_assignments)
      experiment = overrides.override(planned.experiment, "train.seed", seed)
      found, model = eval_moons.run(experiment, workdir, settings)
      records = [results_lib.record(r, model=model, seed=0) for r in found]
    else:
      if evaluation.model not in harnesses:
        harnesses[evaluation.model] = harness_lib.Harness.load(
            str(workdir),
            model_overrides=evaluation.model,
            batch_size=evaluation.batch_size,
            seed=0,  # The same examples for every run and seed.
            limit=None,
            progress=progress,
            haystack=None,
        )
      harness = harnesses[evaluation.model]
      settings = plan_lib.task_settings(evaluation, task_assignments)
      found = tasks_lib.get(evaluation.task).run(harness, settings)
      records = [results_lib.record(r, model=harness.info, seed=0) for r in found]
    write_jsonl(out, records)
    _add_seconds(workdir, "eval_seconds", time.perf_counter() - start)
    done += 1
  return done


def training_records(workdir: pathlib.Path) -> list[dict[str, Any]]:
  """The run's validation record (metrics.jsonl) as evaluation records of the TRAINING task."""
  vals = [r for r in metrics.read_metrics(workdir) if r.get("split") == "val"]
  last = max((r["step"] for r in vals), default=None)
  out = []
  for r in vals:
    for name, value in r.items():
      if name in ("step", "split", "time") or value is None:
        continue
      out.append(
          {
              "task": decl.TRAINING,
              "metric": f"val_{name}",
              "value": float(value),
              "num_examples": None,
              "settings": {"step": r["step"], "last": r["step"] == last},
              "seed": None,
              "model": {"path": str(workdir), "step": r["step"], "overrides": []},
              "date": None,
          }
      )
  return out


def timing(workdir: pathlib.Path) -> dict[str, float]:
  """Wall seconds spent on the run so far: train_seconds, eval_seconds.

  Raises ReproError naming the file when it is not such a record (the runner writes it whole, so
  something else changed it): the report's wall times would be wrong, and adding to it would
  overwrite it.
  """
  path = workdir / RESULTS_DIR / TIMING
  if not path.exists():
    return {}
  advice = "delete it (its wall times are lost, no result is) and run the command again"
  try:
    spent = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise plan_lib.ReproError(f"{path} is unreadable ({e}); {advice}") from None
  if not isinstance(spent, dict):
    raise plan_lib.ReproError(f"{path} is not a JSON object of wall seconds; {advice}")
  for key, value in spent.items():
    if not results_lib.is_number(value):
      raise plan_lib.ReproError(f"{path}: {key} is {value!r}, not a number of seconds; {advice}")
  return spent


def _add_seconds(workdir: pathlib.Path, key: str, seconds: float) -> None:
  spent = timing(workdir)
  spent[key] = spent.get(key, 0.0) + seconds
  write_json(workdir / RESULTS_DIR / TIMING, spent)


def write_json(path: pathlib.Path, value: Any) -> None:
  write_atomic(path, json.dumps(value, indent=2) + "\n")


def write_jsonl(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
  write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `path` whole or not at all: a stopped command never leaves half a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(
      "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
  ) as f:
    f.write(text)
  os.replace(f.name, path)
