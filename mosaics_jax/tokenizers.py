"""Tokenizers of text sources: characters, UTF-8 bytes, or a Hugging Face `tokenizers` JSON file.

Each maps a string to a 1-D int32 array of ids and back. A training run keeps its tokenizer in its
workdir (`save`, `tokenizer.json`), so that a trained model reads and writes text without the
training data (`load`, `mosaics_jax.load(path).generate_text`). The file is written at the run's
first start and read back when it resumes: a run's ids mean the same characters at every step.

Axis legend: t = time (tokens).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from jaxtyping import Int, UInt

Ids = Int[np.ndarray, " t"]
TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipelines and samplers need of a tokenizer."""

  @property
  def vocab_size(self) -> int:
    ...

  def encode(self, text: str) -> Ids:
    ...

  def decode(self, ids: Sequence[int] | Ids) -> str:
    ...


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
  """Id i is `chars[i]`, the sorted distinct characters of a text (nanoGPT's shakespeare_char)."""

  chars: str

  @classmethod
  def from_text(cls, text: str) -> CharTokenizer:
    return cls("".join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> Ids:
    # Sorted code points let numpy look up a whole file at once.
    table = _code_points(self.chars)
    points = _code_points(text)
    ids = np.searchsorted(table, points)
    unknown = table.take(ids, mode="clip") != points
    if unknown.any():
      missing = sorted({text[i] for i in np.flatnonzero(unknown)})
      raise ValueError(f"characters outside the vocabulary of {self.vocab_size}: {missing!r}")
    return ids.astype(np.int32)

  def decode(self, ids: Sequence[int] | Ids) -> str:
    # A model's vocabulary may be larger than the text's (padded): its extra ids show as U+FFFD.
    size = len(self.chars)
    return "".join(self.chars[i] if 0 <= i < size else "\ufffd" for i in np.asarray(ids).tolist())


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """Ids are the UTF-8 bytes of the text."""

  @property
  def vocab_size(self) -> int:
    return 256

  def encode(self, text: str) -> Ids:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | Ids) -> str:
    # A window may cut a multi-byte character: show it as U+FFFD rather than fail.
    return bytes(np.asarray(ids).tolist()).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer`, special tokens included in the vocabulary."""

  tokenizer: Any

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
    """Raises ValueError naming `path` when it is not a tokenizer JSON or cannot be read."""
    try:
      return cls.from_json(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError.
      raise ValueError(f"{path}: {e}") from None

  @classmethod
  def from_json(cls, text: str) -> HFTokenizer:
    """Raises ValueError when `text` is not a tokenizer JSON."""
    hf = _hf()
    try:
      return cls(hf.Tokenizer.from_str(text))
    except Exception as e:  # noqa: BLE001 - the library raises plain Exception.
      raise ValueError(f"the tokenizers library refuses it ({e})") from None

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> Ids:
    return np.asarray(self.tokenizer.encode(text).ids, np.int32)

  def decode(self, ids: Sequence[int] | Ids) -> str:
    return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


def _code_points(text: str) -> UInt[np.ndarray, " t"]:
  return np.frombuffer(text.encode("utf-32-le"), np.uint32)


def _hf() -> Any:
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel  # Optional: only "hf" needs it.
  except ImportError as e:
    raise ImportError(
        "the 'hf' tokenizer needs the Hugging Face tokenizers package: pip install tokenizers"
    ) from e
  return tokenizers


def kind(tokenizer: Tokenizer) -> str:
  """Its name as `DataConfig.tokenizer` spells it: "char", "byte" or "hf"."""
  if isinstance(tokenizer, CharTokenizer):
    return "char"
  if isinstance(tokenizer, ByteTokenizer):
    return "byte"
  if isinstance(tokenizer, HFTokenizer):
    return "hf"
  raise TypeError(f"{tokenizer!r} is not a tokenizer of this module")


def save(tokenizer: Tokenizer, directory: str | os.PathLike) -> pathlib.Path:
  """Writes `directory/tokenizer.json`, which `load` reads back, atomically."""
  saved: dict[str, Any] = {"kind": kind(tokenizer)}
  if isinstance(tokenizer, CharTokenizer):
    saved["chars"] = tokenizer.chars
  elif isinstance(tokenizer, HFTokenizer):
    saved["tokenizer"] = json.loads(tokenizer.tokenizer.to_str())
  path = pathlib.Path(directory) / TOKENIZER_FILE
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(saved) + "\n")
  tmp.replace(path)
  return path


def load(directory: str | os.PathLike) -> Tokenizer | None:
  """The tokenizer saved in `directory`, or None when it has none (a run on token ids).

  Raises ValueError naming the file when it is not a tokenizer this module wrote (not JSON, an
  unknown kind, characters that are not sorted and distinct, an "hf" tokenizer that the Hugging
  Face library refuses) or cannot be read.
  """
  path = pathlib.Path(directory) / TOKENIZER_FILE
  if not path.is_file():
    return None
  try:
    saved = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(saved, dict):
      raise ValueError(f"it holds a {type(saved).__name__}, not a JSON object")
    saved_kind = saved["kind"]
    if saved_kind == "char":
      chars = saved["chars"]
      if not isinstance(chars, str) or not chars:
        raise ValueError(f"its characters {chars!r:.80} are not a non-empty string")
      # Encoding looks ids up by binary search: unsorted characters would map to wrong ids. (A
      # lone surrogate, which no text holds, fails to encode here: a ValueError too.)
      if (np.diff(_code_points(chars).astype(np.int64)) <= 0).any():
        raise ValueError(f"its characters {chars!r:.80} are not sorted and distinct")
      return CharTokenizer(chars)
    if saved_kind == "byte":
      return ByteTokenizer()
    if saved_kind == "hf":
      return HFTokenizer.from_json(json.dumps(saved["tokenizer"]))
    raise ValueError(f"unknown kind {saved_kind!r}")
  # JSONDecodeError and UnicodeDecodeError are ValueErrors; RecursionError: JSON nested too deep.
  except (ValueError, TypeError, RecursionError) as e:
    raise ValueError(f"{path} is not a tokenizer: {e}") from None
  except KeyError as e:
    raise ValueError(f"{path} is not a tokenizer: it has no {e} field") from None
  except OSError as e:
    raise ValueError(f"{path} cannot be read: {e.strerror or e}") from None
