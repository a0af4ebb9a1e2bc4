"""Recall at any length: `synthetic` (the induction and MQAR tasks a run was trained on) and `copy`
(a passage of text read twice).

`synthetic` draws fresh sequences of `mosaics_jax.synthetic`'s tasks at each length: at the
training length it is the run's own validation task, beyond it a test of length extrapolation
(the recalled pairs lie further back than any seen in training). Per length: `accuracy`, the share
of answers whose greedy next token is right, and `loss`, the mean loss on the answers.

`copy` reads windows of a text file, each a passage of length // 2 tokens followed by the same
passage again: the copy is predictable only by looking back length // 2 tokens, so it measures
retrieval from long context on natural text (the "repeated tokens" test of induction heads).
Per length: `loss_first` (the passage read the first time), `loss_copy` and `accuracy_copy`
(greedy next token) on the copy, whose first token is excluded (nothing announces the repeat), and
`retrieval_gain` = loss_first - loss_copy: what reading the passage before is worth, in nats per
token (accuracy also counts what the language model predicts without looking back).

Axis legend: r = rows, t = targets, v = vocabulary.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
from jaxtyping import Bool, Float, Int

from mosaics_jax import config as config_lib, synthetic
from mosaics_jax.eval import harness as harness_lib, results as results_lib

SYNTHETIC = "synthetic"
COPY = "copy"


def _check_lengths(task: str, lengths: tuple[int, ...] | None, least: int) -> None:
  if lengths is not None and (not lengths or min(lengths) < least):
    raise config_lib.ConfigError(f"{task}.lengths must be lengths >= {least}, got {lengths}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticSettings:
  """Which sequences; a None setting is the training run's (its workdir's data config)."""

  lengths: tuple[int, ...] | None = None  # Default: the training length.
  num_examples: int = 64  # Sequences per length.
  source: synthetic.Kind | None = None
  task_vocab: int | None = None
  task_pairs: int | None = None

  def __post_init__(self):
    config_lib.check_types(self)
    _check_lengths(SYNTHETIC, self.lengths, 4)
    for name in ("num_examples", "task_vocab", "task_pairs"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise config_lib.ConfigError(f"synthetic.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CopySettings:
  """Which passages: windows of `path` from `start_fraction` on (default: the run's own text file
  and its validation tail)."""

  lengths: tuple[int, ...] | None = None  # Default: the training length.
  num_examples: int = 32  # Passages per length.
  path: str | None = None
  start_fraction: float = 0.9

  def __post_init__(self):
    config_lib.check_types(self)
    _check_lengths(COPY, self.lengths, 4)
    if self.num_examples < 1:
      raise config_lib.ConfigError(f"copy.num_examples must be >= 1, got {self.num_examples}")
    if not 0.0 <= self.start_fraction < 1.0:
      raise config_lib.ConfigError(
          f"copy.start_fraction must be in [0, 1), got {self.start_fraction}"
      )


def _trained(harness: harness_lib.Harness, key: str, task: str):
  value = (harness.training_data or {}).get(key)
  if value is None:
    raise harness_lib.EvalError(
        f"{task}.{key} is not set and {harness.info.path} does not record its training data's:"
        f" set {task}.{key}=..."
    )
  return value


def _greedy_and_losses(
    harness: harness_lib.Harness, rows: list[Int[np.ndarray, " n"]], description: str
) -> tuple[Bool[np.ndarray, "r t"], Float[np.ndarray, "r t"]]:
  """Whether each target (row[1:]) is the greedy next token, and its loss."""
  right, losses = [], []
  bar = harness.bar(len(rows), description)
  for start in range(0, len(rows), harness.batch_size):
    batch = rows[start : start + harness.batch_size]
    for row, log_probs in zip(batch, harness.next_log_probs(batch)):
      log_probs = log_probs[: len(row) - 1]  # [t, v]: position i scores token i + 1.
      targets = row[1:]
      right.append(log_probs.argmax(-1) == targets)
      losses.append(-np.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0])
    bar.update(len(batch))
  bar.close()
  return np.stack(right), np.stack(losses).astype(np.float64)


def run_synthetic(
    harness: harness_lib.Harness, settings: SyntheticSettings
) -> list[results_lib.Result]:
  """accuracy and loss on the answers of fresh sequences at each length."""
  settings = dataclasses.replace(
      settings,
      lengths=settings.lengths or (_trained(harness, "seq_len", SYNTHETIC),),
      source=settings.source or _trained(harness, "source", SYNTHETIC),
      task_vocab=settings.task_vocab or _trained(harness, "task_vocab", SYNTHETIC),
      task_pairs=settings.task_pairs or _trained(harness, "task_pairs", SYNTHETIC),
  )  # Recorded as used.
  if settings.source not in synthetic.KINDS:
    raise harness_lib.EvalError(
        f"synthetic: {harness.info.path} was trained on {settings.source!r}, not a synthetic"
        f" task; set synthetic.source to one of {', '.join(synthetic.KINDS)}"
    )
  vocab = harness.model.config.vocab_size
  needed = settings.task_vocab + (settings.source == "synthetic_mqar")  # MQAR pads with task_vocab.
  if needed > vocab:
    raise harness_lib.EvalError(
        f"synthetic: task_vocab {settings.task_vocab} needs {needed} token ids, the model has"
        f" {vocab}"
    )
  fields = dataclasses.asdict(settings)
  count = harness.count(settings.num_examples)
  out = []
  for length in settings.lengths:
    harness.check_length(length + 1)
    try:
      drawn = [
          synthetic.draw(
              np.random.default_rng([harness.seed, length, i]),
              settings.source,
              seq_len=length,
              task_vocab=settings.task_vocab,
              task_pairs=settings.task_pairs,
          )
          for i in range(count)
      ]
    except ValueError as e:  # Settings that the task cannot draw at this length.
      raise harness_lib.EvalError(f"synthetic at length {length}: {e}") from None
    right, losses = _greedy_and_losses(
        harness, [sequence.astype(np.int32) for sequence, _ in drawn], f"{SYNTHETIC} {length}"
    )
    answers = np.stack([a for _, a in drawn])
    out += [
        results_lib.Result(
            SYNTHETIC, "accuracy", float(right[answers].mean()), count, {"length": length}, fields
        ),
        results_lib.Result(
            SYNTHETIC, "loss", float(losses[answers].mean()), count, {"length": length}, fields
        ),
    ]
  return out


def run_copy(harness: harness_lib.Harness, settings: CopySettings) -> list[results_lib.Result]:
  """loss on the passage, and loss and greedy accuracy on its copy, at each length."""
  path = settings.path or _trained(harness, "path", COPY)
  settings = dataclasses.replace(
      settings,
      path=path,
      lengths=settings.lengths or (_trained(harness, "seq_len", COPY),),
  )
  file = pathlib.Path(path)
  if not file.is_file():
    raise harness_lib.EvalError(f"copy.path: {file} does not exist")
  try:
    ids = harness.tokenizer.encode(file.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise harness_lib.EvalError(
        f"copy.path: {file} is not text of this model's tokenizer: {e}"
    ) from None
  ids = np.asarray(ids[int(settings.start_fraction * len(ids)) :], np.int32)
  fields = dataclasses.asdict(settings)
  count = harness.count(settings.num_examples)
  out = []
  for length in settings.lengths:
    half = length // 2
    if len(ids) < count * half:
      raise harness_lib.EvalError(
          f"copy: {file} has {len(ids)} tokens from start_fraction {settings.start_fraction}"
          f" on, fewer than {count} passages of {half}"
      )
    harness.check_length(2 * half)
    rows = [np.tile(ids[i * half : (i + 1) * half], 2) for i in range(count)]
    right, losses = _greedy_and_losses(harness, rows, f"{COPY} {length}")
    # Target j is token j + 1: the passage's targets are 0 .. half - 2, the copy's half .. end
    # (target half - 1, the copy's first token, is unpredictable).
    first, copy = slice(0, half - 1), slice(half, 2 * half - 1)
    row = {"length": 2 * half}
    loss_first, loss_copy = float(losses[:, first].mean()), float(losses[:, copy].mean())
    out += [
        results_lib.Result(COPY, "loss_first", loss_first, count, row, fields),
        results_lib.Result(COPY, "loss_copy", loss_copy, count, row, fields),
        results_lib.Result(COPY, "accuracy_copy", float(right[:, copy].mean()), count, row, fields),
        results_lib.Result(COPY, "retrieval_gain", loss_first - loss_copy, count, row, fields),
    ]
  return out
