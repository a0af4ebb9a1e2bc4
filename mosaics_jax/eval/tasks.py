"""The evaluation tasks by name, their settings, and `--set TASK.KEY=VALUE` on them.

settings = tasks.settings(["niah_single"], ["niah_single.lengths=[512,1024]"])
results = tasks.get("niah_single").run(harness, settings["niah_single"])
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mosaics_jax import config as config_lib, overrides
from mosaics_jax.eval import (
    generation,
    harness as harness_lib,
    icl,
    moons,
    perplexity,
    recall,
    regbench,
    results as results_lib,
)


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: its name, what it measures, its settings (a frozen dataclass) and how it runs."""

  name: str
  summary: str
  settings_class: type
  run: Callable[[harness_lib.Harness, Any], list[results_lib.Result]]


_SUMMARIES = {
    "niah_single": "RULER: one needle (a key and its value) in a haystack",
    "niah_multikey": "RULER: one needle among distractor needles of other keys",
    "niah_multivalue": "RULER: every value of one key, spread through the haystack",
    "niah_multiquery": "RULER: the values of several keys at once",
    "vt": "RULER: variable tracking, the variables a value is passed to along chains",
    "cwe": "RULER: the most common words of a list",
    "fwe": "RULER: the most frequent words of a Zipf-distributed text",
    "qa_1": "RULER: SQuAD v2 questions over gold and distractor documents (dev file at path)",
    "qa_2": "RULER: HotpotQA questions over gold and distractor documents (dev file at path)",
    "synthetic_qa": "QA over generated documents of new facts (no download)",
}


def _generation_task(name: str, source: generation.Source) -> Task:
  return Task(
      name,
      _SUMMARIES[name],
      generation.settings_class(name, source),
      functools.partial(generation.run, name=name, source=source),
  )


TASKS: dict[str, Task] = {
    perplexity.NAME: Task(
        perplexity.NAME,
        "loss, perplexity and bits per byte of a file, and the loss by position",
        perplexity.Settings,
        perplexity.run,
    ),
    **{name: _generation_task(name, source) for name, source in generation.SOURCES.items()},
    regbench.NAME: Task(
        regbench.NAME,
        "in-context language learning on held-out regular languages (accuracy, L1)",
        regbench.Settings,
        regbench.run,
    ),
    recall.SYNTHETIC: Task(
        recall.SYNTHETIC,
        "the run's synthetic recall task (induction or MQAR) at any length: accuracy and loss on"
        " the answers",
        recall.SyntheticSettings,
        recall.run_synthetic,
    ),
    recall.COPY: Task(
        recall.COPY,
        "a passage of text read twice: loss on the passage, loss and greedy accuracy on its copy",
        recall.CopySettings,
        recall.run_copy,
    ),
    icl.NAME: Task(
        icl.NAME,
        "LongICLBench's in-context classification (Banking77, GoEmotions, TACRED, synthetic) by"
        " demonstrations per class: exact match and likelihood accuracy",
        icl.Settings,
        icl.run,
    ),
    moons.NAME: Task(
        moons.NAME,
        "a three-moons run's held-out error by observed steps, and which moon each head predicts"
        " (`mosaics-repro three-moons` runs it)",
        moons.Settings,
        moons.run_harness,
    ),
}


def get(name: str) -> Task:
  """The task `name`; ConfigError with the closest names when there is none."""
  if name not in TASKS:
    raise config_lib.ConfigError(config_lib.unknown_key(name, TASKS, "the tasks"))
  return TASKS[name]


def settings(names: Sequence[str], assignments: Iterable[str]) -> dict[str, Any]:
  """The settings of each task of `names`, with "TASK.KEY=VALUE" assignments applied in order.

  Raises ConfigError for an unknown task, a task not among `names`, an unknown key (with close
  names) or a value of the wrong type.
  """
  out = {name: get(name).settings_class() for name in names}
  for assignment in assignments:
    key, sep, text = assignment.partition("=")
    task, dot, field = key.partition(".")
    if not sep or not dot:
      raise config_lib.ConfigError(f"--set takes TASK.KEY=VALUE, got {assignment!r}")
    if task not in out:
      get(task)  # An unknown name is named as such.
      raise config_lib.ConfigError(
          f"--set {key}: task {task!r} is not evaluated here (--task {' '.join(names)})"
      )
    try:
      value = overrides.parse_value(text, overrides.field_hint(out[task], field))
      out[task] = overrides.override(out[task], field, value)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"--set {assignment}: {e}") from None
  return out


def describe() -> str:
  """Every task with its summary and settings (default values), for `mosaics-eval --list`."""
  lines = []
  for task in TASKS.values():
    lines.append(f"{task.name}: {task.summary}")
    for field in dataclasses.fields(task.settings_class):
      lines.append(f"    {task.name}.{field.name} = {getattr(task.settings_class(), field.name)!r}")
  return "\n".join(lines)
