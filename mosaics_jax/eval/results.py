"""Evaluation results: one `Result` per (task, setting, metric), as JSON lines and markdown tables.

A JSON record (`record`) holds the task, the metric and its value, the number of examples, the
task's settings (with the row's own, such as the length), the seed, the model (path, training
step, evaluation-only overrides) and the date. `mosaics-eval --out FILE` appends records, so that
runs at several lengths or of several models gather in one file for `mosaics-plot`.

Appending never damages what a file holds: the target is checked before any evaluation runs
(`check_target`: a file of records, or a new file in an existing directory), and each append is
one write of whole lines, under an exclusive lock, flushed to disk, and undone when it fails
partway (`append_jsonl`). Appending in place rather than rewriting the file and renaming it over
the old one lets several evaluations append to one file at once: each takes the lock in turn, where
two rewrites would each drop the other's records.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import pathlib
import stat
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


def check_target(path: str | os.PathLike) -> pathlib.Path:
  """`path` as `append_jsonl`'s target, checked before the work whose results go there.

  Raises ValueError naming why not: a directory or other non-file, a missing or unwritable
  directory, an unwritable file, or a file that is not JSON lines of records (`read_jsonl`: a
  binary file, the input text of an evaluation, a training run's metrics.jsonl).
  """
  path = pathlib.Path(path)
  if not path.exists():
    parent = path.absolute().parent
    if not parent.is_dir():
      raise ValueError(f"{path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
      raise ValueError(f"{path}: the directory {parent} is not writable")
    return path
  if path.is_dir():
    raise ValueError(f"{path} is a directory, not a results file")
  if not stat.S_ISREG(path.stat().st_mode):
    raise ValueError(f"{path} is not a regular file")
  try:
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
  except OSError as e:
    raise ValueError(f"{path} is not writable ({e.strerror})") from None
  read_jsonl(path)
  return path


def append_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> pathlib.Path:
  """Appends one line per record to `path` (made if absent), all of them or none.

  The lines go in one write, under an exclusive lock (other appenders wait), flushed to disk.

  Raises:
    OSError: the write failed (a full disk); the file is cut back to its length before it.
  """
  path = pathlib.Path(path)
  data = "".join(json.dumps(r) + "\n" for r in records).encode()
  fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    # Appenders take turns, so the length read here is the one to cut back to.
    fcntl.flock(fd, fcntl.LOCK_EX)
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
      data = b"\n" + data  # A last line without its newline (an edit) stays a line of its own.
    try:
      rest = memoryview(data)
      while rest:  # A write may take part of the bytes (a disk that fills up).
        rest = rest[os.write(fd, rest) :]
      os.fsync(fd)
    except OSError:
      os.ftruncate(fd, size)
      raise
  finally:
    os.close(fd)  # Releases the lock.
  return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a results file; ValueError naming the line that is not a record."""
  path = pathlib.Path(path)
  records = []
  with path.open("rb") as f:
    # A binary file may have no line ends to stop reading at.
    if b"\0" in f.read(8192):
      raise ValueError(f"{path} is a binary file, not JSON lines of results")
    f.seek(0)
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        raise ValueError(f"{path}:{number} is not UTF-8 text, not a line of results") from None
      if line.strip():
        records.append(_record(path, number, line))
  return records


def _record(path: pathlib.Path, number: int, line: str) -> dict[str, Any]:
  """The record on line `number` of `path`; ValueError naming the line when it is none."""
  try:
    r = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{number} is not JSON: {e}") from None
  if not (
      isinstance(r, dict)
      and {"task", "metric", "value", "settings"} <= set(r)
      and isinstance(r["settings"], dict)
  ):
    raise ValueError(f"{path}:{number} is not an evaluation record (task, metric, value, ...)")
  if not is_number(r["value"]):
    raise ValueError(f"{path}:{number}: the value {r['value']!r} is not a number")
  return r


def is_number(value: Any) -> bool:
  """Whether a JSON value is a number (not a string, null or boolean)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


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
