"""Grain input pipelines: synthetic recall tasks, tokenised text files and token files.

Every source yields the same batches, dicts of numpy arrays of shape [b, t] with
b = batch_size // process_count (this process's share of the global batch) and t = seq_len, or
less with `data.trim_padding` (`trim_batch`):

  tokens       int32    the inputs.
  targets      int32    the next tokens.
  segment_ids  int32    the document of each position, counted from 0 in every row.
  loss_mask    float32  1 where the target counts for the loss.
  answer_mask  float32  1 on the answers of the synthetic tasks, where accuracy is measured.

A pipeline is a Grain `MapDataset` over example indices: shuffled (anew every epoch), repeated,
mapped to examples, batched and sharded by process index. Process p of P reads rows
[p * b, (p + 1) * b) of each global batch, so one step's batches of all processes, stacked in
process order, are the global batch that a single process would read, row for row: the data do
not depend on how many hosts share them. The iterator is
Grain's `DatasetIterator`: `get_state()` is a small JSON-ready dict, and `set_state` on a fresh
iterator built with the same arguments resumes the stream exactly.

Sources (`DataConfig.source`):

  synthetic_induction, synthetic_mqar, synthetic_needles: drawn on the fly by
    `mosaics_jax.synthetic` from a generator seeded by (seed, index). Validation sequences use a
    fixed seed of their own, so every run is scored on the same ones.
  icl_bursty: bursty few-shot classification text in `icl_classification`'s prompt format, drawn
    on the fly by `mosaics_jax.icl_data` as the synthetic tasks are, from icl_pool training classes
    (none of the evaluation's), in bytes (data.tokenizer="byte"; a run keeps its tokenizer, so that
    evaluation reads text). The loss is taken on every byte but the texts' words (random draws):
    on the labels, and on the template's words and delimiters, which end a label where the
    evaluation cuts a generated one; the answer mask marks the labels.
  regbench: in-context language learning (`mosaics_jax.regbench`). As in seq_icl, the training
    set is one fixed sequence of each of the regbench_languages training languages, the validation
    set one of each held-out language; seed only orders them. A row is one sequence, cut or padded
    by `regbench_example`.
  text: a UTF-8 file, tokenised whole in memory ("char", "byte" or "hf"). A training run passes
    its own tokenizer (`tokenizer=`, the one its workdir keeps from its first start): a "char"
    vocabulary is then not rebuilt from the file as it is now, and a character outside it is a
    DataError naming it.
  tokens: a flat binary file of token ids (nanoGPT's .bin), read through a memmap.

`files` names the files a config reads (for a run's record of them), `absolute` makes their paths
independent of the current directory.

Files are split into train = the first (1 - val_fraction) of the tokens and val = the rest. An
example is a window of seq_len + 1 tokens inside one split: tokens = window[:-1] and
targets = window[1:]. Training windows start at every offset; validation windows do not overlap
(stride seq_len), so one pass scores every validation target once. With repeat=False a pass is
padded to whole global batches with rows whose masks are 0, so every process reads the same number
of batches and nothing is dropped. With `eot_id`, the end-of-text token closes its document: the
next position starts a new segment id and no loss is taken on predicting across the boundary.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Literal

import grain
import numpy as np
from jaxtyping import Bool, Int, Integer, UInt

from mosaics_jax import icl_data, regbench, synthetic, tokenizers as tokenizers_lib
from mosaics_jax.config import DataConfig

Split = Literal["train", "val"]
Example = dict[str, np.ndarray]  # The fields of the module docstring, each of shape [t].
# Those fields and their dtypes.
BATCH_DTYPES = {
    "tokens": np.int32,
    "targets": np.int32,
    "segment_ids": np.int32,
    "loss_mask": np.float32,
    "answer_mask": np.float32,
}

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
# Sequences in one epoch of a synthetic task: what a finite pass (repeat=False) reads.
SYNTHETIC_SEQUENCES = {"train": 2**20, "val": 1024}
# Seed of the synthetic validation sequences. A training run with this very seed would train on
# them; any other seed draws independent sequences.
SYNTHETIC_VAL_SEED = 2**32 - 1
# Sources of text: a run keeps their tokenizer in its workdir, so that evaluation reads and writes
# text.
TEXT_SOURCES = ("text", "icl_bursty")


class DataError(ValueError):
  """Data that cannot be read, or arguments that do not fit them; the message names the file."""


def check_state(state: Any, batches: int) -> None:
  """Raises DataError unless `state` is the state of an iterator of `make_iterator` that has
  yielded `batches` batches (a checkpoint's data state at step `batches`)."""
  if not (isinstance(state, dict) and set(state) == {"next_index"}):
    raise DataError(f"the data state {state!r} is not a Grain iterator state of this pipeline")
  if state["next_index"] != batches:
    raise DataError(
        f"the data state {state!r} is not at batch {batches}, where the run's step puts it"
    )


def vocab_size(cfg: DataConfig, tokenizer: tokenizers_lib.Tokenizer | None = None) -> int:
  """The number of token ids the data can produce; a model needs at least this vocab_size.

  `tokenizer`: a text source's tokenizer (default: the one `cfg` describes, `load_tokenizer`).
  """
  _check_config(cfg, tokenizer)
  if cfg.source in ("synthetic_induction", "synthetic_needles"):
    return cfg.task_vocab
  if cfg.source == "synthetic_mqar":
    return cfg.task_vocab + 1  # The pad id is task_vocab.
  if cfg.source == "regbench":
    return regbench.PAD + 1
  if cfg.source in TEXT_SOURCES:
    return (tokenizer or load_tokenizer(cfg)).vocab_size
  return int(_token_file(cfg).max()) + 1


def load_tokenizer(cfg: DataConfig) -> tokenizers_lib.Tokenizer:
  """The tokenizer of a text source; the "char" vocabulary is the file's distinct characters."""
  _check_config(cfg)
  if cfg.source not in TEXT_SOURCES:
    raise DataError(
        f"source {cfg.source!r} has no tokenizer; only {', '.join(TEXT_SOURCES)} sources do"
    )
  return _tokenizer(cfg, _read_text(cfg) if cfg.tokenizer == "char" else "")


def make_iterator(
    cfg: DataConfig,
    *,
    split: Split,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    tokenizer: tokenizers_lib.Tokenizer | None = None,
) -> grain.DatasetIterator:
  """This process's batches of `batch_size // process_count` examples of `split`.

  Args:
    cfg: the data to read.
    split: "train" or "val".
    batch_size: the global batch, over all processes.
    seed: orders the windows of files and the RegBench sequences, and draws the synthetic training
      sequences, in [0, 2**32).
    process_index: this process, in [0, process_count).
    process_count: the processes sharing each global batch; each reads a disjoint share.
    repeat: True: an endless stream, reshuffled every epoch (training). False: one finite,
      deterministic pass (evaluation), padded with masked rows to whole batches.
    tokenizer: a text source's tokenizer, of kind `cfg.tokenizer` (a run's own); default: the one
      `cfg` describes (`load_tokenizer`).

  Returns:
    A checkpointable Grain iterator of dicts of [b, t] numpy arrays (the module docstring).

  Raises:
    DataError: arguments that do not fit, a file that cannot be read, a text that `tokenizer`
      cannot encode (naming the characters).
  """
  _check_config(cfg, tokenizer)
  local_batch = _local_batch(batch_size, process_index, process_count)
  if split not in ("train", "val"):
    raise DataError(f"split must be 'train' or 'val', got {split!r}")
  if not 0 <= seed < 2**32:
    raise DataError(f"seed must be in [0, 2**32), got {seed}")
  if cfg.trim_padding and process_count > 1:
    raise DataError(
        f"data.trim_padding={cfg.trim_padding} cuts each process's batch to its own length, but"
        f" the {process_count} processes' batches must have one length: set data.trim_padding=0"
    )
  if cfg.source in (*synthetic.KINDS, "icl_bursty"):
    count = SYNTHETIC_SEQUENCES[split]
    ds = grain.MapDataset.range(_epoch_length(count, batch_size, repeat))
    if repeat:
      ds = ds.repeat()
    # After repeat: every epoch draws new sequences (the generator is seeded by the global index).
    task_seed = seed if split == "train" else SYNTHETIC_VAL_SEED
    if cfg.source == "icl_bursty":
      draw = functools.partial(_icl_example, pool=_icl_pool(cfg), cfg=cfg, count=count)
    else:
      draw = functools.partial(_synthetic_example, cfg=cfg, count=count)
    ds = ds.random_map(draw, seed=task_seed)
  else:
    if cfg.source == "regbench":
      examples = _languages(cfg, split)
    else:
      examples = _windows(cfg, split, tokenizer)
    ds = grain.MapDataset.range(_epoch_length(examples.count, batch_size, repeat))
    if split == "train" or repeat:
      ds = ds.shuffle(seed)  # Before repeat: a new order every epoch.
    if repeat:
      ds = ds.repeat()
    ds = ds.map(examples)
  # Batch before sharding: local batch k * P + p is this process's rows of global batch k. Both
  # are lazy, so only this process's examples are made.
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  if cfg.trim_padding:
    ds = ds.map(functools.partial(trim_batch, multiple=cfg.trim_padding))
  # Examples are cut from memory or a memmap: a few threads and batches of read-ahead suffice.
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)))


def trim_batch(batch: Example, multiple: int) -> Example:
  """The batch's first columns up to its last target that `loss_mask` or `answer_mask` counts,
  rounded up to a multiple of `multiple` (at least one multiple, at most the batch's length).

  The models are causal, so the logits of the positions kept, and the loss and its gradients, are
  those of the whole batch (tests/test_data.py checks it for every family): the columns cut hold
  only padding.
  """
  counted = np.flatnonzero((batch["loss_mask"] > 0).any(0) | (batch["answer_mask"] > 0).any(0))
  end = int(counted[-1]) + 1 if len(counted) else 1
  length = min(-(-end // multiple) * multiple, batch["tokens"].shape[-1])
  return {name: x[..., :length] for name, x in batch.items()}


def regbench_example(sequence: Integer[np.ndarray, " m"], seq_len: int) -> Example:
  """A RegBench sequence as one row: its first seq_len + 1 tokens, padded with regbench.PAD.

  As seq_icl (which truncates to its input_seq_len and pads with its noop token), the loss is
  taken only where the target is a letter: neither on padding nor on the separators `|`, whose
  places (string lengths) are random. The answer mask is 0: the accuracy of RegBench, a legal
  letter rather than the sampled one, needs the automaton (`regbench.scores`).
  """
  window = np.full(seq_len + 1, regbench.PAD)
  kept = sequence[: seq_len + 1]
  window[: len(kept)] = kept
  letters = window[1:] < regbench.NUM_LETTERS
  return _example(window, letters, np.zeros_like(letters))


def window_example(window: Integer[np.ndarray, " n"], eot_id: int | None) -> Example:
  """The example of n = seq_len + 1 consecutive tokens, documents delimited by `eot_id`."""
  if eot_id is None:
    ones = np.ones(len(window) - 1, bool)
    return _example(window, ones, ~ones)
  closes = window[:-1] == eot_id
  # The eot token belongs to the document it closes; its target starts the next one.
  segment_ids = np.cumsum(closes) - closes
  return _example(window, ~closes, np.zeros_like(closes), segment_ids)


def _example(
    sequence: Integer[np.ndarray, " n"],  # n = t + 1 tokens.
    loss_mask: Bool[np.ndarray, " t"],
    answer_mask: Bool[np.ndarray, " t"],
    segment_ids: Int[np.ndarray, " t"] | None = None,
) -> Example:
  fields = {
      "tokens": sequence[:-1],
      "targets": sequence[1:],
      "segment_ids": np.zeros(len(sequence) - 1) if segment_ids is None else segment_ids,
      "loss_mask": loss_mask,
      "answer_mask": answer_mask,
  }
  return {name: x.astype(BATCH_DTYPES[name]) for name, x in fields.items()}


def _padding(seq_len: int) -> Example:
  """A row that counts for nothing: it fills the last batch of a finite pass."""
  zeros = np.zeros(seq_len, bool)
  return _example(np.zeros(seq_len + 1, np.int32), zeros, zeros)


def _synthetic_example(
    index: int, rng: np.random.Generator, *, cfg: DataConfig, count: int
) -> Example:
  if index >= count:
    return _padding(cfg.seq_len)
  sequence, answers = synthetic.draw(
      rng,
      cfg.source,
      seq_len=cfg.seq_len,
      task_vocab=cfg.task_vocab,
      task_pairs=cfg.task_pairs,
  )
  return _example(sequence, answers, answers)


def _icl_example(
    index: int,
    rng: np.random.Generator,
    *,
    pool: icl_data.Vocabulary,
    cfg: DataConfig,
    count: int,
) -> Example:
  if index >= count:
    return _padding(cfg.seq_len)
  n = cfg.seq_len + 1
  text, counted, labels = icl_data.bursty_sequence(
      rng, pool, ways=cfg.icl_ways, anonymous=cfg.icl_anonymous, length=n
  )
  # The text is ASCII: its bytes are its characters, which the masks mark.
  sequence = tokenizers_lib.ByteTokenizer().encode(text)[:n]
  return _example(sequence, counted[1:n], labels[1:n])


def _icl_pool(cfg: DataConfig) -> icl_data.Vocabulary:
  try:
    return icl_data.training_vocabulary(cfg.icl_pool)
  except ValueError as e:
    raise DataError(f"data.icl_pool={cfg.icl_pool} classes: {e}") from None


@dataclasses.dataclass(frozen=True)
class _Windows:
  """Maps example i to the window at begin + i * stride; i >= count gives padding."""

  tokens: Integer[np.ndarray, " n"]  # All the file's tokens, possibly a memmap.
  begin: int
  stride: int
  count: int
  seq_len: int
  eot_id: int | None

  def __call__(self, index: int) -> Example:
    if index >= self.count:
      return _padding(self.seq_len)
    start = self.begin + index * self.stride
    return window_example(np.asarray(self.tokens[start : start + self.seq_len + 1]), self.eot_id)


@dataclasses.dataclass(frozen=True)
class _Languages:
  """Maps example i to the sequence of language i, drawn from a generator seeded by (split, i);
  i >= count gives padding."""

  automata: tuple[regbench.Automaton, ...]
  split: Split
  seq_len: int
  max_string: int

  @property
  def count(self) -> int:
    return len(self.automata)

  def __call__(self, index: int) -> Example:
    if index >= self.count:
      return _padding(self.seq_len)
    rng = np.random.default_rng((("train", "val").index(self.split), index))
    sequence = regbench.sample_sequence(rng, self.automata[index], max_string=self.max_string)
    return regbench_example(sequence, self.seq_len)


def _languages(cfg: DataConfig, split: Split) -> _Languages:
  train, held_out = regbench.train_test_languages(cfg.regbench_languages)
  automata = train if split == "train" else held_out
  return _Languages(automata, split, cfg.seq_len, cfg.regbench_max_string)


def _windows(cfg: DataConfig, split: Split, tokenizer: tokenizers_lib.Tokenizer | None) -> _Windows:
  tokens = _token_file(cfg) if cfg.source == "tokens" else _text_ids(cfg, tokenizer)
  begin, end = _split_bounds(cfg, len(tokens), split)
  window = cfg.seq_len + 1
  stride = 1 if split == "train" else cfg.seq_len
  count = (end - begin - window) // stride + 1
  return _Windows(tokens, begin, stride, count, cfg.seq_len, cfg.eot_id)


def _split_bounds(cfg: DataConfig, num_tokens: int, split: Split) -> tuple[int, int]:
  """The token range [begin, end) of `split`, checked to hold one window."""
  window = cfg.seq_len + 1
  if num_tokens < window:
    raise DataError(
        f"{cfg.path} has {num_tokens} tokens, fewer than one window of seq_len + 1 = {window}"
    )
  boundary = int(num_tokens * (1.0 - cfg.val_fraction))
  begin, end = (0, boundary) if split == "train" else (boundary, num_tokens)
  if end - begin < window:
    share = cfg.val_fraction if split == "val" else 1.0 - cfg.val_fraction
    raise DataError(
        f"the {split} split of {cfg.path} ({share:g} of {num_tokens} tokens) has {end - begin}"
        f" tokens, fewer than one window of seq_len + 1 = {window}: change data.val_fraction or"
        " data.seq_len"
    )
  return begin, end


def _epoch_length(count: int, batch_size: int, repeat: bool) -> int:
  """Examples per epoch; a finite pass is rounded up to whole global batches (with padding)."""
  return count if repeat else -(-count // batch_size) * batch_size


def _local_batch(batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(
        f"need 0 <= process_index < process_count, got {process_index} and {process_count}"
    )
  if batch_size < 1 or batch_size % process_count:
    raise DataError(
        f"batch_size {batch_size} must be a positive multiple of process_count {process_count}:"
        " every process reads an equal share"
    )
  return batch_size // process_count


def _check_config(cfg: DataConfig, tokenizer: tokenizers_lib.Tokenizer | None = None) -> None:
  """Refuses sources, tokenizers and task sizes that do not go together (the config's own checks
  cover each field alone), and a `tokenizer` of another kind than `cfg.tokenizer`."""
  if cfg.source == "tokens" and cfg.tokenizer != "none":
    raise DataError(
        f"source 'tokens' reads ids that are already tokenised ({cfg.path}): set"
        f" data.tokenizer='none', got {cfg.tokenizer!r}"
    )
  if cfg.source == "text" and cfg.tokenizer not in ("char", "byte", "hf"):
    raise DataError(
        f"source 'text' ({cfg.path}) needs data.tokenizer 'char', 'byte' or 'hf',"
        f" got {cfg.tokenizer!r}"
    )
  if cfg.source == "icl_bursty" and cfg.tokenizer != "byte":
    raise DataError(
        f"source 'icl_bursty' writes its text in bytes: set data.tokenizer='byte', got"
        f" {cfg.tokenizer!r}"
    )
  if tokenizer is not None and (
      cfg.source not in TEXT_SOURCES or tokenizers_lib.kind(tokenizer) != cfg.tokenizer
  ):
    raise DataError(
        f"the run's tokenizer is {tokenizers_lib.kind(tokenizer)!r}, but the data"
        f" ({cfg.source!r}, {cfg.path}) has data.tokenizer {cfg.tokenizer!r}: a run keeps the"
        " tokenizer of its first start; set it back, or start the run over (--restart)"
    )
  if cfg.source == "synthetic_induction" and cfg.task_vocab < 2:
    raise DataError(f"synthetic_induction needs task_vocab >= 2, got {cfg.task_vocab}")
  if cfg.source == "synthetic_needles" and not (
      1 <= cfg.task_pairs < cfg.task_vocab and 4 * cfg.task_pairs <= cfg.seq_len + 1
  ):
    raise DataError(
        "synthetic_needles needs 1 <= task_pairs < task_vocab (keys, and filler from the other"
        f" symbols) and seq_len >= 4 * task_pairs - 1, got task_pairs {cfg.task_pairs}, task_vocab"
        f" {cfg.task_vocab}, seq_len {cfg.seq_len}"
    )
  if cfg.source == "synthetic_mqar":
    if not 1 <= cfg.task_pairs <= cfg.task_vocab // 2:
      raise DataError(
          f"synthetic_mqar needs 1 <= task_pairs <= task_vocab // 2 (distinct keys from half the"
          f" symbols), got task_pairs {cfg.task_pairs} and task_vocab {cfg.task_vocab}"
      )
    if 4 * cfg.task_pairs > cfg.seq_len + 1:
      raise DataError(
          f"synthetic_mqar with {cfg.task_pairs} pairs needs seq_len >= {4 * cfg.task_pairs - 1},"
          f" got {cfg.seq_len}"
      )


def files(cfg: DataConfig) -> dict[str, str]:
  """The files of `cfg`, by field: "path" (text and tokens; DataError when it is missing) and an
  "hf" tokenizer's "tokenizer_path" where it exists (a resumed run reads its own tokenizer, not
  that file). Empty for generated data."""
  found = {}
  if cfg.source in ("text", "tokens"):
    found["path"] = _existing_path(cfg)
  if cfg.source == "text" and cfg.tokenizer == "hf" and os.path.isfile(cfg.tokenizer_path or ""):
    found["tokenizer_path"] = cfg.tokenizer_path
  return found


def absolute(cfg: DataConfig) -> DataConfig:
  """`cfg` with its file paths absolute, resolved against the current directory (normalised,
  symbolic links kept), so that a run's config names its files from anywhere."""
  paths = {
      field: os.path.abspath(getattr(cfg, field))
      for field in ("path", "tokenizer_path")
      if getattr(cfg, field)
  }
  return dataclasses.replace(cfg, **paths)


def _existing_path(cfg: DataConfig) -> str:
  if not cfg.path:
    raise DataError(f"source {cfg.source!r} reads a file: set data.path")
  if not os.path.isfile(cfg.path):
    raise DataError(f"data file {cfg.path} does not exist (data.path, {cfg.source!r})")
  return cfg.path


def _read_text(cfg: DataConfig) -> str:
  path = _existing_path(cfg)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise DataError(f"text file {path} is not UTF-8: {e}") from None
  if not text:
    raise DataError(f"text file {path} is empty")
  return text


def _tokenizer(cfg: DataConfig, text: str) -> tokenizers_lib.Tokenizer:
  """The tokenizer `cfg` describes; "char" builds its vocabulary from `text`, the whole file."""
  if cfg.tokenizer == "char":
    return tokenizers_lib.CharTokenizer.from_text(text)
  if cfg.tokenizer == "byte":
    return tokenizers_lib.ByteTokenizer()
  if not cfg.tokenizer_path:
    raise DataError(f"tokenizer 'hf' needs data.tokenizer_path, a tokenizer JSON ({cfg.path})")
  if not os.path.isfile(cfg.tokenizer_path):
    raise DataError(f"tokenizer file {cfg.tokenizer_path} does not exist")
  try:
    return tokenizers_lib.HFTokenizer.from_file(cfg.tokenizer_path)
  except ValueError as e:
    raise DataError(f"data.tokenizer_path {e}") from None


def _text_ids(cfg: DataConfig, tokenizer: tokenizers_lib.Tokenizer | None) -> Int[np.ndarray, " n"]:
  text = _read_text(cfg)
  if tokenizer is None:
    return _tokenizer(cfg, text).encode(text)
  try:
    return tokenizer.encode(text)
  except ValueError as e:  # Only a "char" vocabulary lacks characters.
    raise DataError(
        f"text file {cfg.path} does not fit the run's tokenizer: {e}. A run keeps the tokenizer of"
        " its first start: restore the text, or start the run over (--restart)"
    ) from None


def _token_file(cfg: DataConfig) -> UInt[np.memmap, " n"]:
  """The token file as a read-only memmap: it is never read whole into memory."""
  dtype = np.dtype(TOKEN_DTYPES[cfg.token_dtype])
  if cfg.eot_id is not None and not 0 <= cfg.eot_id <= np.iinfo(dtype).max:
    raise DataError(f"eot_id {cfg.eot_id} is not a {cfg.token_dtype} token id ({cfg.path})")
  path = _existing_path(cfg)
  size = os.path.getsize(path)
  if size == 0:
    raise DataError(f"token file {path} is empty")
  if size % dtype.itemsize:
    raise DataError(
        f"token file {path} has {size} bytes, not a whole number of {cfg.token_dtype} ids:"
        " check data.token_dtype"
    )
  return np.memmap(path, dtype=dtype, mode="r")
