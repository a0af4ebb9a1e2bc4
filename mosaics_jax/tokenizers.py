"""Tokenizers of text sources: characters, UTF-8 bytes, or a Hugging Face `tokenizers` JSON file.

Each maps a string to a 1-D int32 array of ids and back. A training run keeps its tokenizer in its
workdir (`save`), so that a trained model reads and writes text without the training data (`load`,
`mosaics_jax.load(path).generate_text`). The files are written at the run's first start and read
back when it resumes: a run's ids mean the same characters at every step. They are Hugging Face's
`tokenizer.json` and `tokenizer_config.json`, which `tokenizers.Tokenizer.from_file` and
`transformers.AutoTokenizer.from_pretrained(directory)` read with the same ids as ours (`hf_json`);
the config names our kind. Runs of before keep a wrapper `{"kind": ..., ...}` in `tokenizer.json`,
which `load` reads too.

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
CONFIG_FILE = "tokenizer_config.json"
FILES = (TOKENIZER_FILE, CONFIG_FILE)  # What `save` writes.
# The field of tokenizer_config.json naming our kind of tokenizer (transformers ignores it).
KIND_FIELD = "mosaics_tokenizer"
# The unknown token of a char tokenizer's WordLevel file: no character, so never in its vocabulary.
_NOT_A_CHARACTER = "<unk>"


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


def hf_json(tokenizer: Tokenizer) -> dict[str, Any]:
  """The Hugging Face `tokenizer.json` of `tokenizer`, as a dict, giving the same ids.

  A char tokenizer is a WordLevel model of its characters behind a pre-tokenizer that isolates
  every character (spaces and newlines too) and a decoder that joins them; its unknown token is not
  in the vocabulary, so an unknown character is an error there too. A byte tokenizer is a BPE
  without merges over GPT-2's byte-to-unicode alphabet, byte b being id b, with ByteLevel
  pre-tokenizer (no prefix space, no regex split) and decoder. An hf tokenizer is its own file.
  Written by hand: char and byte runs do not need the tokenizers package.
  """
  if isinstance(tokenizer, HFTokenizer):
    return json.loads(tokenizer.tokenizer.to_str())
  if isinstance(tokenizer, CharTokenizer):
    vocab = {c: i for i, c in enumerate(tokenizer.chars)}
    model = {"type": "WordLevel", "vocab": vocab, "unk_token": _NOT_A_CHARACTER}
    pre_tokenizer = {
        "type": "Split",
        "pattern": {"Regex": r"[\s\S]"},
        "behavior": "Isolated",
        "invert": False,
    }
    decoder = {"type": "Fuse"}
  else:
    kind(tokenizer)  # Raises TypeError for a tokenizer of no kind here.
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": {c: b for b, c in enumerate(_byte_alphabet())},
        "merges": [],
    }
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    pre_tokenizer = {"type": "ByteLevel", **byte_level}
    decoder = {"type": "ByteLevel", **byte_level}
  return {
      "version": "1.0",
      "truncation": None,
      "padding": None,
      "added_tokens": [],
      "normalizer": None,
      "pre_tokenizer": pre_tokenizer,
      "post_processor": None,
      "decoder": decoder,
      "model": model,
  }


def _byte_alphabet() -> list[str]:
  """GPT-2's `bytes_to_unicode`: the character of each byte 0..255. Printable Latin-1 bytes are
  their own character, the others take 256, 257, ... in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  others = iter(range(256, 512))
  return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def hf_config(tokenizer: Tokenizer) -> dict[str, Any]:
  """The Hugging Face `tokenizer_config.json` of `tokenizer`: transformers' fast tokenizer of
  `tokenizer.json`, with no clean-up of spaces in decoding (it would change the text), our kind
  (KIND_FIELD) and, for an hf tokenizer, its unknown token if that is one of its special tokens."""
  config: dict[str, Any] = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "clean_up_tokenization_spaces": False,
      KIND_FIELD: kind(tokenizer),
  }
  if isinstance(tokenizer, HFTokenizer):
    saved = hf_json(tokenizer)
    unknown = saved["model"].get("unk_token")
    if any(t["content"] == unknown and t["special"] for t in saved["added_tokens"]):
      config["unk_token"] = unknown
  return config


def save(tokenizer: Tokenizer, directory: str | os.PathLike) -> pathlib.Path:
  """Writes Hugging Face's `tokenizer.json` and `tokenizer_config.json` in `directory` (each
  atomically, the config first), which `load` and `transformers.AutoTokenizer` read back with the
  same ids; returns the path of `tokenizer.json`."""
  directory = pathlib.Path(directory)
  for name, saved in ((CONFIG_FILE, hf_config(tokenizer)), (TOKENIZER_FILE, hf_json(tokenizer))):
    path = directory / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved) + "\n")
    tmp.replace(path)
  return directory / TOKENIZER_FILE


def load(directory: str | os.PathLike) -> Tokenizer | None:
  """The tokenizer saved in `directory`, or None when it has none (a run on token ids).

  It reads Hugging Face's files: a char or byte tokenizer where `tokenizer_config.json` names that
  kind and `tokenizer.json` is what `save` writes for it, else an hf tokenizer of `tokenizer.json`
  (a directory of transformers' own). It also reads the wrapper that runs wrote before
  (`{"kind": ..., ...}`).

  Raises ValueError naming the file when it is not a tokenizer (not JSON, an unknown kind,
  characters that are not sorted and distinct, a tokenizer that the Hugging Face library refuses)
  or cannot be read.
  """
  directory = pathlib.Path(directory)
  path = directory / TOKENIZER_FILE
  if not path.is_file():
    return None
  try:
    text = path.read_text(encoding="utf-8")
    saved = json.loads(text)
    if not isinstance(saved, dict):
      raise ValueError(f"it holds a {type(saved).__name__}, not a JSON object")
    if "kind" in saved or "model" not in saved:
      return _from_wrapper(saved)
    return _from_hf_files(saved, text, directory / CONFIG_FILE)
  # JSONDecodeError and UnicodeDecodeError are ValueErrors; RecursionError: JSON nested too deep.
  except (ValueError, TypeError, RecursionError) as e:
    raise ValueError(f"{path} is not a tokenizer: {e}") from None
  except KeyError as e:
    raise ValueError(f"{path} is not a tokenizer: it has no {e} field") from None
  except OSError as e:
    raise ValueError(f"{path} cannot be read: {e.strerror or e}") from None


def _from_wrapper(saved: dict[str, Any]) -> Tokenizer:
  """The tokenizer of the wrapper `{"kind": ..., ...}` that runs wrote before Hugging Face's
  files."""
  saved_kind = saved["kind"]
  if saved_kind == "char":
    chars = saved["chars"]
    if not isinstance(chars, str) or not chars:
      raise ValueError(f"its characters {chars!r:.80} are not a non-empty string")
    if not _sorted_and_distinct(chars):
      raise ValueError(f"its characters {chars!r:.80} are not sorted and distinct")
    return CharTokenizer(chars)
  if saved_kind == "byte":
    return ByteTokenizer()
  if saved_kind == "hf":
    return HFTokenizer.from_json(json.dumps(saved["tokenizer"]))
  raise ValueError(f"unknown kind {saved_kind!r}")


def _from_hf_files(saved: dict[str, Any], text: str, config_path: pathlib.Path) -> Tokenizer:
  """The tokenizer of Hugging Face files: ours where they are exactly what `save` writes for the
  kind that the config names, else the file itself (whose ids are then the library's)."""
  try:
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
  except ValueError as e:
    raise ValueError(f"its {config_path.name} is not JSON: {e}") from None
  saved_kind = config.get(KIND_FIELD) if isinstance(config, dict) else None
  if saved_kind == "byte" and saved == hf_json(ByteTokenizer()):
    return ByteTokenizer()
  vocab = saved["model"].get("vocab") if isinstance(saved["model"], dict) else None
  if saved_kind == "char" and isinstance(vocab, dict) and all(len(c) == 1 for c in vocab):
    chars = "".join(sorted(vocab, key=vocab.get))
    if _sorted_and_distinct(chars) and saved == hf_json(CharTokenizer(chars)):
      return CharTokenizer(chars)
  return HFTokenizer.from_json(text)


def _sorted_and_distinct(chars: str) -> bool:
  """Whether `chars` are in code-point order, each once: `CharTokenizer.encode` looks ids up by
  binary search, so other characters would map to wrong ids. (A lone surrogate, which no text
  holds, fails to encode here: a ValueError.)"""
  return bool((np.diff(_code_points(chars).astype(np.int64)) > 0).all())
