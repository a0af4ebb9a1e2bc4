"""`regbench`: in-context language learning on RegBench's held-out languages.

The languages, sequences and scorers are `mosaics_jax.regbench`'s (training reads them too).

Each example is a sequence of one held-out language (none of them is a training language of
`data.source=regbench`); the model's next-token distributions are scored as seq_icl scores them:
`accuracy`, the share of positions whose greedy next letter the language allows, and `l1`, the
mean L1 distance between the model's distribution and the uniform distribution over the legal
next letters (seq_icl's "TVD", without a factor 1/2: it lies in [0, 2]). The in-context n-gram
baseline on the same sequences is reported beside it (`ngram3_accuracy`, `ngram3_l1`), an
untrained reference that reads only the sequence itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mosaics_jax import config as config_lib, regbench
from mosaics_jax.eval import harness as harness_lib, results as results_lib

NAME = "regbench"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """Which held-out sequences to score."""

  num_examples: int = 200  # Sequences, language i % num_test_languages for sequence i.
  num_test_languages: int = regbench.TEST_LANGUAGES  # The held-out pool (seq_icl's 1000).
  # The longest string; default: the model's training run's (data.regbench_max_string) where its
  # workdir says it, else the paper's.
  max_string: int | None = None
  ngram: int = 3  # The order of the in-context n-gram baseline (seq_icl's eval: 3).

  def __post_init__(self):
    config_lib.check_types(self)
    for name in ("num_examples", "num_test_languages", "max_string", "ngram"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise config_lib.ConfigError(f"regbench.{name} must be >= 1, got {getattr(self, name)}")


def sequences(
    settings: Settings, seed: int, count: int, max_string: int
) -> tuple[list[np.ndarray], list[regbench.Automaton]]:
  """The first `count` test sequences and their languages; sequence i depends on seed and i."""
  _, test = regbench.train_test_languages(1, settings.num_test_languages)
  automata = [test[i % len(test)] for i in range(count)]
  rows = [
      regbench.sample_sequence(np.random.default_rng([seed, i]), automaton, max_string=max_string)
      for i, automaton in enumerate(automata)
  ]
  return rows, automata


def run(harness: harness_lib.Harness, settings: Settings) -> list[results_lib.Result]:
  """accuracy and l1 of the model and of the n-gram baseline on the held-out sequences."""
  vocab = harness.model.config.vocab_size
  if harness.model.tokenizer is not None:
    raise harness_lib.EvalError(
        f"regbench reads RegBench's token ids, but {harness.info.path} reads text (it has a"
        " tokenizer): evaluate a model trained with data.source=regbench"
    )
  if vocab < regbench.VOCAB_SIZE:
    raise harness_lib.EvalError(
        f"regbench needs a model of at least {regbench.VOCAB_SIZE} token ids (18 letters and"
        f" '|'), this one has {vocab}: train it with data.source=regbench"
    )
  max_string = settings.max_string
  if max_string is None:
    max_string = (harness.training_data or {}).get("regbench_max_string", regbench.MAX_STRING)
  settings = dataclasses.replace(settings, max_string=max_string)  # Recorded as used.
  count = harness.count(settings.num_examples)
  rows, automata = sequences(settings, harness.seed, count, max_string)
  longest = max(len(r) for r in rows)
  harness.check_length(longest)
  tokens = np.full((count, longest), regbench.PAD, np.int32)
  probs = np.zeros((count, longest, vocab), np.float32)
  bar = harness.bar(count, NAME)
  for start in range(0, count, harness.batch_size):
    batch = rows[start : start + harness.batch_size]
    for i, log_probs in enumerate(harness.next_log_probs(batch), start):
      tokens[i, : len(rows[i])] = rows[i]
      probs[i, : len(rows[i])] = np.exp(log_probs)
    bar.update(len(batch))
  bar.close()
  model = regbench.scores(probs, tokens, automata)
  ngram = regbench.scores(regbench.ngram_probs(tokens, settings.ngram), tokens, automata)
  fields = dataclasses.asdict(settings)
  prefix = f"ngram{settings.ngram}_"
  return [
      results_lib.Result(NAME, name, float(source[metric]), count, {}, fields)
      for name, source, metric in (
          ("accuracy", model, "accuracy"),
          ("l1", model, "l1"),
          (prefix + "accuracy", ngram, "accuracy"),
          (prefix + "l1", ngram, "l1"),
      )
  ]
