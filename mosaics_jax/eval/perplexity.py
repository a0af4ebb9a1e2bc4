"""`perplexity`: the loss of a model on a text or token file, overall and by position.

The file (or the part of it from `start_fraction` on) is cut into consecutive windows of `length`
tokens, each read from a fresh context; every token of a window but the first is predicted. Over
all predicted tokens: the mean loss in nats, the perplexity exp(loss), bits per token and, for a
text file, bits per byte and per character of the predicted text (total bits over its UTF-8 bytes
or characters). The loss in `num_buckets` equal buckets of position shows whether a model keeps
improving past its training context (the extrapolation claim, at the level of the loss).

With no `path`, a text model scores its training run's own text file: the absolute path that the
workdir records, from any directory, refused when its content is no longer the one the run
recorded (its sha256) or when an older run names it only relative to where it trained. Every
result's settings record the absolute path and the sha256 of the bytes read.

Axis legend: w = windows, t = window length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pathlib
from typing import Literal

import numpy as np
from jaxtyping import Int

from mosaics_jax import config as config_lib
from mosaics_jax.eval import harness as harness_lib, results as results_lib

NAME = "perplexity"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """What to score and how."""

  path: str | None = None  # The text or token file; default: the run's text (module docstring).
  kind: Literal["text", "tokens"] = "text"  # tokens: a flat binary file of ids (nanoGPT's .bin).
  token_dtype: Literal["uint16", "uint32"] = "uint16"
  length: int = 1024  # Tokens per window: may exceed the training context.
  start_fraction: float = 0.0  # Skip the file's head: 0.9 scores a run's validation tail.
  num_examples: int | None = None  # Windows to score (default: all that fit).
  num_buckets: int = 8  # Buckets of position for the loss by position.

  def __post_init__(self):
    config_lib.check_types(self)
    if self.length < 2:
      raise config_lib.ConfigError(f"perplexity.length must be >= 2, got {self.length}")
    if not 0.0 <= self.start_fraction < 1.0:
      raise config_lib.ConfigError(
          f"perplexity.start_fraction must be in [0, 1), got {self.start_fraction}"
      )
    if not 1 <= self.num_buckets <= self.length - 1:
      raise config_lib.ConfigError(
          f"perplexity.num_buckets must be in [1, length - 1], got {self.num_buckets}"
      )


@dataclasses.dataclass(frozen=True)
class Windows:
  """What a perplexity scores, and the file it comes from."""

  rows: Int[np.ndarray, "w t"]
  is_text: bool
  path: pathlib.Path  # Absolute.
  sha256: str  # Of the bytes read.


def windows(harness: harness_lib.Harness, settings: Settings) -> Windows:
  """The windows of the file (module docstring)."""
  expected = None  # The sha256 that the run's own file must have.
  if settings.path is not None:
    path = pathlib.Path(settings.path).absolute()
  elif settings.kind == "text" and (harness.training_data or {}).get("source") == "text":
    path, expected = harness.training_file("path", setting="perplexity.path")
  else:
    raise harness_lib.EvalError("perplexity reads a file: set perplexity.path=FILE")
  if not path.is_file():
    raise harness_lib.EvalError(f"perplexity.path: {path} does not exist")
  try:
    content = path.read_bytes()
  except OSError as e:
    raise harness_lib.EvalError(f"perplexity.path: cannot read {path}: {e.strerror or e}") from None
  digest = hashlib.sha256(content).hexdigest()
  if expected is not None and digest != expected:
    raise harness_lib.EvalError(
        f"{path}, the text {harness.info.path} was trained on, has changed since (sha256"
        f" {expected} then, {digest} now): to score it as it is now, set perplexity.path={path}"
    )
  if settings.kind == "text":
    try:
      text = content.decode("utf-8")
    except UnicodeDecodeError as e:
      raise harness_lib.EvalError(
          f"{path} is not UTF-8 text ({e}); for ids set kind=tokens"
      ) from None
    try:
      ids = harness.tokenizer.encode(text)
    except ValueError as e:
      raise harness_lib.EvalError(f"{path} does not fit the model's tokenizer: {e}") from None
  else:
    dtype = np.dtype(settings.token_dtype)
    if len(content) % dtype.itemsize:
      raise harness_lib.EvalError(
          f"{path} has {len(content)} bytes, not a whole number of {settings.token_dtype} ids"
      )
    ids = np.frombuffer(content, dtype)
    vocab = harness.model.config.vocab_size
    if ids.size and int(ids.max()) >= vocab:
      raise harness_lib.EvalError(
          f"{path} holds token id {int(ids.max())}, outside the model's vocabulary of {vocab}"
          f" (is token_dtype={settings.token_dtype} right?)"
      )
  ids = ids[int(settings.start_fraction * ids.size) :]
  count = ids.size // settings.length
  if settings.num_examples is not None:
    count = min(count, settings.num_examples)
  count = harness.count(count)
  if count < 1:
    raise harness_lib.EvalError(
        f"{path} has {ids.size} tokens from start_fraction {settings.start_fraction} on: fewer"
        f" than one window of {settings.length}"
    )
  rows = ids[: count * settings.length].reshape(count, settings.length).astype(np.int32)
  return Windows(rows, settings.kind == "text", path, digest)


def run(harness: harness_lib.Harness, settings: Settings) -> list[results_lib.Result]:
  """Scores the windows of the file (module docstring)."""
  harness.check_length(settings.length)
  scored = windows(harness, settings)
  rows = scored.rows
  bar = harness.bar(len(rows), NAME)
  losses = []
  for start in range(0, len(rows), harness.batch_size):
    batch = rows[start : start + harness.batch_size]
    losses += harness.token_losses(list(batch))
    bar.update(len(batch))
  bar.close()
  losses = np.stack(losses).astype(np.float64)  # [w, t - 1]: position i predicts token i + 1.
  # The file read, whether named or the run's own: a record says which bytes it scored.
  fields = {**dataclasses.asdict(settings), "path": str(scored.path), "sha256": scored.sha256}
  n = len(rows)

  def result(metric: str, value: float, **row) -> results_lib.Result:
    return results_lib.Result(NAME, metric, float(value), n, row, fields)

  mean = losses.mean()
  out = [
      result("loss", mean),
      result("perplexity", math.exp(mean)),
      result("bits_per_token", mean / math.log(2)),
  ]
  if scored.is_text:
    predicted = [harness.tokenizer.decode(row[1:]) for row in rows]
    bits = losses.sum() / math.log(2)
    out.append(result("bits_per_byte", bits / sum(len(t.encode("utf-8")) for t in predicted)))
    out.append(result("bits_per_char", bits / sum(len(t) for t in predicted)))
  edges = np.linspace(0, settings.length - 1, settings.num_buckets + 1).round().astype(int)
  for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
    # Positions lo + 1 .. hi of the window are predicted from lo .. hi - 1 tokens of context.
    out.append(
        result("loss_at_position", losses[:, lo:hi].mean(), position_start=lo + 1, position_end=hi)
    )
  return out
