"""Tokenizers of text sources: characters, UTF-8 bytes, or a Hugging Face `tokenizers` JSON file.

Each maps a string to a 1-D int32 array of ids and back. A training run keeps its tokenizer in its
workdir (`save`, `tokenizer.json`), so that a trained model reads and writes text without the
training data (`load`, `mosaics_jax.load(path).generate_text`).

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
    return cls(_hf().Tokenizer.from_file(str(path)))

  @classmethod
  def from_json(cls, text: str) -> HFTokenizer:
    return cls(_hf().Tokenizer.from_str(text))

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


def save(tokenizer: Tokenizer, directory: str | os.PathLike) -> pathlib.Path:
  """Writes `directory/tokenizer.json`, which `load` reads back, atomically."""
  if isinstance(tokenizer, CharTokenizer):
    saved = {"kind": "char", "chars": tokenizer.chars}
  elif isinstance(tokenizer, ByteTokenizer):
    saved = {"kind": "byte"}
  else:
    saved = {"kind": "hf", "tokenizer": json.loads(tokenizer.tokenizer.to_str())}
  path = pathlib.Path(directory) / TOKENIZER_FILE
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(saved) + "\n")
  tmp.replace(path)
  return path


def load(directory: str | os.PathLike) -> Tokenizer | None:
  """The tokenizer saved in `directory`, or None when it has none (a run on token ids).

  Raises ValueError naming the file when it is not a tokenizer this module wrote.
  """
  path = pathlib.Path(directory) / TOKENIZER_FILE
  if not path.is_file():
    return None
  try:
    saved = json.loads(path.read_text())
    kind = saved["kind"]
    if kind == "char":
      if not isinstance(saved["chars"], str) or not saved["chars"]:
        raise ValueError("its characters are not a non-empty string")
      return CharTokenizer(saved["chars"])
    if kind == "byte":
      return ByteTokenizer()
    if kind == "hf":
      return HFTokenizer.from_json(json.dumps(saved["tokenizer"]))
    raise ValueError(f"unknown kind {kind!r}")
  except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError included.
    raise ValueError(f"{path} is not a tokenizer: {e}") from None
