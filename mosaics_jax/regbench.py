"""RegBench: in-context learning of random regular languages (Akyürek et al. 2024, berlino/seq_icl).

Each language is a random probabilistic finite automaton (PFA): a deterministic automaton over a
subset of 18 letters in which every state accepts, walked with uniform probabilities over the
out-edges of the current state. It is drawn with 4 to 12 states, 4 to 18 letters and 1 to 3
out-edges per state, no self-loops (`random_automaton`), then minimised, which may lower the
number of states (`minimise`); languages are deduplicated (`languages`). A sequence is 10 to 19
strings of one language separated by `|` (`sample_sequence`); a model reads it and must infer the
language in context. Training and test languages are disjoint, so test scores measure learning in
context, not recall of training languages. The numbers follow seq_icl's `src/dataloaders/dfa.py`
(its `ICLDFADataModule` with `configs/dataset/icl_dfa.yaml`); where this module differs, the
docstring says so.

Tokens: letters a..r are ids 0..17, `|` is SEPARATOR = 18, VOCAB_SIZE = 19. The data source pads
rows with PAD = 19 beyond a sequence's end (seq_icl's noop token "."), so a model trained on it
reads 20 ids, as seq_icl's `vocab_size: 20`. seq_icl orders its ids differently ("." = 0, letters
1..18, "|" = 19); nothing depends on the order.

Metrics (`scores`), as seq_icl's `eval.py` computes them, with probs[:, i] the model's
distribution of tokens[:, i + 1]:

  accuracy  the greedy (argmax) token is a letter that the automaton allows after the current
            string's prefix. Positions whose next token is `|` are skipped, and `|` itself is never
            legal: string lengths are random, so the end of a string cannot be predicted
            (`_get_dfa_accuracy`).
  l1        sum over the vocabulary of |probs - uniform over the legal next letters|, the L1
            distance (seq_icl's "TVD", `total_l1_model_dfa`, which has no factor 1/2: it lies in
            [0, 2]). It is scored at every position that has a next token, those before `|`
            included, where the target is still uniform over the letters that may follow
            (`analyze.get_dfa_probs`).

Neither scores the first letter of a sequence, which nothing precedes. Both are means over the
scored positions of all rows together (seq_icl's per-batch means), returned with the counts so
that batches can be pooled.

Axis legend: b = batch (sequences), t = time (tokens), v = vocabulary (token ids).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from jaxtyping import Bool, Float, Int

NUM_LETTERS = 18  # seq_icl: vocab_size 20 less "|" and ".".
SEPARATOR = NUM_LETTERS  # `|`, between the strings of a sequence.
VOCAB_SIZE = NUM_LETTERS + 1
PAD = VOCAB_SIZE  # Fills data rows past a sequence's end; no token of any language.
TOKENS = "abcdefghijklmnopqr|"  # TOKENS[i] is the text of id i.

# Inclusive ranges of the paper setting. seq_icl draws them with numpy's exclusive upper bounds:
# states rng.integers(max_outgoing_edges=4, max_num_nodes + 1 = 13), letters per automaton
# rng.integers(4, vocab_size - 2 + 1 = 19), out-edges per state rng.integers(1, 4), strings per
# sequence rng.integers(10, 20), string lengths rng.integers(1, max_len_per_example = 50).
STATES = (4, 12)
ALPHABET = (4, 18)
OUT_EDGES = (1, 3)
STRINGS = (10, 19)
MAX_STRING = 49

# Seeds of the two pools of languages (`train_test_languages`). seq_icl draws languages with its
# dataset seed, 0 by default.
TRAIN_SEED = 0
TEST_SEED = 1
# Held-out languages: seq_icl's sweeps hold out num_test_examples = 1000 (halved there into val and
# test; here all of them are the validation split, and the evaluation's).
TEST_LANGUAGES = 1000


@dataclasses.dataclass(frozen=True)
class Automaton:
  """A deterministic automaton over letter ids whose states all accept: its language is the set of
  strings it can read from `initial`. As a PFA it emits each out-edge of a state with equal
  probability.

  States are 0 .. num_states - 1. `transitions[q]` is the (letter, next state) pairs of state q,
  sorted by letter; every state has at least one, so a walk never gets stuck. `letters` is the
  alphabet it was drawn over (seq_icl's `alphabet`): its strings use only the letters on edges, and
  `letters` takes no part in equality, so two automata with the same transitions are equal.
  `minimise` gives each language one canonical automaton, so equality of minimised automata is
  equality of languages.
  """

  transitions: tuple[tuple[tuple[int, int], ...], ...]
  letters: tuple[int, ...] = dataclasses.field(default=(), compare=False)
  initial: int = 0

  def __post_init__(self):
    n = len(self.transitions)
    if not 0 <= self.initial < n:
      raise ValueError(f"initial state {self.initial} is not one of the {n} states")
    for state, edges in enumerate(self.transitions):
      letters = [letter for letter, _ in edges]
      if not edges or letters != sorted(set(letters)):
        raise ValueError(
            f"state {state} needs out-edges with distinct letters sorted by letter, got {edges}"
        )
      if not all(0 <= letter < NUM_LETTERS and 0 <= target < n for letter, target in edges):
        raise ValueError(f"state {state} has an edge to no state or on no letter: {edges}")

  @property
  def num_states(self) -> int:
    return len(self.transitions)

  def legal_next(self, state: int) -> tuple[int, ...]:
    """The letters that may follow a prefix that leads to `state`."""
    return tuple(letter for letter, _ in self.transitions[state])

  def state_after(self, string: Sequence[int] | Int[np.ndarray, " n"]) -> int:
    """The state a string of letters leads to from `initial`; ValueError if it leaves the
    language."""
    state = self.initial
    for letter in string:
      state = _step(self.transitions, state, int(letter))
    return state


def _step(transitions: tuple[tuple[tuple[int, int], ...], ...], state: int, letter: int) -> int:
  for edge_letter, target in transitions[state]:
    if edge_letter == letter:
      return target
  raise ValueError(f"token {letter} cannot follow state {state}")


def random_automaton(rng: np.random.Generator) -> Automaton:
  """An automaton as seq_icl's `RandomDFASampler.sample` draws it, before minimisation.

  The number of states (STATES) and of alphabet letters (ALPHABET) are uniform in their inclusive
  ranges, the alphabet a uniform subset of the 18 letters. Each state gets a uniform number of
  out-edges in OUT_EDGES, on distinct letters of the alphabet, to distinct other states (no
  self-loops). The initial state is 0; some states may be unreachable from it, and some may be
  equivalent.
  """
  num_states = int(rng.integers(STATES[0], STATES[1] + 1))
  num_letters = int(rng.integers(ALPHABET[0], ALPHABET[1] + 1))
  letters = np.sort(rng.choice(NUM_LETTERS, num_letters, replace=False))
  transitions = []
  for state in range(num_states):
    count = int(rng.integers(OUT_EDGES[0], OUT_EDGES[1] + 1))
    edge_letters = rng.choice(letters, count, replace=False)
    others = np.delete(np.arange(num_states), state)
    targets = rng.choice(others, count, replace=False)
    transitions.append(tuple(sorted(zip(edge_letters.tolist(), targets.tolist()))))
  return Automaton(tuple(transitions), letters=tuple(letters.tolist()))


def minimise(automaton: Automaton) -> Automaton:
  """The minimal automaton of the same language, with canonical state numbers.

  As seq_icl's `dfa._minimize()._trim()` (pythomata): states unreachable from the initial state
  are dropped and equivalent states merged, so the result may have self-loops where a cycle
  collapses. All states accept, so two states are equivalent when they allow the same letters and
  each letter leads to equivalent states: Moore's partition refinement, starting from the sets
  of allowed letters. States are then numbered in breadth-first order from the initial state (0),
  edges taken by letter, a numbering the language alone fixes.
  """
  transitions = automaton.transitions
  reachable = [automaton.initial]
  seen = {automaton.initial}
  for state in reachable:  # Grows while it is read: breadth-first.
    for _, target in transitions[state]:
      if target not in seen:
        seen.add(target)
        reachable.append(target)
  block = _renumber({q: tuple(letter for letter, _ in transitions[q]) for q in reachable})
  while True:
    refined = _renumber(
        {q: (block[q], tuple(block[target] for _, target in transitions[q])) for q in reachable}
    )
    if max(refined.values()) == max(block.values()):
      break
    block = refined
  # Equivalent states have the same letters into the same blocks: any one represents its block.
  number = {block[automaton.initial]: 0}
  representatives = [automaton.initial]
  for state in representatives:
    for _, target in transitions[state]:
      if block[target] not in number:
        number[block[target]] = len(number)
        representatives.append(target)
  minimal = tuple(
      tuple((letter, number[block[target]]) for letter, target in transitions[state])
      for state in representatives
  )
  return Automaton(minimal, letters=automaton.letters)


def _renumber(signatures: dict[int, tuple]) -> dict[int, int]:
  """States with equal signatures get the same block number, 0, 1, ... in order of appearance."""
  ids: dict[tuple, int] = {}
  return {state: ids.setdefault(signature, len(ids)) for state, signature in signatures.items()}


def sample_automaton(rng: np.random.Generator) -> Automaton:
  """A random language of the paper setting: `random_automaton`, then `minimise`."""
  return minimise(random_automaton(rng))


def languages(
    num: int, seed: int, *, exclude: frozenset[Automaton] = frozenset()
) -> tuple[Automaton, ...]:
  """`num` distinct languages (minimised automata) drawn in turn from a generator of `seed`, none
  of them in `exclude`.

  Duplicates are dropped, as seq_icl means to (its set of DFAs hashes the transitions but compares
  objects by identity, so it keeps duplicates); here equality is equality of languages. The first
  k languages of a seed are the same for every num >= k. Like seq_icl, this gives up after
  10 * num draws; it raises ValueError rather than return fewer.
  """
  rng = np.random.default_rng(seed)
  found: dict[Automaton, None] = {}  # Ordered, unlike a set.
  for _ in range(10 * num):
    if len(found) == num:
      break
    automaton = sample_automaton(rng)
    if automaton not in exclude:
      found.setdefault(automaton)
  if len(found) < num:
    raise ValueError(f"only {len(found)} distinct languages in {10 * num} draws, {num} wanted")
  return tuple(found)


@functools.cache
def train_test_languages(
    num_train: int, num_test: int = TEST_LANGUAGES
) -> tuple[tuple[Automaton, ...], tuple[Automaton, ...]]:
  """(training languages, held-out languages), disjoint.

  The held-out languages are `languages(num_test, TEST_SEED)`, the same whatever the number of
  training languages, so runs of every training size are scored on the same languages. The
  training languages are `languages(num_train, TRAIN_SEED)` less the held-out ones, so a larger
  training set extends a smaller one. (seq_icl instead shuffles one pool and cuts it in two.)
  Cached: the data pipelines and the evaluation ask for them again and again.
  """
  test = languages(num_test, TEST_SEED)
  return languages(num_train, TRAIN_SEED, exclude=frozenset(test)), test


def sample_sequence(
    rng: np.random.Generator,
    automaton: Automaton,
    *,
    strings: tuple[int, int] = STRINGS,
    max_string: int = MAX_STRING,
) -> Int[np.ndarray, " t"]:
  """Strings of the language separated by SEPARATOR, as seq_icl's `generate_example`.

  The number of strings is uniform in the inclusive range `strings`, each string's length uniform
  in [1, max_string]. A string is a walk from the initial state, each letter uniform over the
  out-edges of the current state. No separator opens or closes the sequence.
  """
  lengths = rng.integers(1, max_string + 1, int(rng.integers(strings[0], strings[1] + 1)))
  draws = rng.random(int(lengths.sum()))
  tokens = []
  k = 0
  for length in lengths.tolist():
    if tokens:
      tokens.append(SEPARATOR)
    state = automaton.initial
    for _ in range(length):
      edges = automaton.transitions[state]
      letter, state = edges[int(draws[k] * len(edges))]
      tokens.append(letter)
      k += 1
  return np.asarray(tokens, np.int32)


class LegalMasks(NamedTuple):
  """What `legal_masks` returns: row i is about the token that follows tokens[i]."""

  legal: Bool[np.ndarray, "t v"]  # The letters that may follow (v = VOCAB_SIZE; never `|`).
  l1: Bool[np.ndarray, " t"]  # Positions the l1 scores: those with a next token.
  accuracy: Bool[np.ndarray, " t"]  # Positions accuracy scores: those whose next token is a letter.


def legal_masks(automaton: Automaton, tokens: Int[np.ndarray, " t"]) -> LegalMasks:
  """The legal next letters after every prefix of a sequence of `automaton`, and the positions
  scored (module docstring).

  After a letter, the legal letters are those the automaton allows after the current string's
  prefix; after `|` (a new string), those it allows first. A sequence ends at its first PAD (data
  rows are padded): no position scores PAD, nor predicts it. ValueError if a letter leaves the
  language.
  """
  length = len(tokens)
  pads = np.flatnonzero(tokens == PAD)
  end = int(pads[0]) if len(pads) else length
  legal = np.zeros((length, VOCAB_SIZE), bool)
  state = automaton.initial
  for i, token in enumerate(tokens[:end].tolist()):
    if token == SEPARATOR:
      state = automaton.initial
    else:
      state = _step(automaton.transitions, state, token)
    if i + 1 < end:
      legal[i, list(automaton.legal_next(state))] = True
  l1 = np.arange(length) < end - 1
  accuracy = l1 & (np.append(tokens[1:], PAD) != SEPARATOR)
  return LegalMasks(legal, l1, accuracy)


def scores(
    probs: Float[np.ndarray, "b t v"],
    tokens: Int[np.ndarray, "b t"],
    automata: Sequence[Automaton],
) -> dict[str, float | int]:
  """accuracy and l1 of a model's next-token distributions on sequences of `automata` (one per row).

  Args:
    probs: probs[:, i] is the distribution of tokens[:, i + 1] (the last row is not scored). v >=
      VOCAB_SIZE: ids past the vocabulary (PAD) are never legal, and their probability counts in
      the l1 as that of any illegal token.
    tokens: sequences of `sample_sequence`, possibly padded with PAD.
    automata: the automaton of each row.

  Returns:
    accuracy and l1 (module docstring), means over their positions of all rows together (NaN when
    there are none), and the counts accuracy_positions and l1_positions.
  """
  if probs.shape[-1] < VOCAB_SIZE or len(automata) != len(tokens):
    raise ValueError(
        f"need probs [b, t, v >= {VOCAB_SIZE}] and one automaton per row of tokens, got probs"
        f" {probs.shape}, tokens {tokens.shape} and {len(automata)} automata"
    )
  correct = l1_sum = 0.0
  accuracy_positions = l1_positions = 0
  for row_probs, row_tokens, automaton in zip(probs, tokens, automata, strict=True):
    masks = legal_masks(automaton, row_tokens)
    legal = np.pad(masks.legal, ((0, 0), (0, probs.shape[-1] - VOCAB_SIZE)))
    uniform = legal / np.maximum(legal.sum(-1, keepdims=True), 1)
    greedy_legal = legal[np.arange(len(legal)), row_probs.argmax(-1)]
    correct += float(greedy_legal[masks.accuracy].sum())
    l1_sum += float(np.abs(row_probs - uniform).sum(-1)[masks.l1].sum())
    accuracy_positions += int(masks.accuracy.sum())
    l1_positions += int(masks.l1.sum())
  return {
      "accuracy": correct / accuracy_positions if accuracy_positions else float("nan"),
      "accuracy_positions": accuracy_positions,
      "l1": l1_sum / l1_positions if l1_positions else float("nan"),
      "l1_positions": l1_positions,
  }


def ngram_probs(tokens: Int[np.ndarray, "*b t"], n: int) -> Float[np.ndarray, "*b t v"]:
  """The in-context n-gram baseline: row i predicts tokens[..., i + 1] from the counts of n-grams
  in tokens[..., : i + 1] alone, as seq_icl's `ngram.predict_with_n_gram_back_off` (its eval uses
  n = 3, backoff, no add-one smoothing).

  Counts are taken within strings (never across `|`), each string left-padded with n - 1 pad
  symbols ("_" in seq_icl), and the string being read counts too. With h the last n - 1 symbols of
  the padded current string and c(.) counts of all orders (c of the 0-gram: all unigrams, pads
  included), a letter seen after h gets c(h x) / c(h). The rest of the mass, beta = 1 - their sum,
  goes to the other letters seen so far in proportion to their (n - 1)-gram probabilities given
  h[1:], defined in the same way, down to unigrams (Katz-style backoff without discounting).
  beta > 0, as the occurrence of h that ends the sequence read so far counts in c(h) but has no
  continuation; when every letter seen so far has followed h, beta is left unassigned, as in
  seq_icl, so the row sums to less than 1. Only letters seen so far get mass, `|` and PAD never.
  Rows from the first PAD on are zero. n = 1 is the in-context unigram (seq_icl's code takes the
  whole string as the context when N = 1).

  Args:
    tokens: sequences, possibly padded with PAD.
    n: the order, >= 1.

  Returns:
    The distributions over v = VOCAB_SIZE ids.
  """
  if n < 1:
    raise ValueError(f"the n-gram order must be >= 1, got {n}")
  rows = tokens.reshape(-1, tokens.shape[-1])
  probs = np.stack([_ngram_row(row.tolist(), n) for row in rows])
  return probs.reshape(*tokens.shape, VOCAB_SIZE)


def _ngram_row(tokens: list[int], n: int) -> np.ndarray:
  pad = -1
  # counts[k][g]: occurrences of the k-gram g; counts[0][()] is the number of unigrams.
  counts = [collections.Counter() for _ in range(n + 1)]
  seen: set[int] = set()
  text: list[int] = []
  out = np.zeros((len(tokens), VOCAB_SIZE))

  def open_string():
    # The grams inside the padding: n - k copies of the k pads.
    text[:] = [pad] * (n - 1)
    for k in range(1, n):
      counts[k][(pad,) * k] += n - k
    counts[0][()] += n - 1

  def probability(context: tuple[int, ...]) -> dict[int, float]:
    """P(letter | context) over the letters seen, the context of length k - 1."""
    k = len(context) + 1
    followed = {
        letter: counts[k][context + (letter,)] / counts[k - 1][context]
        for letter in seen
        if counts[k][context + (letter,)]
    }
    unseen = seen - followed.keys()
    if not unseen:
      return followed
    lower = probability(context[1:])
    beta = 1.0 - sum(followed.values())
    norm = sum(lower[letter] for letter in unseen)
    return followed | {letter: beta * lower[letter] / norm for letter in unseen}

  open_string()
  for i, token in enumerate(tokens):
    if token == PAD:
      break
    if token == SEPARATOR:
      open_string()
    else:
      text.append(token)
      seen.add(token)
      for k in range(n + 1):
        counts[k][tuple(text[len(text) - k :])] += 1
    for letter, p in probability(tuple(text[len(text) - (n - 1) :])).items():
      out[i, letter] = p
  return out
