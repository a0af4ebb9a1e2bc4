"""RegBench: the random languages and their sequences follow the paper, the metrics and the n-gram
baseline give hand-computed values, and the regbench data source reads the right languages."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mosaics_jax import regbench
from mosaics_jax.config import DataConfig
from mosaics_jax.train import data

A, B, C = 0, 1, 2
SEP, PAD = regbench.SEPARATOR, regbench.PAD
# 0 -a-> 1, 0 -b-> 1, 1 -c-> 0: the strings (a|b)c(a|b)c...
TINY = regbench.Automaton((((A, 1), (B, 1)), ((C, 0),)), letters=(A, B, C))
# "ac|b|acb": the legal next letters after each token are {c}, {a,b}, {a,b}, {c}, {a,b}, {c},
# {a,b} (and none after the last).
TINY_SEQUENCE = np.array([A, C, SEP, B, SEP, A, C, B])

# The 0.9999 quantiles of chi-squared with d degrees of freedom (scipy.stats.chi2.ppf): a uniform
# draw fails the test with probability 1e-4 (never, with the fixed seeds).
CHI2_9999 = {1: 15.14, 2: 18.42, 8: 31.83, 9: 33.72, 14: 42.58, 17: 47.57, 48: 93.22}


def _assert_uniform(values, low: int, high: int) -> None:
  """`values` all lie in [low, high], each as often as the others up to a chi-squared test."""
  values = np.asarray(values)
  assert values.min() == low and values.max() == high
  observed = np.bincount(values - low, minlength=high - low + 1)
  expected = len(values) / (high - low + 1)
  statistic = ((observed - expected) ** 2 / expected).sum()
  assert statistic < CHI2_9999[high - low], (observed, statistic)


def _distinguishable(a: regbench.Automaton, p: int, b: regbench.Automaton, q: int) -> bool:
  """Some string is readable from state p of a and not from state q of b, or the reverse: a
  breadth-first search over pairs of states, independent of `minimise`."""
  pairs, seen = [(p, q)], {(p, q)}
  for p, q in pairs:
    if a.legal_next(p) != b.legal_next(q):
      return True
    for (_, p_next), (_, q_next) in zip(a.transitions[p], b.transitions[q]):
      if (p_next, q_next) not in seen:
        seen.add((p_next, q_next))
        pairs.append((p_next, q_next))
  return False


def _perfect_probs(automaton: regbench.Automaton, tokens: np.ndarray, v: int) -> np.ndarray:
  """Uniform over the letters the automaton allows after each prefix's current string."""
  probs = np.zeros((len(tokens), v))
  for i in range(len(tokens)):
    current = tokens[: i + 1]
    string = current[np.flatnonzero(current == SEP).max() + 1 :] if SEP in current else current
    legal = automaton.legal_next(automaton.state_after(string))
    probs[i, list(legal)] = 1 / len(legal)
  return probs


def test_random_automata_follow_the_paper_distributions():
  rng = np.random.default_rng(0)
  automata = [regbench.random_automaton(rng) for _ in range(3000)]
  _assert_uniform([a.num_states for a in automata], 4, 12)
  _assert_uniform([len(a.letters) for a in automata], 4, 18)
  _assert_uniform([len(edges) for a in automata for edges in a.transitions], 1, 3)
  # The alphabet is a uniform subset: every letter as often as the others.
  letters = [letter for a in automata for letter in a.letters]
  _assert_uniform(letters, 0, regbench.NUM_LETTERS - 1)
  for a in automata:
    assert a.initial == 0
    for state, edges in enumerate(a.transitions):
      targets = [target for _, target in edges]
      assert state not in targets and len(set(targets)) == len(targets)  # No self-loops.
      assert {letter for letter, _ in edges} <= set(a.letters)


def test_minimise_keeps_the_language_and_leaves_no_equivalent_states():
  rng = np.random.default_rng(1)
  for _ in range(300):
    raw = regbench.random_automaton(rng)
    minimal = regbench.minimise(raw)
    assert not _distinguishable(raw, raw.initial, minimal, minimal.initial)
    assert minimal.num_states <= raw.num_states and minimal.letters == raw.letters
    for p, q in itertools.combinations(range(minimal.num_states), 2):
      assert _distinguishable(minimal, p, minimal, q)
    # Canonical: numbered in breadth-first order from state 0, so every state is reachable, and
    # renaming the states of the raw automaton changes nothing.
    assert minimal.initial == 0 and regbench.minimise(minimal) == minimal
    rename = np.concatenate([[0], 1 + rng.permutation(raw.num_states - 1)])
    renamed = [None] * raw.num_states
    for state, edges in enumerate(raw.transitions):
      renamed[rename[state]] = tuple((letter, int(rename[target])) for letter, target in edges)
    assert regbench.minimise(regbench.Automaton(tuple(renamed))) == minimal


def test_minimise_merges_a_cycle_into_a_self_loop():
  cycle = regbench.Automaton((((A, 1),), ((A, 2),), ((A, 0),), ((B, 0),)))  # State 3: unreachable.
  assert regbench.minimise(cycle) == regbench.Automaton((((A, 0),),))


def test_languages_are_distinct_and_train_and_test_are_disjoint():
  train, test = regbench.train_test_languages(300, 100)
  assert len(train) == 300 and len(test) == 100
  assert len(set(train)) == 300 and len(set(test)) == 100 and not set(train) & set(test)
  assert test == regbench.languages(100, regbench.TEST_SEED)
  assert train[:50] == regbench.train_test_languages(50, 100)[0]  # More languages extend fewer.
  # Distinct automata are distinct languages: they are minimal and canonical.
  for a, b in itertools.combinations(train[:40] + test[:40], 2):
    assert _distinguishable(a, a.initial, b, b.initial)


def test_sequences_follow_the_paper_distributions():
  rng = np.random.default_rng(2)
  counts, lengths = [], []
  for automaton in regbench.languages(600, 7):
    tokens = regbench.sample_sequence(rng, automaton)
    assert tokens[0] != SEP and tokens[-1] != SEP and tokens.max() < regbench.VOCAB_SIZE
    strings = np.split(tokens, np.flatnonzero(tokens == SEP))
    strings = [strings[0]] + [s[1:] for s in strings[1:]]
    for string in strings:
      automaton.state_after(string)  # Raises unless the string is in the language.
    counts.append(len(strings))
    lengths.extend(len(s) for s in strings)
  _assert_uniform(counts, 10, 19)
  _assert_uniform(lengths, 1, 49)


def test_letters_are_uniform_over_the_out_edges():
  tokens = regbench.sample_sequence(np.random.default_rng(3), TINY, strings=(19, 19))
  strings = "".join(regbench.TOKENS[i] for i in tokens).split("|")
  assert len(strings) == 19 and all(set(s[1::2]) <= {"c"} for s in strings)
  # State 0 emits a or b, as often.
  _assert_uniform([i for s in strings for i in map("ab".index, s[::2])], A, B)


def test_legal_masks_of_a_hand_made_sequence():
  masks = regbench.legal_masks(TINY, TINY_SEQUENCE)
  assert masks.legal.shape == (8, regbench.VOCAB_SIZE)
  legal = [np.flatnonzero(row).tolist() for row in masks.legal]
  assert legal == [[C], [A, B], [A, B], [C], [A, B], [C], [A, B], []]
  np.testing.assert_array_equal(masks.l1, [1, 1, 1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(masks.accuracy, [1, 0, 1, 0, 1, 1, 1, 0])
  padded = regbench.legal_masks(TINY, np.append(TINY_SEQUENCE, [PAD, PAD]))
  np.testing.assert_array_equal(padded.legal[:8], masks.legal)
  assert not padded.l1[7:].any() and not padded.accuracy[7:].any()
  with pytest.raises(ValueError, match="cannot follow state 1"):
    regbench.legal_masks(TINY, np.array([A, B]))


@pytest.mark.parametrize("v", [regbench.VOCAB_SIZE, regbench.VOCAB_SIZE + 1])
def test_the_automaton_itself_scores_accuracy_1_and_l1_0(v):
  rng = np.random.default_rng(4)
  automata = regbench.languages(8, 5)
  tokens = np.full((8, 1200), PAD)
  for row, automaton in enumerate(automata):
    sequence = regbench.sample_sequence(rng, automaton)
    tokens[row, : len(sequence)] = sequence
  probs = np.zeros((*tokens.shape, v))  # Nothing on the padding, which is not scored.
  for row, automaton in enumerate(automata):
    sequence = tokens[row][tokens[row] != PAD]
    probs[row, : len(sequence)] = _perfect_probs(automaton, sequence, v)
  result = regbench.scores(probs, tokens, automata)
  assert result["accuracy"] == 1.0 and result["l1"] == pytest.approx(0.0, abs=1e-12)
  assert result["l1_positions"] == (tokens != PAD).sum() - 8
  assert result["accuracy_positions"] == result["l1_positions"] - (tokens == SEP).sum()


@pytest.mark.parametrize("v", [regbench.VOCAB_SIZE, regbench.VOCAB_SIZE + 1])
def test_uniform_predictor_on_a_hand_made_sequence(v):
  # Uniform over v ids against uniform over k legal letters: k (1/k - 1/v) + (v - k) / v
  # = 2 (v - k) / v. Positions 0..6 have k = 1, 2, 2, 1, 2, 1, 2.
  expected_l1 = (3 * 2 * (v - 1) / v + 4 * 2 * (v - 2) / v) / 7
  # Ties go to the first id, a, legal at positions 2, 4 and 6 of the scored 0, 2, 4, 5 and 6.
  expected_accuracy = 3 / 5
  tokens = np.stack([TINY_SEQUENCE, np.append(TINY_SEQUENCE[:6], [PAD, PAD])])
  probs = np.full((2, 8, v), 1 / v)
  alone = regbench.scores(probs[:1], tokens[:1], [TINY])
  assert alone == {
      "accuracy": pytest.approx(expected_accuracy),
      "accuracy_positions": 5,
      "l1": pytest.approx(expected_l1),
      "l1_positions": 7,
  }
  # The padded row "ac|b|a" adds positions 0..4: k = 1, 2, 2, 1, 2; accuracy at 0, 2 and 4.
  both = regbench.scores(probs, tokens, [TINY, TINY])
  assert both["l1_positions"] == 12 and both["accuracy_positions"] == 8
  padded_l1 = 2 * 2 * (v - 1) / v + 3 * 2 * (v - 2) / v
  assert both["l1"] == pytest.approx((7 * expected_l1 + padded_l1) / 12)
  assert both["accuracy"] == pytest.approx((3 + 2) / 8)


def test_scores_refuse_a_short_vocabulary():
  with pytest.raises(ValueError, match="v >= 19"):
    regbench.scores(np.ones((1, 8, 18)) / 18, TINY_SEQUENCE[None], [TINY])


def _letters(probs_row) -> dict[str, float]:
  return {regbench.TOKENS[i]: float(p) for i, p in enumerate(probs_row) if p}


def test_ngram_on_hand_made_sequences():
  approx = pytest.approx
  # Bigrams of "abca" and then "b": a was followed by b once in its 2 occurrences (the second ends
  # the prefix), so b gets 1/2; the other 1/2 goes to a and c in proportion to their unigram
  # counts 2 and 1 (out of 5 with the pad): 1/3 and 1/6.
  probs = regbench.ngram_probs(np.array([A, B, C, A, B]), 2)
  assert _letters(probs[3]) == {"a": approx(1 / 3), "b": approx(1 / 2), "c": approx(1 / 6)}
  assert _letters(probs[0]) == {"a": approx(1.0)}  # Nothing followed a yet: the unigram.
  # Counts stay within strings: b has not been followed by anything in "ab|b", so back off to the
  # unigrams a: 1 and b: 2.
  probs = regbench.ngram_probs(np.array([A, B, SEP, B]), 2)
  assert _letters(probs[3]) == {"a": approx(1 / 3), "b": approx(2 / 3)}
  # After "|" the context is the pads: the first string began with a (1 of 2 pads, the other
  # opening the current string); b gets the rest through the unigrams.
  assert _letters(probs[2]) == {"a": approx(1 / 2), "b": approx(1 / 2)}
  # Every letter seen has followed a: nothing is left for back-off, and the row sums to 1/2.
  probs = regbench.ngram_probs(np.array([A, A, PAD]), 2)
  assert _letters(probs[1]) == {"a": approx(1 / 2)}
  assert not probs[2].any()  # Padding.
  # Trigrams: after "ab|a" the context "_ a" was followed by b once in 2 occurrences; a backs off
  # to the bigram context "a" (followed by b once in 2) and then to the unigrams.
  probs = regbench.ngram_probs(np.array([A, B, SEP, A]), 3)
  assert _letters(probs[3]) == {"a": approx(1 / 2), "b": approx(1 / 2)}
  # The unigram: counts of the letters so far, no pads.
  probs = regbench.ngram_probs(np.array([A, A, SEP, B]), 1)
  assert _letters(probs[3]) == {"a": approx(2 / 3), "b": approx(1 / 3)}


def test_ngram_rows_of_a_batch_are_the_rows_alone():
  rng = np.random.default_rng(6)
  automata = regbench.languages(3, 8)
  tokens = np.stack([regbench.sample_sequence(rng, a, strings=(4, 4))[:20] for a in automata])
  batch = regbench.ngram_probs(tokens, 3)
  assert batch.shape == (3, 20, regbench.VOCAB_SIZE)
  for row, probs in zip(tokens, batch):
    np.testing.assert_array_equal(regbench.ngram_probs(row, 3), probs)
  assert (batch.sum(-1) <= 1 + 1e-12).all() and not batch[..., SEP].any()


REGBENCH = DataConfig(source="regbench", seq_len=1024, regbench_languages=20, regbench_max_string=9)


def test_data_source_reads_training_and_held_out_languages():
  train, held_out = regbench.train_test_languages(20)
  assert data.vocab_size(REGBENCH) == regbench.VOCAB_SIZE + 1
  # A finite pass over the training split reads every training language once, in seed's order.
  batches = list(data.make_iterator(REGBENCH, split="train", batch_size=4, seed=0, repeat=False))
  again = list(data.make_iterator(REGBENCH, split="train", batch_size=4, seed=0, repeat=False))
  assert len(batches) == 5
  rows = []
  for batch, same in zip(batches, again, strict=True):
    assert batch["tokens"].shape == (4, 1024) and batch["tokens"].max() <= PAD
    for name in batch:
      np.testing.assert_array_equal(batch[name], same[name])
    np.testing.assert_array_equal(batch["loss_mask"], batch["targets"] < regbench.NUM_LETTERS)
    assert not batch["answer_mask"].any()
    rows.extend(np.concatenate([batch["tokens"][:, :1], batch["targets"]], axis=1))
  # Each row is one sequence, padded: its language is the one training language that reads it.
  owners = []
  for row in rows:
    assert row[-1] == PAD  # At most 19 strings of 9 letters: 189 tokens.
    owners.append(next(i for i, a in enumerate(train) if _reads(a, row[row != PAD])))
  assert sorted(owners) == list(range(20))
  # The validation split holds one sequence of each held-out language, in order.
  val = next(data.make_iterator(REGBENCH, split="val", batch_size=8, seed=0, repeat=False))
  for i, (tokens, targets) in enumerate(zip(val["tokens"], val["targets"])):
    row = np.append(tokens[:1], targets)
    assert _reads(held_out[i], row[row != PAD])


def _reads(automaton: regbench.Automaton, tokens: np.ndarray) -> bool:
  try:
    regbench.legal_masks(automaton, tokens)
  except ValueError:
    return False
  return True


def test_data_source_cuts_long_sequences_and_orders_by_seed():
  cfg = DataConfig(source="regbench", seq_len=32, regbench_languages=20)
  first = next(data.make_iterator(cfg, split="train", batch_size=20, seed=0))
  other = next(data.make_iterator(cfg, split="train", batch_size=20, seed=1))
  assert (first["tokens"] != PAD).all() and first["tokens"].shape == (20, 32)
  # Another seed reads the same 20 sequences in another order.
  assert not np.array_equal(first["tokens"], other["tokens"])
  assert sorted(first["tokens"].tolist()) == sorted(other["tokens"].tolist())
