"""The model under evaluation and what tasks ask of it: scores of token rows, generated text, the
tokenizer, a progress bar, the seed and the example limit.

    harness = Harness.load("runs/mm2-char", batch_size=8, seed=0)
    losses = harness.token_losses(rows)
    texts = harness.generate_text(prompts, max_new_tokens=32, length=4096)

Scoring goes through `inference.score.Scorer` (chunks of fixed size through the decode cache) and
generation through `inference.generate.Generator` (greedy, as RULER scores). Prompts are padded to
one width per task length, so each length compiles once. With more than one device, batches are
split over a mesh of every device on the data axis.

A training workdir also tells which data the model was trained on: its config.json's data section
(`training_data`) and its record of the data files, absolute paths and sha256 (`training_file`;
training writes that record, `train/workdir.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from mosaics_jax import (
    checkpoints,
    config as config_lib,
    overrides as overrides_lib,
    sharding,
    tokenizers,
)
from mosaics_jax.eval import results as results_lib
from mosaics_jax.inference import generate as generate_lib, score as score_lib
from mosaics_jax.model import families
from mosaics_jax.port import pretrained as pretrained_lib


class EvalError(ValueError):
  """A task, setting or model that cannot be evaluated as asked."""


@dataclasses.dataclass
class Harness:
  """A loaded model with its compiled scorer and generator (module docstring)."""

  model: pretrained_lib.Pretrained
  scorer: score_lib.Scorer
  generator: generate_lib.Generator
  info: results_lib.Model
  seed: int = 0
  limit: int | None = None  # The most examples per task setting.
  progress: bool = True
  haystack: str | None = None  # The default essay file of RULER's haystacks.
  # The data config of the model's training run, where its workdir keeps it (not in an export).
  training_data: dict[str, Any] | None = None
  # That run's record of its files (checkpoints.DATA_FILE): field -> {"path", "sha256", "bytes"}.
  training_files: dict[str, dict[str, Any]] | None = None

  @classmethod
  def load(
      cls,
      path: str,
      *,
      model_overrides: Sequence[str] = (),
      batch_size: int = 8,
      chunk: int = 512,
      **kwargs: Any,
  ) -> Harness:
    """The model at `path` (a workdir or an export), with `model_overrides` ("KEY=VALUE" of
    fields that change evaluation only, such as long_term_delay) applied.

    Raises EvalError when an override would change the parameters.
    """
    model = pretrained_lib.load(path)
    config = model.config
    for assignment in model_overrides:
      key, sep, text = assignment.partition("=")
      if not sep:
        raise EvalError(f"--set takes model.KEY=VALUE, got model.{assignment!r}")
      config = overrides_lib.override(
          config, key, overrides_lib.parse_value(text, overrides_lib.field_hint(config, key))
      )
    changed = config_lib.fine_tune_mismatch(model.config, config)
    if changed:
      raise EvalError(
          f"model overrides may change evaluation only ({', '.join(config.runtime_fields)}), but"
          f" these change the parameters: {'; '.join(changed)}"
      )
    if config != model.config:
      model = dataclasses.replace(
          model,
          config=config,
          model=families.build_model(config),
          params=families.to_layout(model.params, config),
      )
    mesh = None
    devices = jax.device_count()
    if devices > 1:
      mesh = sharding.make_mesh(config_lib.MeshConfig())
      batch_size = -(-batch_size // devices) * devices  # Whole rows on every device.
    step_kwargs = families.of(config).step_kwargs(config, None)
    scorer = score_lib.Scorer(
        model.model, chunk=chunk, batch_size=batch_size, mesh=mesh, model_kwargs=step_kwargs
    )
    generator = generate_lib.Generator(
        model.model, mesh=mesh, model_kwargs=step_kwargs, prefill_chunk=scorer.chunk
    )
    info = results_lib.Model(str(path), model.step, tuple(f"model.{a}" for a in model_overrides))
    return cls(
        model,
        scorer,
        generator,
        info,
        training_data=_training_data(path),
        training_files=_training_files(path),
        **kwargs,
    )

  @property
  def batch_size(self) -> int:
    return self.scorer.batch_size

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    if self.model.tokenizer is None:
      raise EvalError(
          f"{self.info.path} has no tokenizer (a run on token ids): this task reads text"
      )
    return self.model.tokenizer

  def training_file(self, field: str, setting: str) -> tuple[pathlib.Path, str | None]:
    """The absolute path of the training run's data file `field` ("path", "tokenizer_path") and
    the sha256 it had then (None for runs trained before it was recorded).

    Raises EvalError, telling to set `setting` (the task's file setting) instead, when the model
    has no training run here (an export) or the run names the file relative to the directory it
    was trained in, which is not recorded (runs trained before paths were made absolute): reading
    whatever file has that name here could score another file.
    """
    recorded = (self.training_files or {}).get(field) or {}
    path = recorded.get("path") or (self.training_data or {}).get(field)
    if not isinstance(path, str) or not path:
      raise EvalError(f"{self.info.path} has no training data.{field} to read: set {setting}=FILE")
    if not os.path.isabs(path):
      raise EvalError(
          f"{self.info.path} names its training data.{field} {path!r} relative to the directory"
          f" it was trained in, which it does not record: set {setting}=FILE"
      )
    return pathlib.Path(path), recorded.get("sha256")

  def count(self, requested: int) -> int:
    """The examples to run of `requested`, at most --limit."""
    return requested if self.limit is None else min(requested, self.limit)

  def bar(self, total: int, description: str) -> tqdm.tqdm:
    return tqdm.tqdm(
        total=total, desc=description, unit="ex", disable=not self.progress, file=sys.stderr
    )

  def check_length(self, length: int) -> None:
    """EvalError, before any work, when rows of `length` tokens would not fit in memory."""
    try:
      self.scorer.check_memory(length, self.model.params)
    except ValueError as e:
      raise EvalError(str(e)) from None

  def token_losses(self, rows: Sequence[np.ndarray]) -> list[np.ndarray]:
    return self.scorer.token_losses(self.model.params, rows)

  def next_log_probs(self, rows: Sequence[np.ndarray]) -> list[np.ndarray]:
    return self.scorer.next_log_probs(self.model.params, rows)

  def continuation_scores(
      self, context: Sequence[int] | np.ndarray, continuations: score_lib.Rows
  ) -> list[tuple[float, bool]]:
    """Per continuation of `context` (token ids), (its summed log-probability, whether greedy);
    the context is read once (`Scorer.continuation_scores`)."""
    return self.scorer.continuation_scores(self.model.params, context, continuations)

  def generate_text(
      self, prompts: Sequence[str], max_new_tokens: int, length: int, bar: tqdm.tqdm | None = None
  ) -> list[str]:
    """Greedy continuations of `prompts` (each at most length - max_new_tokens tokens), in
    batches of batch_size padded to one width so that a length compiles once."""
    ids = [self.tokenizer.encode(p).tolist() for p in prompts]
    width = length - max_new_tokens
    too_long = [i for i, row in enumerate(ids) if len(row) > width]
    if too_long:
      raise EvalError(
          f"prompts {too_long} have more than {width} tokens: they do not leave"
          f" {max_new_tokens} new tokens in {length}"
      )
    texts = []
    for start in range(0, len(ids), self.batch_size):
      batch = ids[start : start + self.batch_size]
      padded = batch + [batch[0]] * (self.batch_size - len(batch))  # One batch shape.
      new = self.generator(
          self.model.params, padded, max_new_tokens, max_len=length, width=width, seed=self.seed
      )
      texts += [self.tokenizer.decode(row) for row in new[: len(batch)]]
      if bar is not None:
        bar.update(len(batch))
    return texts


def _training_data(path: str) -> dict[str, Any] | None:
  """The "data" config a training workdir's config.json keeps, else None."""
  return _workdir_section(pathlib.Path(path) / checkpoints.CONFIG_FILE, "data")


def _training_files(path: str) -> dict[str, dict[str, Any]] | None:
  """The "files" a training workdir records (checkpoints.DATA_FILE), else None."""
  files = _workdir_section(pathlib.Path(path) / checkpoints.DATA_FILE, "files")
  return {k: v for k, v in files.items() if isinstance(v, dict)} if files else None


def _workdir_section(path: pathlib.Path, key: str) -> dict[str, Any] | None:
  """The object `key` of the JSON file `path`, else None."""
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  section = saved.get(key) if isinstance(saved, dict) else None
  return section if isinstance(section, dict) else None
