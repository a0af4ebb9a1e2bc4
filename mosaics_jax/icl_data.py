"""Few-shot classification in text: the prompt format of `icl_classification` (`eval/icl.py`), its
synthetic classes, and the bursty training sequences (`data.source=icl_bursty`) built from them.

Training draws its sequences here and evaluation builds its prompts here, so that a model trained
on `icl_bursty` reads, at evaluation, the very format it learnt: this module is the one home of the
example template, the instruction line, the layouts of the demonstrations (`VARIANTS`), the
anonymous label names and the generator of made-up words.

Synthetic classes (`vocabulary`): each is a made-up name of 3 consonant-vowel syllables with
`KEYWORDS` made-up keywords of 2 syllables; `NOISE` noise words of 2 syllables are shared by all.
A text (`draw_text`) is `TEXT_WORDS[0]` draws from its class's keywords and `TEXT_WORDS[1]` of the
noise words, shuffled: its class shows only in the keywords it shares with the class's other texts.
The evaluation's classes come from the generator seeded by `EVAL_SEED`; the training classes
(`training_vocabulary`) from `TRAINING_SEED`, with no word in common with the evaluation's.

A bursty sequence (`bursty_sequence`, after Chan et al. 2022, "Data distributional properties drive
emergent in-context learning in transformers") is the instruction line, then examples of a few
classes of the training pool, each class many times, until the sequence is full. Its labels are the
classes' names, or anonymous names (class_00, ...) given to the classes by a permutation drawn for
the sequence: which name is which class is then known only from the sequence itself.

Axes: n = characters (bytes) of a sequence.
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
from collections.abc import Callable, Sequence

import numpy as np
from jaxtyping import Bool

# The end of LongICLBench's instruction lines (`format_discovery_prompt`), and the sentence that
# its Banking77 and GoEmotions lines hold before it.
FOLLOWS = " The examples are as follows: "
EXACT = " The predict answer must come from the demonstration examples with the exact format."
# The synthetic dataset's instruction line and example template, in Banking77's style.
SYNTHETIC_INSTRUCTION = "Given a text, please predict its category." + EXACT + FOLLOWS
SYNTHETIC_TEMPLATE = "text: {text}\ncategory: {label}"

# Keywords per class, noise words shared by all classes, and (keywords, noise words) per text.
KEYWORDS = 4
NOISE = 48
TEXT_WORDS = (3, 5)
# The evaluation's dataset is fixed by this seed; the training classes are drawn from another.
EVAL_SEED = 20240402
TRAINING_SEED = 20221022
# The evaluation's classes by default: the training pool avoids the words of its datasets of up to
# this many classes (each number of classes draws other keywords).
EVAL_CLASSES = 16
_MAX_DRAWS = 1000
_LETTERS = string.ascii_lowercase  # What a byte tokenizer writes, of the generator's letters.


@dataclasses.dataclass(frozen=True)
class Example:
  """One text and its class (an index into the classes)."""

  text: str
  label: int
  entities: tuple[str, str] = ("", "")  # TACRED's subject and object.

  @property
  def key(self) -> tuple[str, str, str]:
    """What a demonstration and a query must not share."""
    return (self.text, *self.entities)

  def fields(self) -> dict[str, str]:
    return {"text": self.text, "subject": self.entities[0], "object": self.entities[1]}


@dataclasses.dataclass(frozen=True)
class Variant:
  """How the demonstrations are laid out."""

  name: str
  delimiter: str  # Between demonstrations, and between the last one and the query.
  grouped: bool  # A class's demonstrations together, else all of them shuffled.


VARIANTS = (
    Variant("newline-shuffled", "\n", False),
    Variant("newline-grouped", "\n", True),
    Variant("space-shuffled", " ", False),
    Variant("space-grouped", " ", True),
)


def parse_template(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
  """`string.Formatter().parse` of `template`; raises ValueError naming the template."""
  try:
    return list(string.Formatter().parse(template))
  except ValueError as e:
    raise ValueError(f"{e}: {template!r}") from None


@dataclasses.dataclass(frozen=True)
class Format:
  """An instruction and an example template that ends with "{label}"."""

  instruction: str
  template: str

  @classmethod
  def of(cls, instruction: str, template: str, fit: Callable[[str], str]) -> Format:
    """The format with the text of `instruction` and `template` (not the template's fields)
    passed through `fit`."""
    rebuilt = ""
    for literal, field, _, _ in parse_template(template):
      rebuilt += fit(literal).replace("{", "{{").replace("}", "}}")
      if field is not None:
        rebuilt += "{" + field + "}"
    return cls(fit(instruction), rebuilt)

  @property
  def _before_label(self) -> str:
    return self.template[: -len("{label}")]

  @property
  def query_template(self) -> str:
    """The template up to the label, without the whitespace before it."""
    return self._before_label.rstrip()

  @property
  def label_prefix(self) -> str:
    """What the template writes between the query and the label (" ")."""
    return self._before_label[len(self.query_template) :]

  @property
  def head(self) -> str:
    """The words an example begins with ("service query:"): where a generated label ends."""
    return parse_template(self.template)[0][0].strip()

  def example(self, example: Example, label: str) -> str:
    return self.template.format(label=label, **example.fields())

  def query(self, example: Example) -> str:
    return self.query_template.format(**example.fields())

  def prefix(self, demonstrations: Sequence[Example], labels: Sequence[str], delimiter: str) -> str:
    """The instruction line and the demonstrations, each followed by `delimiter`."""
    shown = "".join(self.example(d, labels[d.label]) + delimiter for d in demonstrations)
    return f"{self.instruction}\n{shown}"

  def prompts(
      self,
      demonstrations: Sequence[Example],
      labels: Sequence[str],
      queries: Sequence[Example],
      delimiter: str,
  ) -> list[str]:
    """The prompt of each query: the prefix, then the query up to its label.

    Raises ValueError when a query is among the demonstrations.
    """
    shown = {d.key for d in demonstrations}
    leaked = [q.text for q in queries if q.key in shown]
    if leaked:
      raise ValueError(f"queries are among the demonstrations: {leaked[:3]}")
    head = self.prefix(demonstrations, labels, delimiter)
    return [head + self.query(q) for q in queries]

  def continuation(self, label: str, delimiter: str) -> str:
    """What follows the query's prompt when the label is `label`, up to the next example."""
    return self.label_prefix + label + delimiter


def anonymous_name(index: int, count: int, writes: Callable[[str], bool]) -> str:
  """The anonymous name of class `index` of `count`: class_07 where the tokenizer (`writes`: the
  characters it round-trips) writes digits and "_", else spelled in its lowercase letters."""
  if all(writes(c) for c in "class_" + string.digits):
    return f"class_{index:0{max(2, len(str(count - 1)))}d}"
  letters = "".join(c for c in string.ascii_lowercase if writes(c))
  width = max(2, math.ceil(math.log(count, len(letters))))
  spelled = "".join(
      letters[index // len(letters) ** p % len(letters)] for p in reversed(range(width))
  )
  return ("class_" if writes("_") else "class ") + spelled


# The synthetic classes.


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Made-up class names, each class's keywords and the noise words shared by all classes."""

  classes: tuple[str, ...]
  keywords: tuple[tuple[str, ...], ...]
  noise: tuple[str, ...]

  @property
  def words(self) -> frozenset[str]:
    return frozenset((*self.classes, *(w for k in self.keywords for w in k), *self.noise))


def vocabulary(
    rng: np.random.Generator,
    letters: str,
    num_classes: int,
    exclude: frozenset[str] = frozenset(),
) -> Vocabulary:
  """`num_classes` classes of distinct made-up words (module docstring) in `letters`, none of them
  in `exclude`.

  Raises ValueError when the letters lack vowels or consonants, or make too few words.
  """
  vowels = "".join(c for c in letters if c in "aeiou")
  consonants = "".join(c for c in letters if c not in "aeiouy")
  if not vowels or not consonants:
    raise ValueError(f"the synthetic words need vowels and consonants: {letters!r}")
  used = set(exclude)

  def word(syllables: int) -> str:
    for _ in range(_MAX_DRAWS):
      c = rng.integers(len(consonants), size=syllables).tolist()
      v = rng.integers(len(vowels), size=syllables).tolist()
      drawn = "".join(consonants[i] + vowels[j] for i, j in zip(c, v))
      if drawn not in used:
        used.add(drawn)
        return drawn
    raise ValueError(f"the tokenizer's letters {letters!r} make too few words for the classes")

  classes = tuple(word(3) for _ in range(num_classes))
  keywords = tuple(tuple(word(2) for _ in range(KEYWORDS)) for _ in range(num_classes))
  noise = tuple(word(2) for _ in range(NOISE))
  return Vocabulary(classes, keywords, noise)


def draw_text(rng: np.random.Generator, keywords: Sequence[str], noise: Sequence[str]) -> str:
  """A text of a class: draws from its keywords and distinct noise words, shuffled."""
  words = [
      *rng.choice(keywords, TEXT_WORDS[0]).tolist(),
      *rng.choice(noise, TEXT_WORDS[1], replace=False).tolist(),
  ]
  return " ".join(words[i] for i in rng.permutation(len(words)).tolist())


def eval_vocabulary(letters: str, num_classes: int) -> Vocabulary:
  """The words of the evaluation's synthetic dataset of `num_classes` classes."""
  return vocabulary(np.random.default_rng(EVAL_SEED), letters, num_classes)


def training_vocabulary(num_classes: int) -> Vocabulary:
  """The training pool of `num_classes` classes in lowercase ASCII letters, sharing no word with
  the evaluation's datasets of 2 to `EVAL_CLASSES` classes.

  Raises ValueError when the letters make too few words.
  """
  held_out = frozenset().union(
      *(eval_vocabulary(_LETTERS, k).words for k in range(2, EVAL_CLASSES + 1))
  )
  return vocabulary(np.random.default_rng(TRAINING_SEED), _LETTERS, num_classes, held_out)


# The training sequences.


def bursty_sequence(
    rng: np.random.Generator, pool: Vocabulary, *, ways: int, anonymous: float, length: int
) -> tuple[str, Bool[np.ndarray, " n"], Bool[np.ndarray, " n"]]:
  """A bursty sequence of at least `length` characters (module docstring), in the synthetic
  dataset's format, and two masks of its characters: those outside the texts (where the loss is
  taken), and in each label the first character that tells it from the sequence's other labels
  (class_0[3]; the rest follows from it), where accuracy is classification accuracy.

  `ways` classes of `pool` are drawn; with probability `anonymous` their labels are anonymous
  names by a fresh permutation, else their names. The layout is one of `VARIANTS`: shuffled, every
  example's class is drawn at random; grouped, n examples of each class come first, grouped by
  class with the classes in a random order (n at random, so that the groups fill at most half the
  sequence), then examples of classes drawn at random.
  """
  fmt = Format(SYNTHETIC_INSTRUCTION, SYNTHETIC_TEMPLATE)
  chosen = rng.choice(len(pool.classes), ways, replace=False).tolist()
  if rng.random() < anonymous:
    bytes_write_all = lambda char: True
    labels = [anonymous_name(i, ways, bytes_write_all) for i in rng.permutation(ways).tolist()]
  else:
    labels = [pool.classes[c] for c in chosen]
  # The length of each label's longest prefix in common with another: where they part.
  parts = [
      max(len(os.path.commonprefix([label, other])) for j, other in enumerate(labels) if j != i)
      for i, label in enumerate(labels)
  ]
  variant = VARIANTS[int(rng.integers(len(VARIANTS)))]
  before_text, after_text = fmt.template.split("{text}")
  before_label = after_text[: -len("{label}")]
  # Every text has the same length (words of 2 syllables, 4 letters, and the spaces between).
  text_length = 5 * sum(TEXT_WORDS) - 1
  shortest = len(before_text + before_label + variant.delimiter) + text_length
  fits = (length - len(fmt.instruction)) // (shortest + min(map(len, labels))) + 1
  order: list[int] = []
  if variant.grouped:
    shots = int(rng.integers(1, max(1, fits // (2 * ways)) + 1))
    order = [c for c in rng.permutation(ways).tolist() for _ in range(shots)]
  pieces = [(fmt.instruction + "\n", False, -1)]
  size, examples = len(pieces[0][0]), 0
  while size < length:
    c = order[examples] if examples < len(order) else int(rng.integers(ways))
    examples += 1
    keywords = pool.keywords[chosen[c]]
    for piece in (
        (before_text, False, -1),
        (draw_text(rng, keywords, pool.noise), True, -1),
        (before_label, False, -1),
        (labels[c], False, parts[c]),
        (variant.delimiter, False, -1),
    ):
      pieces.append(piece)
      size += len(piece[0])
  text = "".join(p for p, _, _ in pieces)
  in_text = np.concatenate([np.full(len(p), t) for p, t, _ in pieces])
  answers = np.concatenate([np.arange(len(p)) == part for p, _, part in pieces])
  return text, ~in_text, answers
