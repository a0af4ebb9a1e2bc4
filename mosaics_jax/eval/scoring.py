"""The examples of generation tasks and RULER's scorers of generated text.

A generation task gives the model a prompt and scores the text it generates against references,
as RULER does (NVIDIA/RULER, `eval/synthetic/constants.py`): `string_match_all` counts the share of
references found in the prediction, `string_match_part` whether any is; both ignore case and are
reported x100.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

# RULER's post-processing: control characters become newlines, then the text is stripped.
_CONTROL = re.compile(r"[\x00-\x1f]")


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt and the references its continuation is scored against."""

  prompt: str
  answers: tuple[str, ...]


def postprocess(prediction: str) -> str:
  """The prediction as RULER scores it."""
  return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Mean over examples of the share of an example's references found (case-insensitive) in its
  prediction, x100."""
  _check(predictions, references)
  scores = [
      sum(r.lower() in p.lower() for r in refs) / len(refs)
      for p, refs in zip(predictions, references)
  ]
  return 100.0 * sum(scores) / len(scores)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Mean over examples of 1 when any of an example's references is found (case-insensitive) in
  its prediction, x100."""
  _check(predictions, references)
  scores = [
      float(any(r.lower() in p.lower() for r in refs)) for p, refs in zip(predictions, references)
  ]
  return 100.0 * sum(scores) / len(scores)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
  if not predictions:
    raise ValueError("no predictions to score")
  empty = [i for i, refs in enumerate(references) if not refs]
  if empty:
    raise ValueError(f"examples {empty} have no references")
