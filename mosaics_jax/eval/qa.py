"""Question answering over documents: RULER's qa_1 (SQuAD v2) and qa_2 (HotpotQA), and synthetic_qa.

As RULER builds its `qa` task (NVIDIA/RULER, Apache-2.0: `scripts/data/synthetic/qa.py`, the
template of `scripts/data/synthetic/constants.py`, scored as in `scripts/eval/synthetic/`), a
prompt is RULER's QA template (with the "base" model template: no chat wrapper, the answer prefix
" Answer:" appended) around numbered documents, "Document {i}:\\n{document}" joined by blank
lines, followed by the question. The documents are the question's gold ones plus distractors, as
many as fit in `length` tokens with the 32 tokens the model generates (the number found by
search); a prediction scores when it contains any reference answer (`string_match_part`).

- qa_1 reads SQuAD v2's dev file (dev-v2.0.json) as RULER does: the documents are its distinct
  paragraphs, sorted; the questions are the answerable ones, in file order (example i asks the i-th
  one); a question's gold document is its paragraph, and the first distractors are drawn from the
  other paragraphs of its article, then from the rest.
- qa_2 reads HotpotQA's dev file, distractor setting (hotpot_dev_distractor_v1.json), as RULER
  does: a document is a paragraph's title, a newline and its sentences joined; a question's gold
  documents are all of its context's paragraphs (supporting ones and the dataset's distractors).
- synthetic_qa asks the same way about generated facts ("The capital of Pelamo is Kirute.") on
  made-up names, so that storing new knowledge can be measured without a download: each document
  states facts about one entity, each value occurs once in the prompt.

RULER shuffles the documents of every prompt with a generator seeded by the run's seed alone
(`random.Random(seed).shuffle`): qa_1 and qa_2 do the same. The dev sets are not redistributable:
the user gives their path (settings field `path`).

Where this differs from RULER: distractors are drawn per example (RULER draws them in sequence
from one generator, so example i depends on those before it); a length that would hold every
document of the file is an error (RULER repeats the documents); a prompt's documents are the most
that fit for each example (RULER searches once, then drops documents 10 at a time); synthetic_qa
shuffles per example (its documents are of about one length, so RULER's shuffle would put every
gold document at one depth); a reference the tokenizer cannot write in full is dropped, and a
question left without references is skipped; references are stripped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mosaics_jax import tokenizers
from mosaics_jax.eval import prompts, scoring

# RULER's `qa` task (scripts/data/synthetic/constants.py) with its answer prefix.
TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output"
    " any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question"
    " based on the given documents. Only give me the answer and do not output any other"
    " words.\n\nQuestion: {query} Answer:"
)
DOCUMENT_TEMPLATE = "Document {i}:\n{document}"
DOCUMENT_SEPARATOR = "\n\n"
TOKENS_TO_GENERATE = 32

# synthetic_qa's facts: "The {attribute} of {entity} is {value}."
_FACT = "The {attribute} of {entity} is {value}."
_QUESTION = "What is the {attribute} of {entity}?"
_ATTRIBUTES = (
    "capital",
    "largest river",
    "highest mountain",
    "oldest city",
    "chief port",
    "currency",
    "national bird",
    "national flower",
    "national dish",
    "main export",
    "state religion",
    "official language",
)
# Consecutive rejected names after which the pool of names counts as spent.
_MAX_DRAWS = 1000

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    " sixteen seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


@dataclasses.dataclass(frozen=True)
class Task:
  """A QA task: its settings, how many tokens the model generates, and its metric."""

  name: str
  settings_class: type
  tokens_to_generate: int
  metric: str


@dataclasses.dataclass(frozen=True)
class QaSettings:
  """qa_1 and qa_2: `path` is the dev file (SQuAD v2 for qa_1, HotpotQA distractor for qa_2)."""

  path: str | None = None


@dataclasses.dataclass(frozen=True)
class SyntheticQaSettings:
  """synthetic_qa: facts stated by each document (each about one entity, one fact per attribute),
  and the length of names (entities and values) in consonant-vowel syllables."""

  facts_per_document: int = 4
  name_syllables: int = 3

  def __post_init__(self):
    if not 1 <= self.facts_per_document <= len(_ATTRIBUTES):
      raise ValueError(
          f"facts_per_document must be in [1, {len(_ATTRIBUTES)}] (one per attribute), got"
          f" {self.facts_per_document}"
      )
    if self.name_syllables < 1:
      raise ValueError(f"name_syllables must be at least 1, got {self.name_syllables}")


TASKS = {
    name: Task(name, settings, TOKENS_TO_GENERATE, "string_match_part")
    for name, settings in (
        ("qa_1", QaSettings),
        ("qa_2", QaSettings),
        ("synthetic_qa", SyntheticQaSettings),
    )
}


def generate(
    name: str,
    settings: QaSettings | SyntheticQaSettings,
    *,
    tokenizer: tokenizers.Tokenizer,
    length: int,
    num_examples: int,
    seed: int,
) -> list[scoring.Example]:
  """`num_examples` prompts of task `name`, each with its prompt tokens plus the tokens to generate
  at most `length`; example i depends on `seed` and i only."""
  if name not in TASKS:
    raise ValueError(f"unknown QA task {name!r}; known: {sorted(TASKS)}")
  if not isinstance(settings, TASKS[name].settings_class):
    raise TypeError(f"{name} takes {TASKS[name].settings_class.__name__}, not {settings!r}")
  if num_examples < 0:
    raise ValueError(f"num_examples must be non-negative, got {num_examples}")
  writer = _Writer(tokenizer, length)
  if isinstance(settings, SyntheticQaSettings):
    names = _Names.of(writer.alphabet, settings.name_syllables)
    return [_synthetic_example(writer, names, settings, seed, i) for i in range(num_examples)]
  kind, file, read = _DEV_FILES[name]
  if settings.path is None:
    raise ValueError(f"{name} reads {kind}'s {file}, which is not redistributable: set path=...")
  dataset = _load(settings.path, kind, read)
  # Questions whose answers this tokenizer cannot write are skipped, before numbering examples.
  asked = [
      (q, refs) for q in dataset.questions if (refs := _references(writer.alphabet, q.answers))
  ]
  if num_examples > len(asked):
    raise ValueError(
        f"{settings.path} has {len(asked)} questions with answers this tokenizer writes, fewer"
        f" than the {num_examples} examples asked"
    )
  document = functools.cache(lambda d: writer.alphabet.fit(dataset.documents[d]))
  examples = []
  for i, (question, references) in enumerate(asked[:num_examples]):
    order = _documents_order(question, len(dataset.documents), np.random.default_rng([seed, i]))
    prompt = writer.prompt(
        writer.alphabet.fit(question.question),
        lambda j, order=order: document(order[j]),
        gold=len(question.gold),
        available=len(order),
        shuffle_seed=seed,
        where=f"{name} example {i}",
    )
    examples.append(scoring.Example(prompt, references))
  return examples


class _Writer:
  """Writes prompts in the characters of a tokenizer and fills a length with documents."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, length: int):
    self.alphabet = prompts.Alphabet(tokenizer)
    self.length = length
    # Documents recur across a run's examples and headers across its prompts: counted once.
    self.tokens = functools.cache(functools.partial(prompts.count_tokens, tokenizer))
    self.header = functools.cache(self._header)
    self.separator = self.alphabet.fit(DOCUMENT_SEPARATOR)

  def _header(self, i: int) -> str:
    number = str(i) if self.alphabet.digits else _in_words(i)
    return _fill(DOCUMENT_TEMPLATE, self.alphabet, i=number, document="")

  def assemble(self, question: str, documents: Sequence[str]) -> str:
    context = self.separator.join(self.header(i + 1) + d for i, d in enumerate(documents))
    return _fill(TEMPLATE, self.alphabet, context=context, query=question)

  def prompt(
      self,
      question: str,
      document: Callable[[int], str],
      *,
      gold: int,
      available: int | None,
      shuffle_seed: int,
      where: str,
  ) -> str:
    """The prompt with the most of the documents `document(0), document(1), ...` that fit, at
    least the `gold` first ones, shuffled by `random.Random(shuffle_seed)` as RULER does.

    `available` is how many documents there are (None: no end); using all of them is an error,
    since the length asks for more.
    """

    def prompt_of(k: int) -> str:
      documents = [document(j) for j in range(k)]
      random.Random(shuffle_seed).shuffle(documents)
      return self.assemble(question, documents)

    def needed(k: int) -> int:
      return prompts.count_tokens(self.alphabet.tokenizer, prompt_of(k)) + TOKENS_TO_GENERATE

    fits = lambda k: needed(k) <= self.length
    if not fits(gold):
      raise ValueError(
          f"length {self.length} is too small for {where}: its prompt with only its {gold} gold"
          f" document(s) and the {TOKENS_TO_GENERATE} tokens to generate take {needed(gold)} tokens"
      )
    # Each document takes a token at least, so `length` bounds the count where nothing else does.
    most = self.length if available is None else available
    count = prompts.largest_fitting(fits, gold, most, self._estimate(question, document, available))
    if count == available:
      raise ValueError(
          f"{where}: all {available} documents of the file fit in length {self.length}: the file"
          " has too few documents for this length"
      )
    return prompt_of(count)

  def _estimate(self, question: str, document: Callable[[int], str], available: int | None) -> int:
    """The most documents that fit when a prompt's tokens are its parts' tokens, which they are
    for characters and bytes and about are for subwords: where the search starts."""
    total = self.tokens(self.assemble(question, [])) + TOKENS_TO_GENERATE
    count = 0
    while available is None or count < available:
      total += self.tokens(self.header(count + 1)) + self.tokens(document(count))
      total += self.tokens(self.separator) if count else 0
      if total > self.length:
        break
      count += 1
    return count


def _fill(template: str, alphabet: prompts.Alphabet, **fields: str) -> str:
  """`template.format(**fields)` with the template's own text fit to `alphabet` (its fields are
  already, and the braces of its fields may not be writable)."""
  parts = string.Formatter().parse(template)
  return "".join(
      alphabet.fit(text) + ("" if field is None else fields[field]) for text, field, _, _ in parts
  )


def _in_words(n: int) -> str:
  """`n` >= 0 in English words: document numbers for tokenizers without digits."""
  if n < 20:
    return _ONES[n]
  if n < 100:
    tens, ones = divmod(n, 10)
    return _TENS[tens - 2] + (f" {_ONES[ones]}" if ones else "")
  size, word = (100, "hundred") if n < 1000 else (1000, "thousand")
  head, rest = divmod(n, size)
  return f"{_in_words(head)} {word}" + (f" {_in_words(rest)}" if rest else "")


def _references(alphabet: prompts.Alphabet, answers: Sequence[str]) -> tuple[str, ...]:
  """The distinct answers as the prompt writes them. An answer that would lose a letter or digit
  is dropped: what is left of it (a year without its digits) could match unrelated text."""
  kept = (
      alphabet.fit(a).strip() for a in answers if all(alphabet.fit(c) for c in a if c.isalnum())
  )
  return tuple(dict.fromkeys(a for a in kept if a))


# Dev files.


@dataclasses.dataclass(frozen=True)
class _Question:
  """A question with its answers, the documents that answer it (RULER's "context") and the
  distractors drawn first (RULER's "more_context": the other paragraphs of a SQuAD article)."""

  question: str
  answers: tuple[str, ...]
  gold: tuple[int, ...]
  nearby: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Dataset:
  documents: tuple[str, ...]
  questions: tuple[_Question, ...]


class _FormatError(Exception):
  """What is wrong where in a dev file; `_load` names the file."""


def _load(path: str, kind: str, read: Callable[[Any], _Dataset]) -> _Dataset:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not a {kind} file: it is not JSON ({e})") from None
  try:
    return read(data)
  except _FormatError as e:
    raise ValueError(f"{path} is not a {kind} file: {e}") from None


def _get(item: Any, key: str, kind: type, where: str) -> Any:
  """`item[key]`, checked to be a `kind` in a JSON object."""
  if not isinstance(item, dict):
    raise _FormatError(f"{where} is {type(item).__name__}, expected dict")
  if key not in item:
    raise _FormatError(f"{where} has no {key!r}")
  if not isinstance(item[key], kind):
    raise _FormatError(f"{where}[{key!r}] is {type(item[key]).__name__}, expected {kind.__name__}")
  return item[key]


def _read_squad(data: Any) -> _Dataset:
  """SQuAD v2 as RULER reads it: answerable questions; documents are the distinct paragraphs."""
  articles = []  # Per article, its paragraphs: (context, [(question, answers)]).
  for a, article in enumerate(_get(data, "data", list, "the top level")):
    paragraphs = []
    for p, paragraph in enumerate(_get(article, "paragraphs", list, f"data[{a}]")):
      where = f"data[{a}].paragraphs[{p}]"
      qas = []
      for q, qa in enumerate(_get(paragraph, "qas", list, where)):
        at = f"{where}.qas[{q}]"
        question = _get(qa, "question", str, at)
        if not _get(qa, "is_impossible", bool, at):
          answers = _get(qa, "answers", list, at)
          texts = tuple(_get(x, "text", str, f"{at}.answers[{n}]") for n, x in enumerate(answers))
          qas.append((question, texts))
      paragraphs.append((_get(paragraph, "context", str, where), qas))
    articles.append(paragraphs)
  documents = tuple(sorted({context for paragraphs in articles for context, _ in paragraphs}))
  index = {d: i for i, d in enumerate(documents)}
  questions = []
  for paragraphs in articles:
    article = tuple(dict.fromkeys(index[context] for context, _ in paragraphs))
    for context, qas in paragraphs:
      gold = index[context]
      nearby = tuple(d for d in article if d != gold)
      questions += [_Question(q, answers, (gold,), nearby) for q, answers in qas]
  return _Dataset(documents, tuple(questions))


def _read_hotpotqa(data: Any) -> _Dataset:
  """HotpotQA as RULER reads it: a question's documents are its context's paragraphs."""
  if not isinstance(data, list):
    raise _FormatError(f"the top level is {type(data).__name__}, expected list")
  items = []  # (question, answer, paragraphs)
  for n, item in enumerate(data):
    paragraphs = []
    for c, pair in enumerate(_get(item, "context", list, f"[{n}]")):
      if not (
          isinstance(pair, list)
          and len(pair) == 2
          and isinstance(pair[0], str)
          and isinstance(pair[1], list)
          and all(isinstance(s, str) for s in pair[1])
      ):
        raise _FormatError(f"[{n}]['context'][{c}] is not a [title, [sentences]] pair")
      paragraphs.append(f"{pair[0]}\n{''.join(pair[1])}")
    question, answer = (_get(item, key, str, f"[{n}]") for key in ("question", "answer"))
    items.append((question, answer, paragraphs))
  documents = tuple(sorted({d for _, _, paragraphs in items for d in paragraphs}))
  index = {d: i for i, d in enumerate(documents)}
  questions = tuple(
      _Question(q, (answer,), tuple(dict.fromkeys(index[d] for d in paragraphs)))
      for q, answer, paragraphs in items
  )
  return _Dataset(documents, questions)


_DEV_FILES = {
    "qa_1": ("SQuAD v2", "dev-v2.0.json", _read_squad),
    "qa_2": ("HotpotQA", "hotpot_dev_distractor_v1.json", _read_hotpotqa),
}


def _documents_order(question: _Question, count: int, rng: np.random.Generator) -> list[int]:
  """The question's documents in the order a prompt takes them: its gold ones, then the nearby ones
  in random order, then the rest in random order. A prompt of k documents takes the first k: the
  distractors RULER samples, drawn so that more documents only add to fewer."""
  taken = set(question.gold) | set(question.nearby)
  rest = [d for d in rng.permutation(count).tolist() if d not in taken]
  return [*question.gold, *rng.permutation(list(question.nearby)).tolist(), *rest]


# synthetic_qa.


@dataclasses.dataclass(frozen=True)
class _Names:
  """Distinct made-up names of consonant-vowel syllables in letters the tokenizer writes.

  A name is never inside a word of the prompt's fixed text, and names are all of one length, so a
  name occurs in a prompt only where it is written.
  """

  consonants: str
  vowels: str
  syllables: int
  capitalize: bool
  reserved: str

  @classmethod
  def of(cls, alphabet: prompts.Alphabet, syllables: int) -> _Names:
    letters = alphabet.lowercase
    vowels = "".join(c for c in letters if c in "aeiou")
    consonants = "".join(c for c in letters if c not in "aeiouy")
    if not vowels or not consonants:
      raise ValueError(
          f"synthetic_qa needs vowels and consonants the tokenizer writes: {letters!r}"
      )
    capitalize = all(alphabet.writes(c.upper()) for c in consonants)
    fixed = (TEMPLATE, DOCUMENT_TEMPLATE, _FACT, _QUESTION, *_ATTRIBUTES, *_ONES, *_TENS)
    reserved = " ".join((*fixed, "hundred thousand")).lower()
    return cls(consonants, vowels, syllables, capitalize, reserved)

  def draw(self, rng: np.random.Generator, used: set[str]) -> str:
    """A name not in `used` (lowercase names), which it joins."""
    for _ in range(_MAX_DRAWS):
      c = rng.integers(len(self.consonants), size=self.syllables)
      v = rng.integers(len(self.vowels), size=self.syllables)
      name = "".join(self.consonants[i] + self.vowels[j] for i, j in zip(c, v))
      if name not in used and name not in self.reserved:
        used.add(name)
        return name.capitalize() if self.capitalize else name
    raise ValueError(
        f"synthetic_qa ran out of distinct names of {self.syllables} syllables: raise"
        " name_syllables or lower the length"
    )


def _synthetic_example(
    writer: _Writer, names: _Names, settings: SyntheticQaSettings, seed: int, index: int
) -> scoring.Example:
  rng = np.random.default_rng([seed, index, 0])
  used: set[str] = set()

  def new_document() -> tuple[str, list[tuple[str, str, str]]]:
    # One entity per document: no two documents state the same entity's attribute.
    entity = names.draw(rng, used)
    chosen = rng.choice(len(_ATTRIBUTES), settings.facts_per_document, replace=False)
    facts = [(_ATTRIBUTES[a], entity, names.draw(rng, used)) for a in chosen]
    text = " ".join(_FACT.format(attribute=a, entity=e, value=v) for a, e, v in facts)
    return writer.alphabet.fit(text), facts

  gold, facts = new_document()
  attribute, entity, value = facts[rng.integers(len(facts))]
  documents = [gold]

  def document(j: int) -> str:
    while len(documents) <= j:
      documents.append(new_document()[0])
    return documents[j]

  prompt = writer.prompt(
      writer.alphabet.fit(_QUESTION.format(attribute=attribute, entity=entity)),
      document,
      gold=1,
      available=None,
      shuffle_seed=int(np.random.default_rng([seed, index, 1]).integers(2**63)),
      where=f"synthetic_qa example {index}",
  )
  return scoring.Example(prompt, (value,))
