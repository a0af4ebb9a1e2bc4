"""Evaluation results: one `Result` per (task, setting, metric), as JSON lines and markdown tables.

A JSON record (`record`) holds the task, the metric and its value, the number of examples, the
task's settings (with the row's own, such as the length), the seed, the model (path, training
step, evaluation-only overrides) and the date. `mosaics-eval --out FILE` appends records, so that
runs at several lengths or of several models gather in one file for `mosaics-plot`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Result:
  """One metric of one task at one setting; `row` names the setting (e.g. {"length": 4096})."""

  task: str
  metric: str
  value: float
  num_examples: int
  row: Mapping[str, Any]
  settings: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Model:
  """Which model the results are of."""

  path: str
  step: int | None
  overrides: tuple[str, ...]  # --set model.KEY=VALUE assignments that change evaluation only.


def record(result: Result, *, model: Model, seed: int, date: str | None = None) -> dict[str, Any]:
  """The JSON record of a result."""
  return {
      "task": result.task,
      "metric": result.metric,
      "value": result.value,
      "num_examples": result.num_examples,
      "settings": {**_plain(result.settings), **_plain(result.row)},
      "seed": seed,
      "model": {"path": model.path, "step": model.step, "overrides": list(model.overrides)},
      "date": date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def append_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> pathlib.Path:
  """Appends one line per record to `path` (made with its directory if absent)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("a", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a results file; ValueError naming the line that is not a record."""
  records = []
  for number, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number} is not JSON: {e}") from None
    if not isinstance(r, dict) or not {"task", "metric", "value", "settings"} <= set(r):
      raise ValueError(f"{path}:{number} is not an evaluation record (task, metric, value, ...)")
    records.append(r)
  return records


def examples_run(results: Sequence[Result]) -> int:
  """The examples a task's results come from: per task length, the most any metric scored (the
  metrics of one length, and the position buckets of a perplexity, share their examples)."""
  most: dict[tuple[str, Any], int] = {}
  for r in results:
    key = (r.task, r.row.get("length"))
    most[key] = max(most.get(key, 0), r.num_examples)
  return sum(most.values())


def markdown(results: Sequence[Result]) -> str:
  """A table per task and kind of row (a task's summary and its loss by position apart): a line
  per setting, a column per metric."""
  tables = []
  groups: dict[tuple[str, tuple[str, ...]], list[Result]] = {}
  for r in results:
    groups.setdefault((r.task, tuple(r.row)), []).append(r)
  tasks = [task for task, _ in groups]
  for (task, keys), mine in groups.items():
    # A task of several tables (a summary, then by position) names what each is by.
    title = f"{task} by {', '.join(keys)}" if keys and tasks.count(task) > 1 else task
    metrics = list(dict.fromkeys(r.metric for r in mine))
    rows: dict[tuple, dict[str, Result]] = {}
    for r in mine:
      rows.setdefault(tuple(r.row[k] for k in keys), {})[r.metric] = r
    header = [*keys, *metrics, "examples"]
    lines = [f"### {title}", "", _line(header), _line(["---"] * len(header))]
    for values, by_metric in rows.items():
      cells = [_cell(v) for v in values] + [
          _cell(by_metric[m].value) if m in by_metric else "" for m in metrics
      ]
      count = max(r.num_examples for r in by_metric.values())
      lines.append(_line([*cells, str(count)]))
    tables.append("\n".join(lines))
  return "\n\n".join(tables)


def _line(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def _cell(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
  return "" if value is None else str(value)


def _plain(mapping: Mapping[str, Any]) -> dict[str, Any]:
  """JSON-ready values: tuples as lists."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in mapping.items()}
