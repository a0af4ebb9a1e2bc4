"""Synthetic recall tasks: induction heads, multi-query associative recall (MQAR) and needles.

Training draws them (`data.source=synthetic_induction`, `synthetic_mqar` or `synthetic_needles`)
and evaluation draws them again at other lengths (the `synthetic` task of `mosaics-eval`), so both
read this module.
Each function returns a sequence of n = t + 1 token ids and the answers, a mask of the t targets
(sequence[1:]) that the rule determines: the loss and the accuracy of the tasks are taken there.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from jaxtyping import Bool, Integer

Kind = Literal["synthetic_induction", "synthetic_mqar", "synthetic_needles"]
KINDS: tuple[Kind, ...] = ("synthetic_induction", "synthetic_mqar", "synthetic_needles")


def induction(
    rng: np.random.Generator, *, seq_len: int, task_vocab: int
) -> tuple[Integer[np.ndarray, " n"], Bool[np.ndarray, " t"]]:
  """A random context, then recalls "a b" of random pairs of neighbours in it: "... a b ... a -> b".

  The context holds h = seq_len // 2 + 1 symbols of range(task_vocab), drawn without replacement
  when task_vocab >= h. The rest of the seq_len + 1 tokens are queries: for a random i < h - 1, the
  pair (context[i], context[i + 1]), so the target at the query is the symbol that followed its
  earlier occurrence. The distance back to that occurrence is random, so no position rule solves the
  task: it takes an induction head. A query is an answer only when every earlier occurrence of its
  symbol was followed by that same symbol (repeated symbols may make the rule ambiguous). The
  context is unpredictable noise, so the loss is taken on the answers only.
  """
  half = seq_len // 2 + 1
  context = rng.choice(task_vocab, half, replace=task_vocab < half)
  starts = rng.integers(0, half - 1, size=-(-(seq_len + 1 - half) // 2))
  recalls = np.stack([context[starts], context[starts + 1]], axis=1).reshape(-1)
  sequence = np.concatenate([context, recalls])[: seq_len + 1]
  answers = np.zeros(seq_len, bool)
  for t in range(half, seq_len, 2):
    earlier = np.flatnonzero(sequence[:t] == sequence[t])
    answers[t] = np.all(sequence[earlier + 1] == sequence[t + 1])
  return sequence, answers


def mqar(
    rng: np.random.Generator, *, seq_len: int, task_vocab: int, task_pairs: int
) -> tuple[Integer[np.ndarray, " n"], Bool[np.ndarray, " t"]]:
  """Multi-query associative recall (Zoology): key-value pairs, then every key again for recall.

  With n = task_pairs, the sequence is k1 v1 ... kn vn, then the keys in a random order, each
  followed by its value, then the pad id task_vocab up to seq_len + 1 tokens (so seq_len needs
  4 * task_pairs <= seq_len + 1). Keys are distinct, drawn from [0, task_vocab // 2); values from
  [task_vocab // 2, task_vocab). The answers are the values of the recall part: the targets at the
  positions of the repeated keys.
  """
  keys = rng.choice(task_vocab // 2, task_pairs, replace=False)
  values = rng.integers(task_vocab // 2, task_vocab, task_pairs)
  order = rng.permutation(task_pairs)
  sequence = np.full(seq_len + 1, task_vocab)
  sequence[: 2 * task_pairs] = np.stack([keys, values], axis=1).ravel()
  sequence[2 * task_pairs : 4 * task_pairs] = np.stack([keys[order], values[order]], axis=1).ravel()
  answers = np.zeros(seq_len, bool)
  answers[2 * task_pairs : 4 * task_pairs : 2] = True
  return sequence, answers


def needles(
    rng: np.random.Generator, *, seq_len: int, task_vocab: int, task_pairs: int
) -> tuple[Integer[np.ndarray, " n"], Bool[np.ndarray, " t"]]:
  """Keys hidden once each in a noisy context, then recalled: "... k v ... k -> v".

  With p = task_pairs and n = seq_len + 1 tokens, the context is n - 2p filler tokens drawn with
  replacement from range(p, task_vocab), into which the p keys, the symbols range(p), are written
  once each, never two side by side, so each is followed by a filler token, its value. Then the
  keys again in a random order, each followed by its value. The answers are the targets at the
  recalled keys. Unlike `induction`, the queried symbols occur once, whatever the length: at any
  length every recall is unambiguous and reaches back up to n - 2p tokens (length extrapolation).
  Needs 4p <= n and p < task_vocab.
  """
  n = seq_len + 1
  if not 1 <= task_pairs < task_vocab or 4 * task_pairs > n:
    raise ValueError(
        f"needles need 1 <= task_pairs < task_vocab and 4 * task_pairs <= seq_len + 1, got"
        f" task_pairs {task_pairs}, task_vocab {task_vocab}, seq_len {seq_len}"
    )
  width = n - 2 * task_pairs
  context = rng.integers(task_pairs, task_vocab, width)
  # Sorted distinct draws plus 0, 1, 2, ...: positions at least 2 apart, the last <= width - 2.
  positions = np.sort(rng.choice(width - task_pairs, task_pairs, replace=False))
  positions += np.arange(task_pairs)
  keys = rng.permutation(task_pairs)
  context[positions] = keys
  order = rng.permutation(task_pairs)
  recalls = np.stack([keys[order], context[positions[order] + 1]], axis=1).reshape(-1)
  sequence = np.concatenate([context, recalls])
  answers = np.zeros(seq_len, bool)
  answers[width::2] = True
  return sequence, answers


def draw(
    rng: np.random.Generator, kind: Kind, *, seq_len: int, task_vocab: int, task_pairs: int
) -> tuple[Integer[np.ndarray, " n"], Bool[np.ndarray, " t"]]:
  """One sequence of the task `kind` and its answers."""
  if kind == "synthetic_induction":
    return induction(rng, seq_len=seq_len, task_vocab=task_vocab)
  if kind == "synthetic_needles":
    return needles(rng, seq_len=seq_len, task_vocab=task_vocab, task_pairs=task_pairs)
  return mqar(rng, seq_len=seq_len, task_vocab=task_vocab, task_pairs=task_pairs)
