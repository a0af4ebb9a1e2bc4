"""A reproduction's report: every run's results gathered (DIR/results.jsonl), the quantities of the
checks and of the paper's numbers averaged over seeds, the verdict, plots and wall times
(DIR/report.md, DIR/plots.png).

The report is of the seeds of the command (`--seeds N`: train.seed first_seed to first_seed +
N - 1, first_seed 0 unless the reproduction is a redesign on fresh seeds), and says which: a
table's mean is over the seeds in its row's per-seed column, and a check holds or fails once each
of its sides has every one of them. The verdict is "inconclusive" when a precondition fails (the
experiment cannot answer: it names the precondition), else "reproduced" when every check of the
claim holds, "not reproduced" when one fails, and "incomplete" while a check waits for a result.

DIR/results.jsonl keeps every result ever gathered: a command replaces the records of the runs,
seeds and evaluations it gathers (an evaluation's records together, as its file is written whole)
and keeps the others, so a command with fewer seeds than an earlier one removes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

from mosaics_jax.eval import moons as eval_moons, results as results_lib
from mosaics_jax.repro import declaration as decl, plan as plan_lib, runner

RESULTS = "results.jsonl"
REPORT = "report.md"
PLOTS = "plots.png"
MOONS_PLOT = "moons.png"  # The three moons' figure (`eval.moons.plot`), with plots.png.


@dataclasses.dataclass(frozen=True)
class Value:
  """A quantity over seeds: one value per seed that has it."""

  values: tuple[float, ...]
  seeds: tuple[int, ...]

  @property
  def mean(self) -> float:
    return statistics.fmean(self.values)

  @property
  def std(self) -> float:
    """The sample standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

  def __str__(self) -> str:
    spread = f" ± {_number(self.std)}" if len(self.values) > 1 else ""
    return f"{_number(self.mean)}{spread}"


@dataclasses.dataclass(frozen=True)
class Outcome:
  """A check's numbers: the left side, the bound it is compared with, and whether it holds (None
  while a side has no result)."""

  check: decl.Check
  left: Value | None
  bound: float | None
  holds: bool | None
  missing: tuple[int, ...] = ()  # The seeds that a side has no result of.


@dataclasses.dataclass(frozen=True)
class Report:
  verdict: str
  outcomes: tuple[Outcome, ...]
  records: tuple[dict[str, Any], ...]  # The command's seeds'.
  path: pathlib.Path
  recorded: tuple[int, ...]  # The seeds of DIR/results.jsonl: the command's and earlier ones.


def gather(repro: decl.Reproduction, root: pathlib.Path, seeds: int) -> list[dict[str, Any]]:
  """Every result record of every run, seed and evaluation found under `root`, tagged with `run`,
  `train_seed` and `evaluation`."""
  out = []
  for seed in repro.train_seeds(seeds):
    for run in repro.runs:
      for evaluation in repro.evaluations:
        path = runner.results_path(root, repro, run.name, seed, evaluation.name)
        if path.exists():
          for record in _read_records(path):
            out.append(
                {
                    "run": run.name,
                    "train_seed": seed,
                    "evaluation": evaluation.name,
                    **record,
                }
            )
  return out


def _read_records(path: pathlib.Path) -> list[dict[str, Any]]:
  """The records of a results file, or ReproError naming it and the line (the runner writes them
  whole, so a bad one was changed by hand: delete it and the command evaluates again)."""
  try:
    return results_lib.read_jsonl(path)
  except (ValueError, OSError) as e:
    raise plan_lib.ReproError(f"{e}; delete it and run the command again") from None


def read_results(root: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of DIR/results.jsonl (none when absent), or ReproError naming its bad line: it
  may hold results of seeds no longer under DIR/runs, so it is never rewritten without them."""
  path = pathlib.Path(root) / RESULTS
  advice = f"move it away and run the command again (the results under {path.parent / 'runs'}"
  advice += " make it anew)"
  if not path.exists():
    return []
  try:
    records = results_lib.read_jsonl(path)
  except (ValueError, OSError) as e:
    raise plan_lib.ReproError(f"{e}; {advice}") from None
  for number, r in enumerate(records, 1):
    if not isinstance(r.get("train_seed"), int) or not {"run", "evaluation"} <= r.keys():
      raise plan_lib.ReproError(
          f"{path}: record {number} has no run, evaluation and train_seed; {advice}"
      )
  return records


def merge(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """`old` with the records of each (run, seed, evaluation) of `new` in place of its own: an
  evaluation's records are replaced together, since its file is written whole."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for r in old:
    groups.setdefault(_source(r), []).append(r)
  fresh: dict[tuple, list[dict[str, Any]]] = {}
  for r in new:
    fresh.setdefault(_source(r), []).append(r)
  groups.update(fresh)
  return [r for records in groups.values() for r in records]


def _source(record: dict[str, Any]) -> tuple[str, int, str]:
  return record["run"], record["train_seed"], record["evaluation"]


def _matches(record: dict[str, Any], quantity: decl.Quantity) -> bool:
  return (
      record["run"] == quantity.run
      and record["evaluation"] == quantity.evaluation
      and record["metric"] == quantity.metric
      and all(record["settings"].get(key) == value for key, value in quantity.where)
  )


def quantity(records: Sequence[dict[str, Any]], q: decl.Quantity) -> Value | None:
  """The values of `q`, one per seed; None when no seed has one.

  Raises ReproError when `q` selects several records of one seed (it needs more `where`).
  """
  by_seed: dict[int, list[dict[str, Any]]] = {}
  for record in records:
    if _matches(record, q):
      by_seed.setdefault(record["train_seed"], []).append(record)
  for seed, found in by_seed.items():
    if len(found) > 1:
      settings = [r["settings"] for r in found]
      raise plan_lib.ReproError(
          f"quantity {q} selects {len(found)} results of seed {seed} (settings {settings}):"
          " add settings to its `where`"
      )
  if not by_seed:
    return None
  seeds = tuple(sorted(by_seed))
  return Value(tuple(float(by_seed[s][0]["value"]) for s in seeds), seeds)


def outcome(records: Sequence[dict[str, Any]], check: decl.Check, seeds: Sequence[int]) -> Outcome:
  """The check over the train seeds `seeds`; undecided (holds None) while a side lacks one: means
  over different seeds would compare different draws."""
  left = quantity(records, check.left)
  right = check.right
  right_value = quantity(records, right) if isinstance(right, decl.Quantity) else right
  sides = [left, right_value] if isinstance(right, decl.Quantity) else [left]
  missing = tuple(s for s in seeds if any(v is None or s not in v.seeds for v in sides))
  if missing:
    return Outcome(check, left, None, None, missing)
  base = right_value.mean if isinstance(right_value, Value) else float(right_value)
  bound = check.scale * base + check.offset
  holds = left.mean >= bound if check.op == ">=" else left.mean <= bound
  return Outcome(check, left, bound, holds)


def verdict(outcomes: Sequence[Outcome]) -> str:
  failed = [o.check.description for o in outcomes if o.check.precondition and o.holds is False]
  if failed:
    return f"inconclusive (precondition failed: {'; '.join(failed)})"
  if any(o.holds is None for o in outcomes) or not outcomes:
    return "incomplete"
  return "reproduced" if all(o.holds for o in outcomes) else "not reproduced"


def held(outcomes: Sequence[Outcome]) -> str:
  """How many checks of the claim hold, and how many preconditions: "2 of 3 checks hold"."""
  claims = [o for o in outcomes if not o.check.precondition]
  text = f"{sum(bool(o.holds) for o in claims)} of {len(claims)} checks hold"
  preconditions = [o for o in outcomes if o.check.precondition]
  if preconditions:
    text += f", {sum(bool(o.holds) for o in preconditions)} of {len(preconditions)} preconditions"
  return text


def write(
    repro: decl.Reproduction,
    root: str | pathlib.Path,
    *,
    seeds: int,
    assignments: tuple[str, ...] = (),
) -> Report:
  """Gathers the results of `seeds` seeds (`Reproduction.train_seeds`) under `root`, adds them to
  results.jsonl (module docstring) and writes report.md and plots.png of them."""
  root = pathlib.Path(root).absolute()
  planned = plan_lib.plan(repro, assignments)
  records = gather(repro, root, seeds)
  kept = merge(read_results(root), records)
  runner.write_jsonl(root / RESULTS, kept)
  recorded = tuple(sorted({r["train_seed"] for r in kept}))
  outcomes = tuple(outcome(records, c, repro.train_seeds(seeds)) for c in repro.checks)
  plotted = [PLOTS] if _plot(repro, records, root / PLOTS) else []
  if plotted and any(e.task == plan_lib.MOONS_TASK for e in repro.evaluations):
    eval_moons.plot(records, root / MOONS_PLOT)
    plotted.append(MOONS_PLOT)
  text = _markdown(repro, planned, records, outcomes, seeds, recorded, assignments, root, plotted)
  runner.write_atomic(root / REPORT, text)
  return Report(verdict(outcomes), outcomes, tuple(records), root / REPORT, recorded)


def seed_ranges(seeds: Sequence[int]) -> str:
  """Seeds as ranges: "0-3", "0-1, 5"."""
  spans: list[list[int]] = []
  for s in sorted(seeds):
    if spans and s == spans[-1][1] + 1:
      spans[-1][1] = s
    else:
      spans.append([s, s])
  return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "none"


def _number(x: float) -> str:
  if not math.isfinite(x):
    return str(x)
  return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


def _label(repro: decl.Reproduction, record: dict[str, Any]) -> str:
  evaluation = {e.name: e for e in repro.evaluations}[record["evaluation"]]
  return f"{record['run']} ({evaluation.name})" if evaluation.model else record["run"]


def _row_settings(record: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in record["settings"].items() if k in plan_lib.ROW_KEYS and k != "last"}


def aggregate(records: Sequence[dict[str, Any]]) -> dict[tuple, Value]:
  """Values over seeds of every (run, evaluation, task, metric, row settings)."""
  groups: dict[tuple, dict[int, float]] = {}
  for r in records:
    key = (r["run"], r["evaluation"], r["task"], r["metric"], json.dumps(_row_settings(r)))
    groups.setdefault(key, {})[r["train_seed"]] = float(r["value"])
  return {key: Value(tuple(v[s] for s in sorted(v)), tuple(sorted(v))) for key, v in groups.items()}


def _plot(repro: decl.Reproduction, records: list[dict[str, Any]], path: pathlib.Path) -> bool:
  """The means over seeds by length, position or training step, one line per run."""
  try:
    from mosaics_jax.eval import plots  # matplotlib is the optional `plots` extra.
  except ImportError:
    return False
  means = []
  labels = {(r["run"], r["evaluation"]): _label(repro, r) for r in records}
  for (run, evaluation, task, metric, settings), value in aggregate(records).items():
    means.append(
        {
            "task": task,
            "metric": metric,
            "value": value.mean,
            "settings": json.loads(settings),
            "model": {"path": labels[run, evaluation], "step": None, "overrides": []},
        }
    )
  try:
    plots.plot_results(means, path, title=f"{repro.name}: means over seeds")
  except ValueError:  # Nothing measured at two lengths, positions or steps.
    path.unlink(missing_ok=True)
    return False
  return True


def _markdown(
    repro: decl.Reproduction,
    planned: list[plan_lib.PlannedRun],
    records: list[dict[str, Any]],
    outcomes: tuple[Outcome, ...],
    seeds: int,
    recorded: tuple[int, ...],
    assignments: tuple[str, ...],
    root: pathlib.Path,
    plotted: list[str],
) -> str:
  mine = repro.train_seeds(seeds)
  covered = seed_ranges(mine)
  others = sorted(set(recorded) - set(mine))
  kept = (
      f" {RESULTS} also keeps seeds {seed_ranges(others)} of earlier commands, left out here"
      f" (`--seeds {others[-1] + 1 - repro.first_seed}` reports them too)."
      if others
      else ""
  )
  command = f"mosaics-repro {repro.name} --workdir DIR --seeds {seeds}"
  if assignments:
    command += " --set " + " ".join(assignments)
  lines = [
      f"# Reproduction `{repro.name}`",
      "",
      f"**Claim** ({repro.source}): {repro.claim}",
      "",
      f"**Verdict: {verdict(outcomes)}** ({held(outcomes)}; {repro.scale}"
      f" scale; means ± sample standard deviation over seeds {covered}).",
      "",
      f"Seeds: {covered} (`--seeds {seeds}`). A mean is over the seeds in its row's per-seed"
      f" column; a check holds or fails once each quantity it compares has every seed.{kept}",
      "",
      f"Command: `{command}`",
  ]
  preconditions = [o for o in outcomes if o.check.precondition]
  if preconditions:
    lines += [
        "",
        "## Preconditions",
        "",
        "The experiment can answer the claim only when these hold.",
        "",
        *_check_table(preconditions),
    ]
  lines += ["", "## Checks", "", *_check_table([o for o in outcomes if not o.check.precondition])]
  # The sweep's trainings, read once for its table and the wall time.
  swept = runner.sweep_results(repro, root, planned) if repro.sweep is not None else []
  if repro.sweep is not None:
    lines += ["", *_sweep_table(repro, swept)]
  if repro.paper:
    lines += [
        "",
        "## The paper's numbers and ours",
        "",
        "| paper | value | ours |",
        "|---|---:|---|",
    ]
    for p in repro.paper:
      ours = "not comparable at this scale"
      if p.ours is not None:
        value = quantity(records, p.ours)
        ours = f"no result yet ({p.ours})"
        if value is not None:
          over = "" if value.seeds == tuple(mine) else f" over seeds {seed_ranges(value.seeds)}"
          ours = f"{value}{over} ({p.ours})"
      lines.append(f"| {p.what} | {_number(p.value)} | {ours} |")
  lines += ["", "## Results", ""]
  values = aggregate(records)
  for evaluation in repro.evaluations:
    rows = [
        (key, value)
        for key, value in values.items()
        if key[1] == evaluation.name
        # The training record's final evaluation only; the plot has the curves.
        and (evaluation.task != decl.TRAINING or _is_last(records, key))
    ]
    model = f" with model {' '.join(evaluation.model)}" if evaluation.model else ""
    lines += [f"### {evaluation.name} (`{evaluation.task}`{model})", ""]
    if not rows:
      lines += ["no results yet", ""]
      continue
    lines += [
        "| run | metric | setting | mean | std | per seed |",
        "|---|---|---|---:|---:|---|",
    ]
    for (run, _, _, metric, settings), value in rows:
      setting = ", ".join(f"{k}={v}" for k, v in json.loads(settings).items()) or "-"
      per_seed = ", ".join(f"{s}: {_number(v)}" for s, v in zip(value.seeds, value.values))
      lines.append(
          f"| {run} | {metric} | {setting} | {_number(value.mean)} | {_number(value.std)} |"
          f" {per_seed} |"
      )
    lines.append("")
  if plotted:
    lines += ["## Plots", "", *(f"![{repro.name}]({name})" for name in plotted), ""]
  lines += [
      "## Runs",
      "",
      "| run | experiment | overrides | params | tokens | seeds trained | train min / seed |"
      " eval min / seed |",
      "|---|---|---|---:|---:|---:|---:|---:|",
  ]
  total = 0.0
  for p in planned:
    spent = [runner.timing(runner.run_dir(root, p.run.name, s)) for s in repro.train_seeds(seeds)]
    done = [t for t in spent if t]
    train = [t.get("train_seconds", 0.0) for t in done]
    evals = [t.get("eval_seconds", 0.0) for t in done]
    total += sum(train) + sum(evals)
    per = lambda xs: _number(statistics.fmean(xs) / 60) if xs else "-"
    lines.append(
        f"| {p.run.name} | {p.run.experiment} | {' '.join(p.run.overrides) or '-'} |"
        f" {p.params:,} | {p.tokens:,} | {len(done)} | {per(train)} | {per(evals)} |"
    )
  total += sum(r["seconds"] for r in swept)
  lines += [
      "",
      f"Wall time of training and evaluation, all seeds (and the sweep): {total / 60:.1f} min.",
      "",
  ]
  if repro.notes:
    lines += ["## Notes", "", repro.notes, ""]
  return "\n".join(lines)


def _check_table(outcomes: Sequence[Outcome]) -> list[str]:
  lines = ["| check | ours | bound | holds |", "|---|---:|---:|---|"]
  for o in outcomes:
    c = o.check
    right = c.right if isinstance(c.right, decl.Quantity) else _number(c.right)
    scale = "" if c.scale == 1.0 else f"{_number(c.scale)} × "
    offset = "" if c.offset == 0.0 else f" {'+' if c.offset > 0 else '-'} {_number(abs(c.offset))}"
    rule = f"{c.left} {c.op} {scale}{right}{offset}"
    bound = "-" if o.bound is None else f"{c.op} {_number(o.bound)}"
    holds = {True: "yes", False: "**no**"}.get(
        o.holds, f"no result yet of seed(s) {seed_ranges(o.missing)}"
    )
    lines.append(f"| {c.description}: {rule} | {o.left or '-'} | {bound} | {holds} |")
  return lines


def _sweep_table(repro: decl.Reproduction, results: list[dict[str, Any]]) -> list[str]:
  """The sweep's trainings: final validation loss, divergence, the choice."""
  sweep = repro.sweep
  extra = f", with {' '.join(sweep.overrides)}" if sweep.overrides else ""
  lines = [
      f"## Sweep of {sweep.key}",
      "",
      f"Each run trained once per value (seed {sweep.seed}{extra}); its seeds train at the value"
      " of the lowest final validation loss on the training distribution (`val_loss`), chosen"
      " before any evaluation of the claim.",
      "",
      f"| run | {sweep.key} | final val loss | train min | chosen |",
      "|---|---:|---:|---:|---|",
  ]
  # A command stopped during the sweep reports it as far as it went, with no choice yet.
  done = all(r["val_loss"] is not None or r["diverged"] for r in results)
  chosen = runner.chosen_values(repro, results) if done else {}
  for r in results:
    loss = "diverged" if r["diverged"] else "not trained yet"
    if r["val_loss"] is not None:
      loss = _number(r["val_loss"])
    mark = "**yes**" if chosen.get(r["run"]) == r["value"] else ""
    lines.append(
        f"| {r['run']} | {_number(r['value'])} | {loss} | {_number(r['seconds'] / 60)} | {mark} |"
    )
  return lines


def _is_last(records: list[dict[str, Any]], key: tuple) -> bool:
  run, evaluation, task, metric, settings = key
  step = json.loads(settings).get("step")
  return any(
      r["run"] == run
      and r["evaluation"] == evaluation
      and r["metric"] == metric
      and r["settings"].get("step") == step
      and r["settings"].get("last")
      for r in records
  )
