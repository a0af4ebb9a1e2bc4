"""Tasks scored on generated text: RULER's synthetic tasks (`ruler.py`) and QA tasks (`qa.py`),
at a list of task lengths.

Each task's settings are one flat frozen dataclass: the sweep (`lengths`, `num_examples`, and for
RULER's tasks the `haystack` file) and the fields of the task's own settings, so that `--set
niah_single.lengths=[2048] --set niah_single.num_needle_k=4` reads like any other config. At each
length the task's examples are generated from the seed, the model continues each prompt greedily
for the task's token budget, and the predictions are scored as RULER scores them.
"""

from __future__ import annotations

import dataclasses
import pathlib
import typing
from collections.abc import Callable
from typing import Any

from mosaics_jax import config as config_lib
from mosaics_jax.eval import harness as harness_lib, qa, results as results_lib, ruler, scoring


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sweep:
  """Where a generation task runs: its task lengths in tokens of the model's tokenizer and the
  examples per length."""

  lengths: tuple[int, ...] = (1024, 2048, 4096)
  num_examples: int = 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class HaystackSweep(Sweep):
  """RULER's tasks also read a text file for essay haystacks (default: mosaics-eval's
  --haystack)."""

  haystack: str | None = None


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a task's examples come from: its module's task table and generator."""

  task: Any  # ruler.Task or qa.Task: tokens_to_generate, metric, settings_class.
  generate: Callable[..., list[scoring.Example]]
  sweep: type[Sweep]


def settings_class(name: str, source: Source) -> type:
  """The flat settings of task `name`: its sweep's fields, then its own settings' fields."""
  own = source.task.settings_class
  fields = []
  for cls in (source.sweep, own):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      default = (
          dataclasses.field(default=f.default)
          if f.default is not dataclasses.MISSING
          else dataclasses.field(default_factory=f.default_factory)
      )
      fields.append((f.name, hints[f.name], default))

  def post_init(self):
    config_lib.check_types(self)
    if not self.lengths or min(self.lengths) < 2:
      raise config_lib.ConfigError(f"{name}.lengths must be >= 2 tokens each, got {self.lengths}")
    if self.num_examples < 1:
      raise config_lib.ConfigError(f"{name}.num_examples must be >= 1, got {self.num_examples}")
    try:
      split(self, source)
    except (ValueError, TypeError) as e:
      raise config_lib.ConfigError(f"{name}: {e}") from None

  title = "".join(part.title() for part in name.split("_"))
  cls = dataclasses.make_dataclass(
      f"{title}Settings",
      fields,
      frozen=True,
      kw_only=True,
      namespace={"__post_init__": post_init, "__doc__": f"The settings of {name}."},
  )
  cls.__module__ = __name__
  return cls


def split(settings: Any, source: Source) -> tuple[Sweep, Any]:
  """(the sweep, the task's own settings) of flat settings."""
  values = dataclasses.asdict(settings)
  parts = []
  for cls in (source.sweep, source.task.settings_class):
    parts.append(cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)}))
  return parts[0], parts[1]


def run(
    harness: harness_lib.Harness, settings: Any, *, name: str, source: Source
) -> list[results_lib.Result]:
  """The task's metric at each of its lengths."""
  sweep, own = split(settings, source)
  task = source.task
  extra = {}
  if isinstance(sweep, HaystackSweep):
    extra["haystack"] = _haystack(harness, sweep, task, own, name)
  for length in sweep.lengths:  # Every length, before any work.
    harness.check_length(length)
  out = []
  fields = dataclasses.asdict(settings)
  for length in sweep.lengths:
    try:
      examples = source.generate(
          name,
          own,
          tokenizer=harness.tokenizer,
          length=length,
          num_examples=harness.count(sweep.num_examples),
          seed=harness.seed,
          **extra,
      )
    # OSError: a QA file that cannot be read; RuntimeError: no needle found unique in 100 draws.
    except (ValueError, OSError, RuntimeError) as e:
      raise harness_lib.EvalError(f"{name} at length {length}: {e}") from None
    bar = harness.bar(len(examples), f"{name} @ {length}")
    predictions = harness.generate_text(
        [e.prompt for e in examples], task.tokens_to_generate, length, bar
    )
    bar.close()
    predictions = [scoring.postprocess(p) for p in predictions]
    value = scoring.METRICS[task.metric](predictions, [e.answers for e in examples])
    out.append(
        results_lib.Result(name, task.metric, value, len(examples), {"length": length}, fields)
    )
  return out


def _haystack(harness, sweep: HaystackSweep, task, own, name: str) -> str | None:
  """The essay text of a task that reads one, else None."""
  if not task.needs_haystack(own):
    return None
  path = sweep.haystack or harness.haystack
  if path is None:
    raise harness_lib.EvalError(
        f"{name} fills its context with essays: give a long English text with --haystack FILE"
        f" (or --set {name}.haystack=FILE)"
    )
  return _read(path)


def _read(path: str) -> str:
  try:
    return pathlib.Path(path).read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise harness_lib.EvalError(f"cannot read the haystack file {path}: {e}") from None


SOURCES = {
    **{name: Source(task, ruler.generate, HaystackSweep) for name, task in ruler.TASKS.items()},
    **{name: Source(task, qa.generate, Sweep) for name, task in qa.TASKS.items()},
}
