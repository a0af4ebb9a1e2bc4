"""Training metrics of a run: a JSON-lines file and TensorBoard event files.

A run directory DIR holds

* `DIR/metrics.jsonl`: one JSON object per line, the durable record. Each object has `step`,
  `time` (Unix seconds) and the scalars given to the writer; evaluation records also have
  `split` ("val", ...), which training records leave out. Non-finite values are written as
  `null`, so every line is strict JSON.
* `DIR/tensorboard/`: the same scalars as TensorBoard events, tagged `SPLIT/NAME`
  (`train/loss`, `val/accuracy`), when `tensorboardX` is installed.

    with MetricsWriter(run_dir, resume_step=restored_step) as writer:
      writer.write(step, {"loss": loss, "lr": lr, "grad_norm": g, "tokens_per_sec": tps})
      writer.write(step, {"split": "val", "loss": val_loss, "accuracy": val_accuracy})

    records = read_metrics(run_dir)
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import pathlib
import tempfile
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# TensorBoard is a live view and the jsonl file the durable record, so events may lag this much.
_TENSORBOARD_FLUSH_SECS = 30

Scalar = int | float | bool | str | None


@dataclasses.dataclass(frozen=True)
class Utilisation:
  """What a run's model-FLOPs utilisation (MFU) is measured against; `analysis.utilisation`
  makes it (train never counts FLOPs: analysis does, and imports train)."""

  # Model FLOPs of one trained token: 3 x the forward's, `analysis.flops` at the run's seq_len.
  train_flops_per_token: float
  peak_flops_per_second: float  # One device's: its table peak, or a matmul measured here.
  peak_source: str  # Where the peak comes from, in words.
  device_kind: str  # `jax.devices()[0].device_kind`.

  def mfu(self, tokens_per_second_per_device: float) -> float:
    """Model FLOPs/s of one device over its peak FLOP/s."""
    return tokens_per_second_per_device * self.train_flops_per_token / self.peak_flops_per_second


def _scalar(name: str, value: Any) -> Scalar:
  """`value` as a Python scalar: numpy and JAX scalars become int, float or bool."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  array = np.asarray(value)  # Also fetches a JAX scalar from its device.
  if array.ndim:
    raise ValueError(f"metric {name!r} is not a scalar: shape {array.shape}")
  if array.dtype.kind in "iu":
    return int(array)
  if array.dtype.kind == "b":
    return bool(array)
  # float() also covers the float dtypes numpy does not know natively, like bfloat16.
  return float(array)


def _json_value(value: Scalar) -> Scalar:
  """`value` as strict JSON allows it: NaN and infinities become null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _read_lines(path: pathlib.Path) -> tuple[list[str], bool]:
  """The complete lines of `path`, and whether a torn line follows them."""
  text = path.read_text(encoding="utf-8")
  # A record is committed by its newline: whatever follows the last one is a line torn by a
  # crash in the middle of a write.
  end = text.rfind("\n") + 1
  # Not splitlines(): it also breaks at U+2028, which a JSON string may hold unescaped.
  return text[:end].split("\n")[:-1], end < len(text)


def _parse(
    path: pathlib.Path, lines: list[str], *, strict: bool = True
) -> list[tuple[str, dict[str, Any]]]:
  """The non-blank `lines` of `path`, each with its record; a line that is not a record is an
  error, or with `strict=False` dropped with a warning."""
  parsed = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError("a record must be a JSON object with an integer step")
    except ValueError as e:  # json.JSONDecodeError included.
      if strict:
        raise ValueError(f"{path}:{number}: not a record: {e}") from None
      warnings.warn(f"{path}:{number}: dropped a line that is not a record ({e})", stacklevel=3)
      continue
    parsed.append((line, record))
  return parsed


def read_metrics(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of `directory/metrics.jsonl` in file order, without a torn last line.

  Raises:
    FileNotFoundError: the directory has no metrics.jsonl.
    ValueError: a complete line is not a JSON object with an integer `step`.
  """
  path = pathlib.Path(directory) / METRICS_FILE
  lines, _ = _read_lines(path)
  return [record for _, record in _parse(path, lines)]


def _rewrite(path: pathlib.Path, last_step: int | None) -> int:
  """Keeps the complete records of `path` up to `last_step` (all if None); returns the drops."""
  if not path.exists():
    return 0
  lines, torn = _read_lines(path)
  # A line that is not a record must not make a run impossible to resume: it is dropped.
  parsed = _parse(path, lines, strict=False)
  kept = [line for line, record in parsed if last_step is None or record["step"] <= last_step]
  dropped = len([line for line in lines if line.strip()]) - len(kept) + torn
  if dropped:
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as f:
      f.writelines(line + "\n" for line in kept)
      f.flush()
      # The rename below must not publish a file whose contents are still only in memory.
      os.fsync(f.fileno())
    # A temporary file is private to its owner; the metrics file keeps the mode it had.
    os.chmod(f.name, path.stat().st_mode)
    os.replace(f.name, path)
  return dropped


def truncate_after(directory: str | os.PathLike[str], step: int) -> int:
  """Drops the records with a step above `step`, and a torn last line, from metrics.jsonl.

  A run resumed from the checkpoint of `step` writes the later steps again; without this they
  would appear twice. The file is replaced atomically, so a crash here loses nothing. A missing
  file is left missing.

  Returns:
    The number of lines dropped, the torn line included.
  """
  return _rewrite(pathlib.Path(directory) / METRICS_FILE, step)


class MetricsWriter:
  """Appends records to `directory/metrics.jsonl` and to TensorBoard events under it.

  Create it on process 0 of a run only. Every record is flushed to the operating system before
  `write` returns, so killing the process loses at most the record being written. Without
  `tensorboardX` installed it warns once and writes the jsonl file only.
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      resume_step: int | None = None,
      tensorboard: bool = True,
  ):
    """Opens the run directory, creating it if needed.

    Args:
      directory: the run directory.
      resume_step: the step of the checkpoint the run resumes from. The records after it, left
        by the interrupted run, are dropped, and so are its TensorBoard events after it.
      tensorboard: whether to write TensorBoard events too.
    """
    self.directory = pathlib.Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    # Appending after a torn line would glue the next record onto it, so the tail is always
    # repaired; without resume_step every complete record is kept.
    _rewrite(self.directory / METRICS_FILE, resume_step)
    self._file = open(self.directory / METRICS_FILE, "a", encoding="utf-8")
    self._tensorboard = None
    if tensorboard:
      try:
        import tensorboardX  # An optional dependency.
      except ImportError:
        warnings.warn(
            "tensorboardX is not installed: metrics go to metrics.jsonl only"
            " (pip install tensorboardX for TensorBoard events)",
            stacklevel=2,
        )
      else:
        self._tensorboard = tensorboardX.SummaryWriter(
            str(self.directory / TENSORBOARD_DIR),
            # TensorBoard hides the interrupted run's events from this step on.
            purge_step=None if resume_step is None else resume_step + 1,
            flush_secs=_TENSORBOARD_FLUSH_SECS,
        )

  def write(self, step: int | np.integer, record: Mapping[str, Any]) -> None:
    """Appends one record of scalars measured at `step`.

    Training records carry `loss`, `lr`, `grad_norm`, `tokens_per_sec`,
    `tokens_per_sec_per_device` and, when the run knows its `Utilisation`, `mfu`; the first three
    of the record's step alone (its `loss` is the mean over the masked targets of its global batch,
    `train.step`); evaluation records carry `"split": "val"`, `loss` and `accuracy` when
    measured. `record` may repeat the step, and its `split` names the TensorBoard tags' prefix,
    "train" when absent. Values may be Python, numpy or JAX scalars; strings go to the jsonl
    file only.

    Raises:
      ValueError: the writer is closed, `record` sets `time` or another step, or a value is
        not a scalar.
    """
    if self._file.closed:
      raise ValueError("MetricsWriter is closed")
    step = operator.index(step)
    values = dict(record)
    if operator.index(values.pop("step", step)) != step:
      raise ValueError(f"record step {record['step']} differs from step {step}")
    split = values.pop("split", None)
    if split is not None and not isinstance(split, str):
      raise ValueError(f"record split {split!r} is not a string")
    if "time" in values:
      raise ValueError("the writer sets the record's time itself")
    values = {name: _scalar(name, value) for name, value in values.items()}
    # Training records leave the split out: readers take a record without one as training.
    line: dict[str, Any] = {"step": step} if split is None else {"step": step, "split": split}
    line["time"] = round(time.time(), 3)
    line.update((name, _json_value(value)) for name, value in values.items())
    self._file.write(json.dumps(line, allow_nan=False) + "\n")
    # The operating system keeps flushed bytes if the process dies; fsync would only add
    # protection against power loss, at a disk round trip per record.
    self._file.flush()
    if self._tensorboard is not None:
      for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tensorboard.add_scalar(f"{split or 'train'}/{name}", float(value), global_step=step)

  def close(self) -> None:
    """Flushes and closes both outputs; closing twice is harmless."""
    self._file.close()
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
