"""RULER's synthetic long-context tasks, generated locally for any tokenizer and prompt length.

RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?"; github.com/NVIDIA/RULER, Apache-2.0) hides facts in a long haystack and asks for them
back. This module regenerates its synthetic tasks from their definitions (no RULER code is used):

- `niah_single`, `niah_multikey`, `niah_multivalue`, `niah_multiquery`: needles "One of the special
  magic numbers for KEY is: VALUE." in an essay, in repeated noise or among distractor needles; the
  model names the values of the keys asked for (`scripts/data/synthetic/niah.py`).
- `vt`: chains of variable assignments "VAR B = VAR A" hidden in noise; the model names every
  variable that holds the value asked for (`scripts/data/synthetic/variable_tracking.py`).
- `cwe`: a numbered list of words where a few are repeated more often; the model names them
  (`scripts/data/synthetic/common_words_extraction.py`).
- `fwe`: coded words drawn from a Zipf distribution; the model names the three most frequent
  (`scripts/data/synthetic/freq_words_extraction.py`).

What is RULER's, reproduced exactly: the task templates and answer prefixes
(`scripts/data/synthetic/constants.py`, joined as `scripts/data/prepare.py` does under the "base"
model template of `scripts/data/template.py`, i.e. without a chat wrapper); the needle sentence,
the noise sentence, the singular rewording of a one-answer NIAH prompt and the 40 insertion depths
(`niah.py`; the noise and depths also in `variable_tracking.py`); the chain lines, 5-letter variable
names, 5-digit values and the one solved example (`variable_tracking.py`); the cwe list format,
its one few-shot example and its smaller repetition counts below 4096 tokens
(`common_words_extraction.py`); the fwe vocabulary of 6-letter coded words, `(length - 50) // 50` of
them, its counts `floor(n * k**-alpha / zeta(alpha))` and the top word made the noise "..."
(`freq_words_extraction.py`); the settings' defaults (`scripts/synthetic.yaml`: niah_single_2,
niah_multikey_1, niah_multivalue, niah_multiquery, vt, cwe, fwe); the generation budgets
(`constants.py`); and the metric, string_match_all (`scripts/eval/synthetic/constants.py`,
`scoring.py` here). Like RULER, the haystack's size is the largest (found by search) whose prompt
plus the task's generation budget fits `length` tokens, and an example that comes out too long is
shrunk.

What differs, and why:
- Essays are a user's text (`haystack`) instead of Paul Graham's, cut into sentences at ". ", "? "
  and "! " (RULER uses NLTK's punkt); a text too short for `length` is an error, not repeated.
- Prompts fit the tokenizer (`prompts.Alphabet`): templates and haystack lose the characters it
  cannot write (a model trained on tinyshakespeare has no digits but '3', no '=' and no '"').
  Without digits, RULER's numbers (7-digit NIAH values, 5-digit vt values) are random lowercase
  strings of the same length, UUIDs are 32 random lowercase letters in UUID groups, and cwe's list
  is unnumbered ("apple. pear." for "1. apple 2. pear"). RULER's "words" keys and values
  (wonderwords' adjective-noun pairs) are pairs from this module's own lists, and cwe's words
  (wonderwords, then a large English list) are this module's nouns and adjectives, then random
  3-syllable words when an example needs more distinct words than that.
- Every NIAH key and value, vt variable and value, and fwe coded word is redrawn until it occurs
  nowhere else in the prompt, so an answer occurs exactly once in its context (RULER does not
  check). RULER's shuffles that reuse one fixed seed (the needles' order, cwe's list, fwe's text)
  and its one vt solved example (re-lettered per example) are drawn anew for each example.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np

from mosaics_jax import config, tokenizers
from mosaics_jax.eval import prompts, scoring

# --- RULER's text (see the module docstring for the file each comes from). ---

_NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to"
    " memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all"
    " the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
_NIAH_ANSWER_PREFIX = (
    " The special magic {type_needle_v} for {query} mentioned in the provided text are"
)
# A prompt with one answer is reworded: these replacements, in order, and the kind made singular.
_NIAH_SINGULAR = (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer"))
_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
_VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables"
    " are assigned the value {query}, they are: "
)
_VT_FIRST = "VAR {name} = {value}"
_VT_HOP = "VAR {name} = VAR {previous} "  # RULER's trailing space kept.
_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others."
    " Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common"
    " words in the above list?"
)
_CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most"
    " frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please"
    " ignore the dots '....'. What are the three most frequently appeared words in the above coded"
    " text?"
)
_FWE_ANSWER_PREFIX = (
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)
_FWE_NOISE = "..."
# Insertion depths into an essay, in percent of its sentences: each used at most once per prompt.
_DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))
_NIAH_NUMBER_DIGITS = 7
_VT_NAME_LETTERS, _VT_FEWSHOT_NAME_LETTERS, _VT_VALUE_DIGITS = 5, 3, 5
_VT_FEWSHOT_TOKENS = 500  # The solved example's prompt budget, in tokens.
_VT_FEWSHOT_MAX_HOPS = 10
_CWE_SHORT = 4096  # Below this length RULER's cwe uses these counts, not the settings'.
_CWE_SHORT_FREQS = (6, 1)  # (common, other) repeats.
# Few-shot lists: (distinct words, (common, other) repeats), below and from _CWE_SHORT.
_CWE_SHORT_FEWSHOT, _CWE_LONG_FEWSHOT = (20, (3, 1)), (40, (10, 3))
_FWE_ANSWERS = 3

# --- This module's own words (for RULER's wonderwords lists). ---

_NOUNS = tuple("""
    acorn almond anchor apple badger balloon banjo barrel basket beacon beetle biscuit blanket
    blossom bottle bramble bridge bucket buffalo button cabbage camel candle canyon carpet carrot
    castle cellar cherry chimney circus cobweb comet compass cookie copper cottage cricket crystal
    cushion dagger desert diamond dolphin donkey dragon eagle elephant engine falcon feather fiddle
    forest fountain garden giraffe glacier goblet gravel guitar hammer harbor helmet hermit honey
    island jacket jungle kettle kitten ladder lantern lemon lizard lobster magnet mango marble
    meadow mirror monkey mountain muffin needle nickel oyster paddle palace panther parrot pebble
    pencil pepper pillow pirate planet pocket potato puppet pyramid rabbit raven ribbon river rocket
    saddle salmon sandal satchel shovel signal spider squirrel statue sugar summit sunset teapot
    temple thimble ticket tiger timber tomato tractor trumpet tunnel turnip turtle umbrella valley
    violin volcano wagon walnut walrus whistle window wizard zebra orchard harp meteor pumpkin
    saucer sparrow tulip vulture willow yacht quilt napkin
    """.split())
_ADJECTIVES = tuple("""
    ancient angry bitter brave breezy bright broken bumpy calm careful cheerful chilly clever
    cloudy clumsy crispy crooked curious dainty damp dusty eager early elegant empty fancy fierce
    fluffy foggy fragile frosty fuzzy gentle giant glossy golden graceful grumpy hairy handsome
    happy hasty heavy hollow humble hungry icy jolly keen lazy lively lonely loud lucky mellow merry
    misty modern muddy narrow nervous noisy odd orange patient plain polite proud purple quick quiet
    rapid rare rusty salty scarlet shaggy shiny silent silky sleepy slender smooth snowy soft sour
    sparkly spicy stormy sturdy sunny swift tender tidy tiny tough vivid warm wealthy wide wild
    windy witty wooden yellow young zesty
    """.split())
# cwe's words: none inside another, so that a word named finds only itself in a scored prediction.
_CWE_WORDS = tuple(
    w
    for w in sorted(set(_NOUNS + _ADJECTIVES))
    if not any(w != other and w in other for other in _NOUNS + _ADJECTIVES)
)
# Syllables of the coined words cwe uses past its list: consonant then vowel.
_CONSONANTS, _VOWELS, _SYLLABLES = "bdfgklmnprstvz", "aeiou", 3

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TRIES = 100  # Draws of a string (or an example) before giving up on making it unique.
_SEARCH, _EXAMPLES, _FEWSHOT_SEARCH = 0, 1, 2  # Streams of random numbers under a seed.

# --- Settings. ---


class _Settings:
  """Checks the fields' types and choices (`config.check_types`), then their ranges."""

  def __post_init__(self):
    config.check_types(self)
    self._check_ranges()

  def _check_ranges(self) -> None:
    raise NotImplementedError


def _at_least(settings: Any, name: str, low: float) -> None:
  value = getattr(settings, name)
  if value < low:
    raise config.ConfigError(f"{type(settings).__name__}.{name} must be >= {low}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NiahSettings(_Settings):
  """RULER's needle-in-a-haystack knobs (`niah.py`); the defaults are niah_single_2's."""

  type_haystack: Literal["essay", "noise", "needle"] = "essay"  # Needle: distractor needles.
  type_needle_k: Literal["words", "numbers", "uuids"] = "words"
  type_needle_v: Literal["numbers", "uuids", "words"] = "numbers"
  num_needle_k: int = 1  # Keys with needles; RULER raises it to num_needle_q.
  num_needle_v: int = 1  # Needles (values) per key.
  num_needle_q: int = 1  # Keys asked for.

  @property
  def num_keys(self) -> int:
    return max(self.num_needle_k, self.num_needle_q)

  def _check_ranges(self) -> None:
    for name in ("num_needle_k", "num_needle_v", "num_needle_q"):
      _at_least(self, name, 1)
    needles = self.num_keys * self.num_needle_v
    if self.type_haystack == "essay" and needles > len(_DEPTHS):
      raise config.ConfigError(
          f"{type(self).__name__}.num_needle_v: an essay holds at most {len(_DEPTHS)} needles"
          f" (RULER's depths), got max(num_needle_k, num_needle_q) * num_needle_v = {needles}"
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class NiahSingleSettings(NiahSettings):
  """niah_single: RULER's niah_single_2 (one key, one number, in an essay). niah_single_1 is
  type_haystack="noise"; niah_single_3 is type_needle_v="uuids"."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class NiahMultikeySettings(NiahSettings):
  """niah_multikey: RULER's niah_multikey_1 (four keys in an essay, one asked for). niah_multikey_2
  is num_needle_k=1 among distractor needles (type_haystack="needle"); niah_multikey_3 is that with
  type_needle_k="uuids" and type_needle_v="uuids"."""

  num_needle_k: int = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class NiahMultivalueSettings(NiahSettings):
  """niah_multivalue: RULER's niah_multivalue (one key with four numbers, in an essay)."""

  num_needle_v: int = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class NiahMultiquerySettings(NiahSettings):
  """niah_multiquery: RULER's niah_multiquery (four keys in an essay, all four asked for)."""

  num_needle_q: int = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class VTSettings(_Settings):
  """RULER's variable tracking knobs (`variable_tracking.py`); the defaults are vt's."""

  type_haystack: Literal["noise", "essay"] = "noise"
  num_chains: int = 1  # Chains of assignments; the first one's value is asked for.
  num_hops: int = 4  # Assignments after the first in a chain: num_hops + 1 variables answer.
  # RULER prepends one solved example (3-letter names, at most 10 hops, a 500-token prompt).
  add_fewshot: bool = True

  def _check_ranges(self) -> None:
    _at_least(self, "num_chains", 1)
    _at_least(self, "num_hops", 1)
    lines = self.num_chains * (self.num_hops + 1)
    if self.type_haystack == "essay" and lines > len(_DEPTHS):
      raise config.ConfigError(
          f"{type(self).__name__}.num_hops: an essay holds at most {len(_DEPTHS)} assignments"
          f" (RULER's depths), got num_chains * (num_hops + 1) = {lines}"
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CWESettings(_Settings):
  """RULER's common words extraction knobs (`common_words_extraction.py`); the defaults are cwe's.

  Below 4096 tokens RULER lists the common words 6 times and the others once, whatever
  freq_cw and freq_ucw say, and its few-shot examples are smaller; so does this module.
  """

  freq_cw: int = 30  # Repeats of each common word.
  freq_ucw: int = 3  # Repeats of each other word.
  num_cw: int = 10  # Common words, the answers.
  num_fewshot: int = 1  # Solved examples before the question.

  def _check_ranges(self) -> None:
    _at_least(self, "freq_ucw", 1)
    _at_least(self, "freq_cw", self.freq_ucw + 1)
    _at_least(self, "num_cw", 1)
    _at_least(self, "num_fewshot", 0)
    shot_words = _CWE_SHORT_FEWSHOT[0]
    if self.num_fewshot and self.num_cw >= shot_words:
      raise config.ConfigError(
          f"{type(self).__name__}.num_cw must be < {shot_words} with few-shot examples (RULER's"
          f" shortest lists {shot_words} words), got {self.num_cw}"
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class FWESettings(_Settings):
  """RULER's frequent words extraction knobs (`freq_words_extraction.py`); defaults are fwe's."""

  alpha: float = 2.0  # Exponent of the Zipf (zeta) distribution of word counts.
  coded_wordlen: int = 6  # Letters of a coded word.
  vocab_size: int | None = None  # Coded words; None is RULER's (length - 50) // 50.

  def _check_ranges(self) -> None:
    if not self.alpha > 1:
      raise config.ConfigError(
          f"{type(self).__name__}.alpha must be > 1 (zeta(alpha) is finite), got {self.alpha}"
      )
    _at_least(self, "coded_wordlen", 1)
    if self.vocab_size is not None:
      _at_least(self, "vocab_size", _FWE_ANSWERS + 1)


Settings = NiahSettings | VTSettings | CWESettings | FWESettings


# --- Tasks. ---


@dataclasses.dataclass(frozen=True)
class Task:
  """A RULER task: its settings, generation budget, metric, and whether it reads an essay."""

  name: str
  settings_class: type
  tokens_to_generate: int
  metric: str  # A key of scoring.METRICS.
  needs_haystack: Callable[[Any], bool]


def _reads_essay(settings: NiahSettings | VTSettings) -> bool:
  return settings.type_haystack == "essay"


def _reads_nothing(settings: CWESettings | FWESettings) -> bool:
  del settings
  return False


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("niah_single", NiahSingleSettings, 128, "string_match_all", _reads_essay),
        Task("niah_multikey", NiahMultikeySettings, 128, "string_match_all", _reads_essay),
        Task("niah_multivalue", NiahMultivalueSettings, 128, "string_match_all", _reads_essay),
        Task("niah_multiquery", NiahMultiquerySettings, 128, "string_match_all", _reads_essay),
        Task("vt", VTSettings, 30, "string_match_all", _reads_essay),
        Task("cwe", CWESettings, 120, "string_match_all", _reads_nothing),
        Task("fwe", FWESettings, 50, "string_match_all", _reads_nothing),
    )
}


def generate(
    name: str,
    settings: Settings,
    *,
    tokenizer: tokenizers.Tokenizer,
    length: int,
    num_examples: int,
    seed: int,
    haystack: str | None = None,
) -> list[scoring.Example]:
  """`num_examples` examples of task `name` whose prompts take at most `length` minus the task's
  generation budget tokens of `tokenizer`, and about that many.

  `haystack` is the text essays are cut from (read when `TASKS[name].needs_haystack(settings)`).
  Example i depends only on (name, settings, tokenizer, length, seed, haystack, i).

  Raises ValueError when `length` is too small for the task's shortest prompt, when the haystack
  is missing or too short to fill `length`, or when an argument is out of range.
  """
  if name not in TASKS:
    raise ValueError(f"unknown RULER task {name!r}; known: {', '.join(TASKS)}")
  task = TASKS[name]
  if not isinstance(settings, task.settings_class):
    raise TypeError(f"{name} takes {task.settings_class.__name__}, got {type(settings).__name__}")
  for arg, value in (("length", length), ("num_examples", num_examples), ("seed", seed)):
    if value < 0:
      raise ValueError(f"{arg} must be >= 0, got {value}")
  alphabet = prompts.Alphabet(tokenizer)
  words = None
  if task.needs_haystack(settings):
    if haystack is None:
      raise ValueError(f"{name} with type_haystack='essay' reads a haystack text: pass haystack=")
    words = tuple(alphabet.fit(haystack).split())
  setup = _Setup(alphabet, tokenizer, _Strings.of(alphabet), length, seed, words)
  builder = _BUILDERS[name](settings, setup)
  budget = length - task.tokens_to_generate
  fits = lambda prompt: prompts.count_tokens(tokenizer, prompt) <= budget

  def too_small(prompt: str) -> ValueError:
    return ValueError(
        f"length {length} is too small for {name}: its shortest prompt ({builder.min_size}"
        f" {builder.unit}) has {prompts.count_tokens(tokenizer, prompt)} tokens, and"
        f" {task.tokens_to_generate} more are kept for the answer"
    )

  search = lambda n: builder.build(np.random.default_rng((seed, _SEARCH)), n)[0]
  if not fits(search(builder.min_size)):
    raise too_small(search(builder.min_size))
  size = prompts.largest_fitting(lambda n: fits(search(n)), builder.min_size, builder.max_size)
  if words is not None and size == len(words):
    has = prompts.count_tokens(tokenizer, " ".join(words))
    room = budget - prompts.count_tokens(tokenizer, search(size))
    raise ValueError(
        f"the haystack is too short for {name} at length {length}: it has {has} tokens of this"
        f" tokenizer, about {has + room} are needed"
    )

  examples = []
  for index in range(num_examples):
    rng = np.random.default_rng((seed, _EXAMPLES, index))
    used = size
    prompt, answers = builder.build(rng, used)
    # A draw may tokenize longer than the search's: shrink the haystack by ~1% until it fits.
    while not fits(prompt):
      if used == builder.min_size:
        raise too_small(prompt)
      used = max(builder.min_size, used - max(1, size // 100))
      prompt, answers = builder.build(rng, used)
    examples.append(scoring.Example(prompt, answers))
  return examples


# --- Text that fits the tokenizer, and random strings in it. ---


@dataclasses.dataclass(frozen=True)
class _Template:
  """A `str.format` template whose literal text (not its fields) is fitted to a tokenizer."""

  text: str
  literal: str  # The literal text, lowercased: drawn keys and values must not occur in it.

  @classmethod
  def of(cls, alphabet: prompts.Alphabet, template: str) -> _Template:
    parts, literals = [], []
    for literal, field, _, _ in string.Formatter().parse(template):
      fitted = alphabet.fit(literal)
      literals.append(fitted.lower())
      parts.append(fitted.replace("{", "{{").replace("}", "}}"))
      if field is not None:
        parts.append(f"{{{field}}}")
    return cls("".join(parts), "\n".join(literals))

  def format(self, **fields: str) -> str:
    return self.text.format(**fields)


@dataclasses.dataclass(frozen=True)
class _Strings:
  """Random keys, values and words in characters the tokenizer writes."""

  uppercase: str  # vt's variable names: uppercase as RULER's, or lowercase if it writes none.
  digits: bool
  dash: str  # Joins a word pair and UUID groups: "-", or " " if the tokenizer has no dash.

  @classmethod
  def of(cls, alphabet: prompts.Alphabet) -> _Strings:
    if alphabet.lowercase != string.ascii_lowercase:
      raise ValueError(
          "RULER's tasks need a tokenizer that writes the 26 lowercase ASCII letters; this one"
          f" writes {alphabet.lowercase!r}"
      )
    upper = string.ascii_uppercase
    return cls(
        uppercase=upper if alphabet.writes_all(upper) else string.ascii_lowercase,
        digits=alphabet.digits,
        dash="-" if alphabet.writes("-") else " ",
    )

  def letters(
      self, rng: np.random.Generator, count: int, chars: str = string.ascii_lowercase
  ) -> str:
    return "".join(chars[i] for i in rng.integers(len(chars), size=count).tolist())

  def number(self, rng: np.random.Generator, digits: int) -> str:
    """A random `digits`-digit number, or as many random letters if the tokenizer lacks digits."""
    if self.digits:
      return str(rng.integers(10 ** (digits - 1), 10**digits))
    return self.letters(rng, digits)

  def uuid(self, rng: np.random.Generator) -> str:
    """A random version-4 UUID, or 32 random letters in its groups if the tokenizer lacks digits."""
    if self.digits:
      text = str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))
    else:
      text = "-".join(self.letters(rng, n) for n in (8, 4, 4, 4, 12))
    return text.replace("-", self.dash)

  def word(self, rng: np.random.Generator) -> str:
    """An adjective-noun pair, as RULER's wonderwords keys."""
    adjective = _ADJECTIVES[rng.integers(len(_ADJECTIVES))]
    return f"{adjective}{self.dash}{_NOUNS[rng.integers(len(_NOUNS))]}"

  def draw(self, rng: np.random.Generator, kind: Literal["words", "numbers", "uuids"]) -> str:
    if kind == "words":
      return self.word(rng)
    if kind == "numbers":
      return self.number(rng, _NIAH_NUMBER_DIGITS)
    return self.uuid(rng)

  def coined(self, rng: np.random.Generator, count: int, avoid: str) -> list[str]:
    """`count` distinct random consonant-vowel words of one length (so none is inside another),
    none occurring in `avoid`."""
    capacity = (len(_CONSONANTS) * len(_VOWELS)) ** _SYLLABLES
    if count > capacity // 2:
      raise ValueError(f"{count} distinct words asked for, of {capacity} possible")
    words: dict[str, None] = {}  # Ordered: the draw order decides which words are common.
    while len(words) < count:
      shape = (count - len(words), _SYLLABLES)
      consonants = rng.integers(len(_CONSONANTS), size=shape).tolist()
      vowels = rng.integers(len(_VOWELS), size=shape).tolist()
      for cs, vs in zip(consonants, vowels):
        word = "".join(_CONSONANTS[c] + _VOWELS[v] for c, v in zip(cs, vs))
        if word not in avoid:
          words[word] = None
    return list(words)[:count]

  def coded(self, rng: np.random.Generator, count: int, length: int, avoid: str) -> list[str]:
    """`count` distinct random `length`-letter words (fwe's vocabulary), none in `avoid`."""
    if count > 26**length // 2:
      raise ValueError(f"{count} distinct {length}-letter coded words asked for")
    words: dict[str, None] = {}
    while len(words) < count:
      letters = rng.integers(26, size=(count - len(words), length)).tolist()
      for word in ("".join(string.ascii_lowercase[i] for i in row) for row in letters):
        if word not in avoid:
          words[word] = None
    return list(words)[:count]


def _draw_new(draw: Callable[[], str], forbidden: str, taken: list[str]) -> str:
  """A string from `draw` that is not in `forbidden` (lowercase text of the prompt) and neither
  inside nor around a string already `taken` (lowercase; it is added), ignoring case as scoring
  does."""
  for _ in range(_TRIES):
    candidate = draw()
    low = candidate.lower()
    if low not in forbidden and not any(low in t or t in low for t in taken):
      taken.append(low)
      return candidate
  raise RuntimeError(f"no string occurring only once found in {_TRIES} draws (last: {candidate!r})")


# --- Haystacks. ---


def _insert_at_depths(rng: np.random.Generator, text: str, inserts: Sequence[str]) -> str:
  """`inserts`, in order, between the sentences of `text` at depths (percent of the sentences)
  drawn from RULER's 40 without replacement."""
  sentences = _SENTENCE_END.split(text) if text else []
  depths = rng.choice(len(_DEPTHS), size=len(inserts), replace=False)
  cuts = sorted(int(len(sentences) * (_DEPTHS[d] / 100)) for d in depths)
  pieces, start = [], 0
  for cut, insert in zip(cuts, inserts):
    pieces += sentences[start:cut]
    pieces.append(insert)
    start = cut
  return " ".join(pieces + sentences[start:])


def _insert_lines(rng: np.random.Generator, lines: list[str], inserts: Sequence[str]) -> list[str]:
  """`lines` with `inserts`, in order, each put before a distinct line drawn at random."""
  positions = np.sort(rng.choice(len(lines), size=len(inserts), replace=False))
  out, start = [], 0
  for position, insert in zip(positions.tolist(), inserts):
    out += lines[start:position]
    out.append(insert)
    start = position
  return out + lines[start:]


# --- Builders: a task's prompt and answers for a haystack of a given size. ---


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What every builder reads."""

  alphabet: prompts.Alphabet
  tokenizer: tokenizers.Tokenizer
  strings: _Strings
  length: int
  seed: int
  words: tuple[str, ...] | None  # The fitted haystack's words, when the task reads an essay.


@dataclasses.dataclass(frozen=True)
class _Builder:
  """Makes a prompt and its answers from random numbers and a haystack size in `unit`s."""

  build: Callable[[np.random.Generator, int], tuple[str, tuple[str, ...]]]
  min_size: int
  max_size: int  # The essay's words, or a bound no prompt within `length` reaches.
  unit: str


def _niah(settings: NiahSettings, setup: _Setup) -> _Builder:
  s, alphabet, strings = settings, setup.alphabet, setup.strings
  raw, kind_v = _NIAH_TEMPLATE + _NIAH_ANSWER_PREFIX, s.type_needle_v
  if s.num_needle_q * s.num_needle_v == 1:
    for old, new in _NIAH_SINGULAR:
      raw = raw.replace(old, new)
    kind_v = kind_v[:-1]
  template, needle = _Template.of(alphabet, raw), _Template.of(alphabet, _NEEDLE)
  kind_v, kinds_v = alphabet.fit(kind_v), alphabet.fit(s.type_needle_v)  # Needles say plural.
  noise, comma, and_ = alphabet.fit(_NOISE), alphabet.fit(", "), alphabet.fit(", and ")
  num_needles = s.num_keys * s.num_needle_v

  def haystack_text(size: int) -> str:
    if s.type_haystack == "essay":
      return " ".join(setup.words[:size])
    return noise if s.type_haystack == "noise" else ""

  def distractor(rng: np.random.Generator, taken: list[str]) -> str:
    """A needle of random key and value that contains no real key or value."""
    for _ in range(_TRIES):
      text = needle.format(
          type_needle_v=kinds_v,
          key=strings.draw(rng, s.type_needle_k),
          value=strings.draw(rng, s.type_needle_v),
      )
      low = text.lower()
      if not any(t in low for t in taken):
        return text
    raise RuntimeError(f"no distractor needle without a real key or value in {_TRIES} draws")

  def build(rng: np.random.Generator, size: int) -> tuple[str, tuple[str, ...]]:
    text = haystack_text(size)
    forbidden = "\n".join((template.literal, needle.literal, text.lower()))
    for _ in range(_TRIES):
      taken: list[str] = []
      keys = [
          _draw_new(lambda: strings.draw(rng, s.type_needle_k), forbidden, taken)
          for _ in range(s.num_keys)
      ]
      values = [
          [
              _draw_new(lambda: strings.draw(rng, s.type_needle_v), forbidden, taken)
              for _ in range(s.num_needle_v)
          ]
          for _ in keys
      ]
      needles = [
          needle.format(type_needle_v=kinds_v, key=key, value=value)
          for key, key_values in zip(keys, values)
          for value in key_values
      ]
      needles = [needles[i] for i in rng.permutation(len(needles))]
      if s.type_haystack == "essay":
        context = _insert_at_depths(rng, text, needles)
      else:
        lines = [noise] * size
        if s.type_haystack == "needle":
          lines = [distractor(rng, taken) for _ in range(size)]
        context = "\n".join(_insert_lines(rng, lines, needles))
      asked = rng.choice(s.num_keys, size=s.num_needle_q, replace=False).tolist()
      queries = [keys[i] for i in asked]
      query = comma.join(queries[:-1]) + and_ + queries[-1] if len(queries) > 1 else queries[0]
      answers = tuple(value for i in asked for value in values[i])
      prompt = template.format(type_needle_v=kind_v, context=context, query=query)
      low, low_context = prompt.lower(), context.lower()
      if all(low.count(a.lower()) == 1 for a in answers) and all(
          low_context.count(q.lower()) == s.num_needle_v for q in queries
      ):
        return prompt, answers
    raise RuntimeError(f"no NIAH prompt with answers occurring once in {_TRIES} draws")

  if s.type_haystack == "essay":
    return _Builder(build, 0, len(setup.words), "essay words")
  unit = "noise sentences" if s.type_haystack == "noise" else "distractor needles"
  return _Builder(build, num_needles, setup.length + 1, unit)


def _vt(settings: VTSettings, setup: _Setup) -> _Builder:
  s, alphabet, strings = settings, setup.alphabet, setup.strings
  template = _Template.of(alphabet, _VT_TEMPLATE + _VT_ANSWER_PREFIX)
  first, hop = _Template.of(alphabet, _VT_FIRST), _Template.of(alphabet, _VT_HOP)
  noise, period, essay = alphabet.fit(_NOISE), alphabet.fit("."), s.type_haystack == "essay"
  value_mentions = template.text.count("{query}") + 1  # The question's and the chain's.
  min_size = 0 if essay else s.num_hops + 1  # RULER puts chain lines before distinct noise lines.
  max_size = len(setup.words) if essay else setup.length + 1

  def chains_prompt(
      rng: np.random.Generator, size: int, name_letters: int, hops: int, forbidden: str
  ) -> tuple[str, tuple[str, ...]]:
    """A prompt with `s.num_chains` chains of `hops` hops, and the first chain's names."""
    text = " ".join(setup.words[:size]) if essay else noise
    forbidden = "\n".join((forbidden, template.literal, first.literal, hop.literal, text.lower()))
    for _ in range(_TRIES):
      taken: list[str] = []
      new_name = lambda: strings.letters(rng, name_letters, strings.uppercase)
      names = [
          [_draw_new(new_name, forbidden, taken) for _ in range(hops + 1)]
          for _ in range(s.num_chains)
      ]
      values = [
          _draw_new(lambda: strings.number(rng, _VT_VALUE_DIGITS), forbidden, taken)
          for _ in range(s.num_chains)
      ]
      chains = [
          [first.format(name=chain[0], value=value)]
          + [hop.format(name=b, previous=a) for a, b in zip(chain, chain[1:])]
          for chain, value in zip(names, values)
      ]
      if essay:
        # The chains' lines interleaved at random, each chain's in order, as sentences.
        owners = rng.permutation(np.repeat(np.arange(s.num_chains), hops + 1)).tolist()
        lines: list[Iterator[str]] = [iter(chain) for chain in chains]
        flat = [next(lines[owner]).strip() + period for owner in owners]
        context = _insert_at_depths(rng, text, flat)
      else:
        sentences = [noise] * size
        for chain in chains:
          sentences = _insert_lines(rng, sentences, chain)
        context = "\n".join(sentences)
      prompt = template.format(context=context, query=values[0], num_v=alphabet.fit(str(hops + 1)))
      low = prompt.lower()
      # Every name occurs where it is assigned and where it is used, and nowhere else.
      if low.count(values[0].lower()) == value_mentions and all(
          low.count(name.lower()) == (1 if j == hops else 2)
          for chain in names
          for j, name in enumerate(chain)
      ):
        return prompt, tuple(names[0])
    raise RuntimeError(f"no vt prompt with names occurring once in {_TRIES} draws")

  fewshot_hops = min(_VT_FEWSHOT_MAX_HOPS, s.num_hops)
  fewshot = lambda rng, n: chains_prompt(rng, n, _VT_FEWSHOT_NAME_LETTERS, fewshot_hops, "")
  fewshot_size = min_size
  if s.add_fewshot:
    fewshot_fits = lambda n: (
        prompts.count_tokens(
            setup.tokenizer, fewshot(np.random.default_rng((setup.seed, _FEWSHOT_SEARCH)), n)[0]
        )
        <= _VT_FEWSHOT_TOKENS
    )
    if fewshot_fits(min_size):  # Else RULER's smallest haystack, whatever its length.
      fewshot_size = prompts.largest_fitting(
          fewshot_fits, min_size, min(max_size, _VT_FEWSHOT_TOKENS + 1)
      )

  def build(rng: np.random.Generator, size: int) -> tuple[str, tuple[str, ...]]:
    solved = ""
    if s.add_fewshot:
      shot, names = fewshot(rng, fewshot_size)
      solved = f"{shot} {' '.join(names)}\n\n"
    prompt, answers = chains_prompt(rng, size, _VT_NAME_LETTERS, s.num_hops, solved.lower())
    return solved + prompt, answers

  return _Builder(build, min_size, max_size, "essay words" if essay else "noise sentences")


def _numbered(words: Sequence[str], digits: bool) -> str:
  """RULER's "1. apple 2. pear", or "apple. pear." for a tokenizer without digits."""
  if digits:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))
  return " ".join(f"{word}." for word in words)


def _cwe(settings: CWESettings, setup: _Setup) -> _Builder:
  s, strings = settings, setup.strings
  template = _Template.of(setup.alphabet, _CWE_TEMPLATE + _CWE_ANSWER_PREFIX)
  short = setup.length < _CWE_SHORT
  shot_words, shot_freqs = _CWE_SHORT_FEWSHOT if short else _CWE_LONG_FEWSHOT
  freqs = _CWE_SHORT_FREQS if short else (s.freq_cw, s.freq_ucw)
  listed = [w for w in _CWE_WORDS if w not in template.literal]

  def word_list(
      rng: np.random.Generator, count: int, freqs: tuple[int, int]
  ) -> tuple[str, list[str]]:
    """A shuffled numbered list of `count` distinct words, and its `s.num_cw` common ones."""
    if count <= len(listed):
      words = [listed[i] for i in rng.choice(len(listed), size=count, replace=False)]
    else:
      words = strings.coined(rng, count, template.literal)
    common = words[: s.num_cw]
    items = common * freqs[0] + words[s.num_cw :] * freqs[1]
    return _numbered([items[i] for i in rng.permutation(len(items))], strings.digits), common

  def build(rng: np.random.Generator, size: int) -> tuple[str, tuple[str, ...]]:
    parts = []
    for _ in range(s.num_fewshot):
      context, common = word_list(rng, shot_words, shot_freqs)
      parts.append(f"{template.format(context=context)} {_numbered(common, strings.digits)}")
    context, common = word_list(rng, size, freqs)
    parts.append(template.format(context=context))
    return "\n".join(parts), tuple(common)

  return _Builder(build, s.num_cw, setup.length + 1, "distinct words")


def _zeta(s: float) -> float:
  """Riemann's zeta(s) for s > 1 (RULER uses scipy's): a partial sum plus its Euler-Maclaurin
  tail, exact to ~1e-12."""
  n = 1000
  head = float(np.sum(np.arange(1, n, dtype=np.float64) ** -s))
  return head + n ** (1 - s) / (s - 1) + n**-s / 2 + s * n ** (-s - 1) / 12


def _fwe(settings: FWESettings, setup: _Setup) -> _Builder:
  s, strings = settings, setup.strings
  template = _Template.of(setup.alphabet, _FWE_TEMPLATE + _FWE_ANSWER_PREFIX)
  vocab_size = s.vocab_size or (setup.length - TASKS["fwe"].tokens_to_generate) // 50
  if vocab_size <= _FWE_ANSWERS:
    raise ValueError(
        f"length {setup.length} is too small for fwe: RULER's vocabulary of (length - 50) // 50 ="
        f" {vocab_size} coded words needs more than {_FWE_ANSWERS}; set FWESettings.vocab_size"
    )
  shares = np.arange(1, vocab_size + 1, dtype=np.float64) ** -s.alpha / _zeta(s.alpha)
  counts = lambda n: (n * shares).astype(np.int64)

  def valid(n: int) -> bool:
    """Whether the answers (ranks 2 to 4) occur, each more often than any other coded word."""
    c = counts(n)
    return bool(c[_FWE_ANSWERS] >= 1) and (
        vocab_size == _FWE_ANSWERS + 1 or bool(c[_FWE_ANSWERS] > c[_FWE_ANSWERS + 1])
    )

  min_size = max(1, math.floor(_zeta(s.alpha) * (_FWE_ANSWERS + 1) ** s.alpha) - 1)
  while not valid(min_size):
    min_size += 1
  noise = setup.alphabet.fit(_FWE_NOISE)

  def build(rng: np.random.Generator, size: int) -> tuple[str, tuple[str, ...]]:
    while not valid(size):  # Counts can tie at a size; the next smaller valid one (>= min_size).
      size -= 1
    vocab = [noise] + strings.coded(rng, vocab_size - 1, s.coded_wordlen, template.literal)
    words = rng.permutation(np.repeat(np.arange(vocab_size), counts(size))).tolist()
    context = " ".join(vocab[i] for i in words)
    return template.format(context=context), tuple(vocab[1 : _FWE_ANSWERS + 1])

  return _Builder(build, min_size, setup.length + 1, "coded words")


_BUILDERS: dict[str, Callable[[Any, _Setup], _Builder]] = {
    "niah_single": _niah,
    "niah_multikey": _niah,
    "niah_multivalue": _niah,
    "niah_multiquery": _niah,
    "vt": _vt,
    "cwe": _cwe,
    "fwe": _fwe,
}
