"""Prompts that fit a model's tokenizer: which characters it can write, and token counts.

A character-level model knows only the characters of its training text (tinyshakespeare's has
no digits but 3, and no double quote), so a task's prompt template is passed through `fit`, and a
task whose keys or values would need characters the model lacks draws them from `Alphabet`'s
letters instead.
"""

from __future__ import annotations

import dataclasses
import string
import unicodedata
from collections.abc import Callable

from mosaics_jax import tokenizers

# Replacements tried, in order, for a character a tokenizer cannot write.
_SUBSTITUTES = {'"': ("'",), "\u2019": ("'",), "\u2018": ("'",), "\u201c": ("'",), "\u201d": ("'",)}
_SUBSTITUTES |= {"\t": (" ",), "\n": (" ",), "-": (" ",), "?": (".",), "!": (".",)}


@dataclasses.dataclass(frozen=True)
class Alphabet:
  """The characters a tokenizer round-trips (encodes and decodes to themselves)."""

  tokenizer: tokenizers.Tokenizer
  # Answers so far: prompts ask about the same few characters again and again.
  _known: dict[str, bool] = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def writes(self, char: str) -> bool:
    """Whether the tokenizer round-trips `char`."""
    if char not in self._known:
      try:
        self._known[char] = self.tokenizer.decode(self.tokenizer.encode(char)) == char
      except (ValueError, KeyError):
        self._known[char] = False
    return self._known[char]

  def writes_all(self, text: str) -> bool:
    return all(self.writes(c) for c in set(text))

  @property
  def digits(self) -> bool:
    """Whether numbers can be written with digits."""
    return self.writes_all(string.digits)

  @property
  def lowercase(self) -> str:
    """The lowercase ASCII letters it writes, for keys and values drawn at random."""
    return "".join(c for c in string.ascii_lowercase if self.writes(c))

  def fit(self, text: str) -> str:
    """`text` in characters the tokenizer writes: accents stripped, quotes and dashes replaced,
    anything else it lacks dropped (a prompt loses a character rather than fail)."""
    # Characters map one by one: a table of the text's distinct ones is fast on a long text.
    table = {ord(c): self._replacement(c) for c in set(text) if not self.writes(c)}
    return text.translate(table) if table else text

  def _replacement(self, char: str) -> str:
    plain = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
    for candidate in (plain, *_SUBSTITUTES.get(char, ())):
      if candidate and self.writes_all(candidate):
        return candidate
    return ""


def count_tokens(tokenizer: tokenizers.Tokenizer, text: str) -> int:
  """The number of tokens of `text`."""
  return int(tokenizer.encode(text).size)


def largest_fitting(
    fits: Callable[[int], bool], low: int, high: int, guess: int | None = None
) -> int:
  """The largest k in [low, high] with `fits(k)`, given `fits(low)` and `fits` true up to some k
  and false after: gallops from `guess` (default low), then bisects, so that few prompts much
  longer than the answer's are tokenised (the size of a haystack, the number of documents)."""
  good, bad = low, high + 1  # fits(good); bad is past the end or does not fit.
  probe, step = min(max(low if guess is None else guess, low), high), 1
  if fits(probe):
    good = probe
    while good + step < bad and fits(good + step):
      good, step = good + step, 2 * step
    bad = min(bad, good + step)
  else:
    bad = probe
    while bad - step > good and not fits(bad - step):
      bad, step = bad - step, 2 * step
    good = max(good, bad - step)
  while bad - good > 1:
    middle = (good + bad) // 2
    good, bad = (middle, bad) if fits(middle) else (good, middle)
  return good
