"""`icl_classification`: in-context learning of a classification task from n demonstrations per
class, as LongICLBench builds it (Li et al. 2024, "Long-context LLMs Struggle with Long In-context
Learning", TIGER-AI-Lab/LongICLBench) and the Memory Mosaics v2 paper evaluates it.

A prompt is the dataset's instruction line, then the demonstrations, then the query without its
label (LongICLBench's `format_discovery_prompt` and query line, e.g. Banking77's):

    Given a customer service query, please predict the intent of the query. ... as follows: \\n
    service query: {text}\\nintent category: {label}<delimiter>      (n per class)
    service query: {query}\\nintent category:

With n shots every class has n demonstrations (LongICLBench's rounds), drawn from the training
split; the queries come from the test split, round-robin over the classes (LongICLBench's
`select_data`), and never occur among the demonstrations. One prompt prefix serves every query of
a setting. Four variants of it are scored: the delimiter between demonstrations a newline
(LongICLBench's) or a space, and the demonstrations shuffled or grouped by class (the classes in
a random order). The row {"shots": n} reports, per metric, the best variant's score, as the paper
does; the rows {"shots": n, "variant": "newline-shuffled"} etc. report each variant.

Labels are the class names (`labels=semantic`, LongICLBench's) or anonymous names, class_00,
class_01, ... given to the classes by a permutation drawn from the seed (`labels=anonymous`), so
that a model must learn the mapping from the demonstrations rather than recall what the names
mean. A tokenizer that cannot write digits or "_" (a character model) gets names spelled in its
lowercase letters ("class ab").

Metrics, x100 (percent, as LongICLBench's tables report them), over the queries:
- `exact_match`: the greedy continuation, cut where the next example would begin (the template's
  first words, e.g. "service query:"), stripped, first line, lower-cased, equals the label
  lower-cased (LongICLBench's scoring).
- `likelihood_accuracy`: the label whose continuation (" " + label + the delimiter, as the
  template writes it after the query) has the highest summed log-probability given the prompt,
  among all the classes', is the query's. The delimiter ends the continuation so that a label that
  begins another (TACRED's org:founded, org:founded_by) is not favoured for being short.
- `f1` (TACRED only, LongICLBench's metric there): micro F1 of the predictions, precision over the
  predictions that are a label.
- `prompt_tokens`: the longest prompt in tokens. A setting whose prompts (and generated tokens)
  would exceed `max_length` is skipped: its row holds only `prompt_tokens` (an estimate) and 0
  examples, and a line on stderr says so.

Datasets (`path`: a directory with train and test files, or one file, whose queries are then drawn
from what is left after each class's demonstrations):
- banking77: PolyAI's Banking77 (github.com/PolyAI-LDN/task-specific-datasets, CC BY 4.0),
  `train.csv` and `test.csv` with columns text,category (or JSON lines with text and label): 77
  intents of online-banking queries.
- goemotions: Google's GoEmotions (github.com/google-research/google-research, goemotions/data,
  Apache-2.0), `train.tsv` and `test.tsv` (text, comma-separated label ids, comment id; no header);
  only single-label comments are kept (LongICLBench's choice). Label names from `label_names` (a
  file, one name a line, line i naming id i), else `emotions.txt` beside the data, else the 28
  standard names.
- tacred: TACRED (LDC2018T24, licensed from the LDC: the user supplies it), `train.json` and
  `test.json`, lists of records with token, subj_start, subj_end, obj_start, obj_end (inclusive)
  and relation, or LongICLBench's processed records (sentence, subject_entity, object_entity,
  relation); no_relation is left out (LongICLBench's 41 relations).
- synthetic: built in, no download: each class is a made-up name with 4 made-up keywords; a text
  is 3 draws from its class's keywords and 5 of 48 noise words shared by all classes, shuffled.
  Every word is of consonant-vowel syllables in letters the tokenizer writes, so it runs on any
  small model.
Texts are put on one line (runs of whitespace become a space) and passed through
`prompts.Alphabet.fit`; labels given as ids are mapped through `label_names`. The classes are in
the order of their first appearance in the training file (LongICLBench's); `num_classes=k` keeps
the first k.

Where this differs from LongICLBench: demonstrations and queries are drawn per class in an order
from the seed (LongICLBench takes them in file order), so that seeds give independent repeats;
the query line ends before the space that precedes the label, which the continuation carries (a
trailing space would be a token of its own for a BPE tokenizer); the generated tokens default to
what the longest label needs (LongICLBench generates 100); TACRED's tokens are joined by a few
detokenising rules (LongICLBench uses Moses' detokenizer); TACRED's labels are compared
lower-cased, like the other datasets' (they are lower-case).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from jaxtyping import Float

from mosaics_jax import config as config_lib, icl_data
from mosaics_jax.eval import harness as harness_lib, prompts, results as results_lib
from mosaics_jax.icl_data import VARIANTS, Example, Format

NAME = "icl_classification"

# LongICLBench's instruction lines (`format_discovery_prompt` of banking77_infer.py,
# goemotion_infer.py and tacred_infer.py, with " The examples are as follows: " appended as there)
# and their example lines; synthetic's (`icl_data`, which training reads too) follows Banking77's.
BANKING77_INSTRUCTION = (
    "Given a customer service query, please predict the intent of the query."
    + icl_data.EXACT
    + icl_data.FOLLOWS
)
BANKING77_TEMPLATE = "service query: {text}\nintent category: {label}"
GOEMOTIONS_INSTRUCTION = (
    "Given a comment, please predict the emotion category of this comment."
    + icl_data.EXACT
    + icl_data.FOLLOWS
)
GOEMOTIONS_TEMPLATE = "comment: {text}\nemotion category: {label}"
TACRED_INSTRUCTION = (
    "Given a sentence and a pair of subject and object entities within the sentence, please"
    " predict the relation between the given entities." + icl_data.FOLLOWS
)
TACRED_TEMPLATE = (
    "sentence: {text}\nthe subject is {subject} and the object is {object}\nthe relation between"
    " the two entities is: {label}"
)
SYNTHETIC_INSTRUCTION = icl_data.SYNTHETIC_INSTRUCTION
SYNTHETIC_TEMPLATE = icl_data.SYNTHETIC_TEMPLATE

# GoEmotions' emotions.txt: id i is the i-th name.
GOEMOTIONS_NAMES = (
    "admiration amusement anger annoyance approval caring confusion curiosity desire"
    " disappointment disapproval disgust embarrassment excitement fear gratitude grief joy love"
    " nervousness optimism pride realization relief remorse sadness surprise neutral"
).split()

# Queries per class by default: LongICLBench's test sets (7 turns of Banking77, 25 of GoEmotions,
# 20 per TACRED relation).
_QUERIES_PER_CLASS = {"banking77": 7, "goemotions": 25, "tacred": 20, "synthetic": 10}
# The training and test files looked for in a directory, by dataset.
_SUFFIXES = {
    "banking77": ("csv", "jsonl"),
    "goemotions": ("tsv", "csv", "jsonl"),
    "tacred": ("json", "jsonl"),
}
_TACRED_NONE = "no_relation"

# The synthetic dataset (`icl_data`, fixed: the run's seed draws from it): classes by default,
# and texts per class in each split.
_SYNTHETIC_CLASSES = icl_data.EVAL_CLASSES
_SYNTHETIC_SPLIT = (64, 64)

# Seed streams, so that the draws of one part do not depend on those of another.
_SEED = 7744
_POOLS, _SHUFFLE, _GROUPS, _ANONYMOUS = range(4)

# Tokens of slack on a setting's length, estimated from the prompt of the longest query alone
# (another query's may tokenise longer across the seam with the demonstrations), and the multiple
# a generation length is rounded up to, so that close lengths compile once.
_SLACK = 4
_ROUND = 512


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """Which dataset, how many shots, which labels (module docstring)."""

  dataset: Literal["banking77", "goemotions", "tacred", "synthetic"] = "synthetic"
  path: str | None = None  # The dataset's directory (train and test files) or one file.
  label_names: str | None = None  # A file of class names, line i naming label id i.
  shots: tuple[int, ...] = (1, 2, 4, 8, 16)  # Demonstrations per class.
  labels: Literal["semantic", "anonymous"] = "anonymous"
  # Queries, round-robin over the classes; default: LongICLBench's per class (banking77 7,
  # goemotions 25, tacred 20; synthetic 10) times the classes.
  num_examples: int | None = None
  # The first k classes; default: all (synthetic: the classes generated, default 16).
  num_classes: int | None = None
  max_length: int = 32768  # Settings whose prompts and generated tokens need more are skipped.
  # Tokens generated for the label; default: enough for the longest label and the next line.
  max_new_tokens: int | None = None
  banking77_instruction: str = BANKING77_INSTRUCTION
  banking77_template: str = BANKING77_TEMPLATE
  goemotions_instruction: str = GOEMOTIONS_INSTRUCTION
  goemotions_template: str = GOEMOTIONS_TEMPLATE
  tacred_instruction: str = TACRED_INSTRUCTION
  tacred_template: str = TACRED_TEMPLATE
  synthetic_instruction: str = SYNTHETIC_INSTRUCTION
  synthetic_template: str = SYNTHETIC_TEMPLATE

  def __post_init__(self):
    config_lib.check_types(self)
    if not self.shots or min(self.shots) < 1 or len(set(self.shots)) < len(self.shots):
      raise config_lib.ConfigError(
          f"{NAME}.shots must be distinct numbers >= 1, got {list(self.shots)}"
      )
    for name, low in (("num_examples", 1), ("num_classes", 2), ("max_new_tokens", 1)):
      value = getattr(self, name)
      if value is not None and value < low:
        raise config_lib.ConfigError(f"{NAME}.{name} must be >= {low}, got {value}")
    if self.max_length < 2:
      raise config_lib.ConfigError(f"{NAME}.max_length must be >= 2, got {self.max_length}")
    if self.dataset == "synthetic" and self.path is not None:
      raise config_lib.ConfigError(
          f"{NAME}.path: the synthetic dataset is built in and reads no file, got {self.path!r}"
      )
    for dataset in _QUERIES_PER_CLASS:
      name = f"{dataset}_template"
      try:
        _check_template(getattr(self, name), dataset)
      except ValueError as e:
        raise config_lib.ConfigError(f"{NAME}.{name}: {e}") from None

  def format(self, fit: Callable[[str], str] = lambda text: text) -> Format:
    """The instruction and template of the dataset, their text passed through `fit`."""
    instruction = getattr(self, f"{self.dataset}_instruction")
    return Format.of(instruction, getattr(self, f"{self.dataset}_template"), fit)


def _check_template(template: str, dataset: str) -> None:
  fields = [f for _, f, _, _ in icl_data.parse_template(template) if f is not None]
  allowed = {"text", "label"} | ({"subject", "object"} if dataset == "tacred" else set())
  if set(fields) - allowed:
    raise ValueError(f"fields are {sorted(allowed)}, got {fields}")
  needed = allowed - set(fields)
  if needed:
    raise ValueError(f"needs the fields {sorted(needed)}: {template!r}")
  if not template.endswith("{label}") or fields.count("label") != 1:
    raise ValueError(f"must end with its one {{label}}: {template!r}")
  if any(spec or conversion for _, _, spec, conversion in icl_data.parse_template(template)):
    raise ValueError(f"fields take no format specs or conversions: {template!r}")


# The prompts.


def demonstrations(
    pools: Sequence[Sequence[Example]], shots: int, grouped: bool, seed: int
) -> list[Example]:
  """The first `shots` examples of each class's pool, shuffled together, or grouped by class with
  the classes in a random order. The order depends on the seed and `shots` alone, so that two
  variants of one order differ in their delimiter only."""
  chosen = [list(pool[:shots]) for pool in pools]
  short = [c for c, examples in enumerate(chosen) if len(examples) < shots]
  if short:
    raise ValueError(
        f"{shots} shots need {shots} demonstrations of every class, but classes {short} (in the"
        f" dataset's order) have as few as {min(len(chosen[c]) for c in short)}"
    )
  if grouped:
    order = np.random.default_rng([seed, _SEED, _GROUPS, shots]).permutation(len(chosen))
    return [e for c in order.tolist() for e in chosen[c]]
  flat = [e for examples in chosen for e in examples]
  order = np.random.default_rng([seed, _SEED, _SHUFFLE, shots]).permutation(len(flat))
  return [flat[i] for i in order.tolist()]


def label_names(
    classes: Sequence[str], kind: str, seed: int, alphabet: prompts.Alphabet
) -> tuple[str, ...]:
  """The label shown for each class: its name in characters the tokenizer writes (semantic) or
  an anonymous name given by a permutation drawn from the seed (anonymous).

  Raises ValueError when semantic names become empty or alike in the tokenizer's characters.
  """
  k = len(classes)
  if kind == "semantic":
    # Banking77's card_arrival is "card arrival" to a tokenizer without "_".
    spaced = (c if alphabet.writes("_") else c.replace("_", " ") for c in classes)
    names = tuple(" ".join(alphabet.fit(c).split()) for c in spaced)
    if "" in names or len(set(names)) < k:
      raise ValueError(
          "the tokenizer cannot write the class names apart (labels=anonymous can be written)"
      )
    return names
  permutation = np.random.default_rng([seed, _SEED, _ANONYMOUS]).permutation(k).tolist()
  return tuple(icl_data.anonymous_name(i, k, alphabet.writes) for i in permutation)


def round_robin(pools: Sequence[Sequence[Example]], count: int) -> list[Example]:
  """Up to `count` examples, one of each class in turn, skipping a class that has run out."""
  out: list[Example] = []
  taken = [0] * len(pools)
  while len(out) < count and any(t < len(p) for t, p in zip(taken, pools)):
    for c, pool in enumerate(pools):
      if taken[c] < len(pool) and len(out) < count:
        out.append(pool[taken[c]])
        taken[c] += 1
  return out


# Scoring.


def prediction(generated: str, head: str) -> str:
  """A generated label as LongICLBench reads it: cut where the next example begins, stripped,
  its first line, lower-cased."""
  if head:
    generated = generated.split(head)[0]
  return generated.strip().split("\n")[0].strip().lower()


def exact_match(predictions: Sequence[str], labels: Sequence[str]) -> float:
  """The share of predictions equal to their label lower-cased, x100."""
  _check_counts(predictions, labels)
  return 100.0 * float(np.mean([p == label.lower() for p, label in zip(predictions, labels)]))


def likelihood_accuracy(scores: Float[np.ndarray, "q c"], answers: Sequence[int]) -> float:
  """The share of queries whose right class has the highest log-likelihood, x100."""
  _check_counts(scores, answers)
  return 100.0 * float(np.mean(scores.argmax(axis=1) == np.asarray(answers)))


def f1(predictions: Sequence[str], labels: Sequence[str], classes: Sequence[str]) -> float:
  """LongICLBench's TACRED score, x100: micro F1, precision over the predictions that are a
  label of `classes`, recall over all queries."""
  _check_counts(predictions, labels)
  known = {c.lower() for c in classes}
  correct = sum(p == label.lower() for p, label in zip(predictions, labels))
  predicted = sum(p in known for p in predictions)
  if not correct:
    return 0.0
  precision, recall = correct / predicted, correct / len(labels)
  return 100.0 * 2 * precision * recall / (precision + recall)


def _check_counts(predictions: Sequence[Any] | np.ndarray, labels: Sequence[Any]) -> None:
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  if not len(labels):
    raise ValueError("no predictions to score")


# The datasets.


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Classes by name and examples, the test split None when one file holds both."""

  classes: tuple[str, ...]
  train: tuple[Example, ...]
  test: tuple[Example, ...] | None


def load(settings: Settings, alphabet: prompts.Alphabet) -> Dataset:
  """The dataset of `settings`, its first `num_classes` classes, its texts on one line in
  characters the tokenizer writes.

  Raises ValueError naming the file for a missing file or one of the wrong form.
  """
  if settings.dataset == "synthetic":
    return synthetic(alphabet, settings.num_classes or _SYNTHETIC_CLASSES)
  if settings.path is None:
    raise ValueError(
        f"{settings.dataset} reads the dataset's files: set {NAME}.path=DIR (the module"
        " docstring says where to get them)"
    )
  path = pathlib.Path(settings.path)
  names = _names(settings, path)
  if path.is_dir():
    train, test = (_read(f, settings.dataset, names) for f in _split_files(path, settings.dataset))
  elif path.is_file():
    train, test = _read(path, settings.dataset, names), None
  else:
    raise ValueError(f"{path} does not exist")
  classes = tuple(dict.fromkeys(label for _, _, label in train))
  if settings.num_classes is not None:
    if settings.num_classes > len(classes):
      raise ValueError(f"num_classes={settings.num_classes}, but {path} has {len(classes)} classes")
    classes = classes[: settings.num_classes]
  index = {c: i for i, c in enumerate(classes)}

  def examples(rows: list[_Row]) -> tuple[Example, ...]:
    return tuple(
        Example(_line(text, alphabet), index[label], tuple(_line(e, alphabet) for e in entities))
        for text, entities, label in rows
        if label in index  # A test class without demonstrations cannot be learned.
    )

  return Dataset(classes, examples(train), None if test is None else examples(test))


def pools(
    dataset: Dataset, most_shots: int, seed: int
) -> tuple[list[list[Example]], list[list[Example]]]:
  """Per class, (the demonstrations to draw from, in order; the queries, in order): each class's
  examples in an order drawn from the seed. From one file, a class's first `most_shots` examples
  are its demonstrations and the rest its queries. No query is a demonstration's text."""
  rng = np.random.default_rng([seed, _SEED, _POOLS])
  k = len(dataset.classes)

  def by_class(examples: Sequence[Example]) -> list[list[Example]]:
    out: list[list[Example]] = [[] for _ in range(k)]
    for e in examples:
      out[e.label].append(e)
    return [[pool[i] for i in rng.permutation(len(pool)).tolist()] for pool in out]

  train = by_class(dataset.train)
  if dataset.test is None:
    demos, queries = [p[:most_shots] for p in train], [p[most_shots:] for p in train]
  else:
    demos, queries = train, by_class(dataset.test)
  shown = {e.key for pool in demos for e in pool}
  return demos, [[e for e in pool if e.key not in shown] for pool in queries]


_Row = tuple[str, tuple[str, str], str]  # (text, TACRED's entities, class name)


def _split_files(directory: pathlib.Path, dataset: str) -> tuple[pathlib.Path, pathlib.Path]:
  found = []
  for split in ("train", "test"):
    files = [directory / f"{split}.{s}" for s in _SUFFIXES[dataset]]
    present = [f for f in files if f.is_file()]
    if not present:
      raise ValueError(
          f"{directory} has no {' or '.join(f.name for f in files)} ({dataset}'s {split} split)"
      )
    found.append(present[0])
  return found[0], found[1]


def _names(settings: Settings, path: pathlib.Path) -> list[str] | None:
  """The class names of label ids: the label_names file, GoEmotions' emotions.txt beside the data
  or its standard names; None where labels must be names."""
  file = settings.label_names
  if file is None and settings.dataset == "goemotions":
    beside = (path if path.is_dir() else path.parent) / "emotions.txt"
    if not beside.is_file():
      return list(GOEMOTIONS_NAMES)
    file = str(beside)
  if file is None:
    return None
  try:
    names = [line.strip() for line in pathlib.Path(file).read_text(encoding="utf-8").splitlines()]
  except OSError as e:
    raise ValueError(f"cannot read the label names file {file}: {e}") from None
  return [n for n in names if n]


def _read(file: pathlib.Path, dataset: str, names: list[str] | None) -> list[_Row]:
  """The rows of one split file, of the forms of the module docstring."""
  suffix = file.suffix.lstrip(".")
  if suffix not in _SUFFIXES[dataset]:
    raise ValueError(f"{file}: {dataset} reads {', '.join(_SUFFIXES[dataset])} files")
  try:
    text = file.read_text(encoding="utf-8-sig")
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read {file}: {e}") from None
  if suffix == "tsv":
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
      cells = line.split("\t")
      if len(cells) not in (2, 3):
        raise ValueError(
            f"{file}:{number} is not GoEmotions' text<TAB>label ids<TAB>id: {line[:80]!r}"
        )
      rows.append({"text": cells[0], "labels": cells[1].split(",")})
  elif suffix == "csv":
    reader = csv.DictReader(text.splitlines())
    rows = list(reader)
    columns = reader.fieldnames or []
    if "text" not in columns or not {"category", "label", "labels"} & set(columns):
      raise ValueError(f"{file} has the columns {columns}: it needs text and category (or label)")
  else:
    rows = _json_rows(file, text, suffix)
  read = _tacred_row if dataset == "tacred" else _labelled_row
  out = []
  for number, row in enumerate(rows, 1):
    if not isinstance(row, dict):
      raise ValueError(f"{file}: record {number} is not an object")
    found = read(row, names, f"{file}: record {number}")
    if found is not None:
      out.append(found)
  if not out:
    raise ValueError(f"{file} holds no examples")
  return out


def _json_rows(file: pathlib.Path, text: str, suffix: str) -> list[Any]:
  if suffix == "jsonl":
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{number} is not JSON: {e}") from None
    return rows
  try:
    rows = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not JSON: {e}") from None
  if not isinstance(rows, list):
    raise ValueError(f"{file} holds no list of records")
  return rows


def _labelled_row(row: dict[str, Any], names: list[str] | None, where: str) -> _Row | None:
  """(text, no entities, class name) of a record with text and category, label or labels; None
  for a record of several labels (GoEmotions' multi-label comments)."""
  column = next((c for c in ("category", "label", "labels") if c in row), None)
  if "text" not in row or column is None:
    raise ValueError(f"{where} has the fields {sorted(row)}: it needs text and category (or label)")
  label = row[column]
  if isinstance(label, list):
    if len(label) != 1:
      return None
    label = label[0]
  if isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
    if names is None:
      raise ValueError(
          f"{where} has label id {label}: give the class names with {NAME}.label_names"
      )
    if not 0 <= int(label) < len(names):
      raise ValueError(f"{where} has label id {label}, but there are {len(names)} label names")
    label = names[int(label)]
  if not isinstance(label, str) or not isinstance(row["text"], str):
    raise ValueError(f"{where}: text and label must be strings, got {row!r:.120}")
  return row["text"], ("", ""), label


# TACRED's tokens are Penn Treebank's: brackets and quotes spelled out.
_PTB = {"-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}"}
_PTB |= {"``": '"', "''": '"'}
_NO_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}]|'s|'re|'ve|'ll|'d|'m|n't)(?= |$)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def _detokenize(tokens: Sequence[str]) -> str:
  text = " ".join(_PTB.get(t, t) for t in tokens)
  return _NO_SPACE_AFTER.sub(r"\1", _NO_SPACE_BEFORE.sub(r"\1", text))


def _tacred_row(row: dict[str, Any], names: list[str] | None, where: str) -> _Row | None:
  """(sentence, (subject, object), relation) of a TACRED record, LDC's or LongICLBench's; None
  for no_relation."""
  del names  # TACRED's relations are names.
  if "relation" not in row:
    raise ValueError(f"{where} has no relation: it needs TACRED's fields")
  if row["relation"] == _TACRED_NONE:
    return None
  try:
    if "token" in row:
      tokens = row["token"]
      subject = _detokenize(tokens[row["subj_start"] : row["subj_end"] + 1])
      obj = _detokenize(tokens[row["obj_start"] : row["obj_end"] + 1])
      return _detokenize(tokens), (subject, obj), row["relation"]
    return row["sentence"], (row["subject_entity"], row["object_entity"]), row["relation"]
  except (KeyError, TypeError) as e:
    raise ValueError(
        f"{where} has the fields {sorted(row)}: TACRED's are token, subj_start, subj_end,"
        f" obj_start, obj_end and relation ({type(e).__name__}: {e})"
    ) from None


def _line(text: str, alphabet: prompts.Alphabet) -> str:
  """`text` on one line in characters the tokenizer writes."""
  return " ".join(alphabet.fit(" ".join(text.split())).split())


def synthetic(alphabet: prompts.Alphabet, num_classes: int) -> Dataset:
  """The built-in dataset of `num_classes` classes (module docstring), fixed for a tokenizer."""
  if not alphabet.writes(" "):
    raise ValueError("the synthetic dataset needs spaces, which the tokenizer does not write")
  rng = np.random.default_rng(icl_data.EVAL_SEED)
  vocabulary = icl_data.vocabulary(rng, alphabet.lowercase, num_classes)
  seen: set[str] = set()
  splits: tuple[list[Example], list[Example]] = ([], [])
  for label in range(num_classes):
    for split, size in zip(splits, _SYNTHETIC_SPLIT):
      drawn = 0
      while drawn < size:
        text = icl_data.draw_text(rng, vocabulary.keywords[label], vocabulary.noise)
        if text not in seen:  # Every text once: the splits are disjoint.
          seen.add(text)
          split.append(Example(text, label))
          drawn += 1
  return Dataset(vocabulary.classes, tuple(splits[0]), tuple(splits[1]))


# The task.


def run(harness: harness_lib.Harness, settings: Settings) -> list[results_lib.Result]:
  """Exact match and likelihood accuracy at each number of shots, best and by variant (module
  docstring)."""
  tokenizer = harness.tokenizer
  alphabet = prompts.Alphabet(tokenizer)
  count_tokens = lambda text: prompts.count_tokens(tokenizer, text)
  try:
    dataset = load(settings, alphabet)
    labels = label_names(dataset.classes, settings.labels, harness.seed, alphabet)
    demo_pools, query_pools = pools(dataset, max(settings.shots), harness.seed)
    orders = {
        (n, grouped): demonstrations(demo_pools, n, grouped, harness.seed)
        for n in settings.shots
        for grouped in (False, True)
    }
  except (ValueError, OSError) as e:
    raise harness_lib.EvalError(f"{NAME}: {e}") from None
  fmt = settings.format(alphabet.fit)
  k = len(labels)
  requested = settings.num_examples or _QUERIES_PER_CLASS[settings.dataset] * k
  queries = round_robin(query_pools, harness.count(requested))
  if not queries:
    raise harness_lib.EvalError(f"{NAME}: no test examples left after the demonstrations")
  delimiters = sorted({v.delimiter for v in VARIANTS})
  continuations = {
      d: [tokenizer.encode(fmt.continuation(label, d)) for label in labels] for d in delimiters
  }
  max_new = settings.max_new_tokens or 1 + max(
      count_tokens(fmt.continuation(label, d) + fmt.head) for label in labels for d in delimiters
  )
  answer = max(max_new, *(len(c) for cs in continuations.values() for c in cs))
  longest = fmt.query(max(queries, key=lambda q: count_tokens(fmt.query(q))))
  prefix = lambda n, v: fmt.prefix(orders[n, v.grouped], labels, v.delimiter)

  # Every setting's length before any work: the memory check covers the longest one run.
  needed = {
      n: max(count_tokens(prefix(n, v) + longest) for v in VARIANTS) + answer + _SLACK
      for n in settings.shots
  }
  lengths = {
      n: min(-(-need // _ROUND) * _ROUND, settings.max_length)
      for n, need in needed.items()
      if need <= settings.max_length
  }
  if not lengths:
    raise harness_lib.EvalError(
        f"{NAME}: every setting needs more than max_length={settings.max_length} tokens (the"
        f" fewest shots, {min(settings.shots)}, about {min(needed.values())})"
    )
  harness.check_length(max(lengths.values()))
  fields = dataclasses.asdict(
      dataclasses.replace(
          settings, num_examples=len(queries), num_classes=k, max_new_tokens=max_new
      )
  )
  answers = [q.label for q in queries]
  truth = [labels[a] for a in answers]

  def result(metric: str, value: float, count: int, **row) -> results_lib.Result:
    return results_lib.Result(NAME, metric, float(value), count, row, fields)

  out = []
  for n in settings.shots:
    if n not in lengths:
      print(
          f"{NAME}: {n} shots skipped: prompts of about {needed[n]} tokens with the answer, more"
          f" than max_length={settings.max_length}",
          file=sys.stderr,
      )
      out.append(result("prompt_tokens", needed[n], 0, shots=n))
      continue
    bar = harness.bar(2 * len(VARIANTS) * len(queries), f"{NAME} @ {n} shots")
    scores: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
      try:
        texts = fmt.prompts(orders[n, variant.grouped], labels, queries, variant.delimiter)
      except ValueError as e:  # A query among the demonstrations: `pools` keeps them apart.
        raise harness_lib.EvalError(f"{NAME}: {e}") from None
      generated = harness.generate_text(texts, max_new, lengths[n], bar)
      predictions = [prediction(g, fmt.head) for g in generated]
      ids = [tokenizer.encode(t) for t in texts]
      log_likelihoods = []
      for row in ids:
        found = harness.continuation_scores(row, continuations[variant.delimiter])
        log_likelihoods.append([value for value, _ in found])
        bar.update(1)
      scores[variant.name] = {
          "exact_match": exact_match(predictions, truth),
          "likelihood_accuracy": likelihood_accuracy(np.array(log_likelihoods), answers),
      }
      if settings.dataset == "tacred":
        scores[variant.name]["f1"] = f1(predictions, truth, labels)
      scores[variant.name]["prompt_tokens"] = float(max(len(row) for row in ids))
    bar.close()
    for metric in scores[VARIANTS[0].name]:
      best = max(by_metric[metric] for by_metric in scores.values())
      out.append(result(metric, best, len(queries), shots=n))
    for name, by_metric in scores.items():
      for metric, value in by_metric.items():
        out.append(result(metric, value, len(queries), shots=n, variant=name))
  return out
