"""The icl_bursty source: its sequences are icl_classification's prompts (parsed back and rebuilt
by the evaluation's own prompt builder), its anonymous labels a fresh permutation per sequence, its
classes none of the evaluation's, its masks where the docstrings put them, its stream
deterministic and resumable, and its settings checked."""

from __future__ import annotations

import collections
import itertools
import re

import numpy as np
import pytest

from mosaics_jax import config as config_lib, icl_data, registry, tokenizers
from mosaics_jax.eval import icl, prompts
from mosaics_jax.model import families
from mosaics_jax.train import data, loop

BYTES = prompts.Alphabet(tokenizers.ByteTokenizer())
# An example as the synthetic template writes it: 8 words of 4 letters, then the label and one of
# the two delimiters.
EXAMPLE = re.compile(r"text: ((?:[a-z]{4} ){7}[a-z]{4})\ncategory: ([a-z_0-9]+)(\n| )")


def _cfg(**kwargs) -> config_lib.DataConfig:
  return config_lib.DataConfig(
      **{"source": "icl_bursty", "tokenizer": "byte", "seq_len": 600, "icl_pool": 64} | kwargs
  )


def _parse(text: str) -> tuple[list[tuple[str, str]], str]:
  """The complete examples (text, label) of a sequence, and its delimiter; asserts the sequence
  is the instruction line and then nothing but examples."""
  instruction = icl.Settings().format().instruction + "\n"
  assert text.startswith(instruction)
  found, at, delimiters = [], len(instruction), set()
  while match := EXAMPLE.match(text, at):
    found.append(match.groups()[:2])
    delimiters.add(match.group(3))
    at = match.end()
  assert len(delimiters) == 1, delimiters
  rest = text[at:]  # An example cut by the sequence's end, if any.
  assert len(rest) < 70 and ("text: ".startswith(rest) or rest.startswith("text: ")), rest
  return found, delimiters.pop()


def _draw(seed: int, pool: icl_data.Vocabulary, **kwargs) -> tuple[str, np.ndarray, np.ndarray]:
  kwargs = {"ways": 4, "anonymous": 0.5, "length": 1200} | kwargs
  return icl_data.bursty_sequence(np.random.default_rng(seed), pool, **kwargs)


def _class_of(text: str, pool: icl_data.Vocabulary) -> int:
  """The pool class whose keywords are the text's words outside the noise words."""
  words = set(text.split()) - set(pool.noise)
  owners = [c for c, keywords in enumerate(pool.keywords) if words <= set(keywords)]
  assert len(owners) == 1, (text, owners)
  return owners[0]


@pytest.fixture(scope="module")
def pool() -> icl_data.Vocabulary:
  return icl_data.training_vocabulary(64)


def test_a_sequence_is_the_evaluation_s_prompt_of_its_examples_and_their_labels(pool):
  fmt = icl.Settings(dataset="synthetic").format(BYTES.fit)
  layouts = collections.Counter()
  for seed in range(40):
    text, _, _ = _draw(seed, pool)
    examples, delimiter = _parse(text)
    names = list(dict.fromkeys(label for _, label in examples))
    assert 2 <= len(names) <= 4
    # Every prefix up to an example's label is the evaluation's prompt of the examples before it
    # as demonstrations and it as the query, followed by the continuation it scores.
    demos = [icl.Example(t, names.index(label)) for t, label in examples]
    for j in range(len(demos)):
      prompt = fmt.prefix(demos[:j], names, delimiter) + fmt.query(demos[j])
      assert text.startswith(prompt + fmt.continuation(names[demos[j].label], delimiter))
    # One label per class, and each class's texts are of one training class.
    classes = collections.defaultdict(set)
    for t, label in examples:
      classes[label].add(_class_of(t, pool))
    assert all(len(c) == 1 for c in classes.values())
    assert len(set.union(*classes.values())) == len(classes)
    anonymous = all(re.fullmatch(r"class_0[0-3]", n) for n in names)
    if not anonymous:
      assert all(n == pool.classes[next(iter(classes[n]))] for n in names)
    labels = [label for _, label in examples]
    runs = [len(list(g)) for _, g in itertools.groupby(labels)]
    grouped = len(set(runs[:4])) == 1 and len(set(labels[: 4 * runs[0]])) == 4 and runs[0] > 1
    layouts[delimiter, anonymous, grouped] += 1
  # Both delimiters, both kinds of labels, grouped and shuffled layouts all occur.
  assert {d for d, _, _ in layouts} == {"\n", " "}
  assert {a for _, a, _ in layouts} == {True, False}
  assert {g for _, _, g in layouts} == {True, False}


def test_anonymous_names_are_a_fresh_permutation_in_every_sequence():
  four = icl_data.training_vocabulary(4)  # Every sequence has the same four classes.
  mappings = []
  for seed in range(60):
    text, _, _ = _draw(seed, four, anonymous=1.0, length=2000)
    examples, _ = _parse(text)
    mappings.append(tuple(sorted({(_class_of(t, four), label) for t, label in examples})))
  assert all(
      len(m) == 4 and {n for _, n in m} == {f"class_0{i}" for i in range(4)} for m in mappings
  )
  # 60 draws of 24 permutations: a fixed mapping, or a few, would show.
  assert len(set(mappings)) >= 15
  assert {(c, n) for m in mappings for c, n in m} == {
      (c, f"class_0{i}") for c in range(4) for i in range(4)
  }
  for seed in range(10):  # Semantic labels are the classes' names, always.
    text, _, _ = _draw(seed, four, anonymous=0.0)
    assert all(label == four.classes[_class_of(t, four)] for t, label in _parse(text)[0])


def test_the_training_classes_share_no_word_with_the_evaluation_s_datasets():
  train = icl_data.training_vocabulary(config_lib.DataConfig().icl_pool)
  assert len(train.classes) == config_lib.DataConfig().icl_pool
  assert len(train.words) == len(train.classes) * 5 + icl_data.NOISE  # All distinct.
  for k in range(2, 17):
    dataset = icl.synthetic(BYTES, k)
    words = set(dataset.classes)
    for example in dataset.train + dataset.test:
      words |= set(example.text.split())
    assert not words & train.words, (k, sorted(words & train.words)[:5])


def test_the_masks_count_all_but_the_texts_and_mark_where_each_label_parts():
  it = data.make_iterator(_cfg(seq_len=1200), split="train", batch_size=4, seed=3)
  batch = next(it)
  assert batch["tokens"].shape == (4, 1200)
  byte = tokenizers.ByteTokenizer()
  kinds = set()
  for row in range(4):
    text = byte.decode(np.concatenate([batch["tokens"][row, :1], batch["targets"][row]]))
    examples, _ = _parse(text)
    in_text = np.zeros(len(text), bool)
    for match in re.finditer(r"text: ([a-z ]+)", text):
      in_text[match.start(1) : match.end(1)] = True
    np.testing.assert_array_equal(batch["loss_mask"][row], ~in_text[1:])
    # One answer per label: its first character that begins no other label of the sequence.
    names = {label for _, label in examples}
    assert len(names) == 4  # All of them are seen: which of them a label must be told from.
    kinds.add(min(names).startswith("class_"))
    answers = np.flatnonzero(batch["answer_mask"][row]) + 1  # Positions in `text`.
    starts = [m.start(1) for m in re.finditer(r"category: ([a-z_0-9]+)(?=[\n ])", text)]
    assert len(starts) == len(examples) and len(answers) in (len(starts), len(starts) + 1)
    for start, (_, label) in zip(starts, examples):
      others = names - {label}
      apart = next(
          i for i in range(len(label)) if not any(o.startswith(label[: i + 1]) for o in others)
      )
      assert [a - start for a in answers if start <= a < start + len(label)] == [apart]
  assert kinds == {True, False}  # Anonymous and semantic labels both.


def test_the_stream_is_deterministic_resumable_and_seeded():
  cfg = _cfg(seq_len=300)
  first = [next(it) for it in [data.make_iterator(cfg, split="train", batch_size=2, seed=5)] * 3]
  again = data.make_iterator(cfg, split="train", batch_size=2, seed=5)
  for want in first:
    got = next(again)
    for name in want:
      np.testing.assert_array_equal(got[name], want[name])
  state = data.make_iterator(cfg, split="train", batch_size=2, seed=5)
  next(state)
  saved = state.get_state()
  resumed = data.make_iterator(cfg, split="train", batch_size=2, seed=5)
  resumed.set_state(saved)
  for want in first[1:]:
    np.testing.assert_array_equal(next(resumed)["tokens"], want["tokens"])
  other = next(data.make_iterator(cfg, split="train", batch_size=2, seed=6))
  assert not np.array_equal(other["tokens"], first[0]["tokens"])
  val = next(data.make_iterator(cfg, split="val", batch_size=2, seed=5))
  assert not np.array_equal(val["tokens"], first[0]["tokens"])
  np.testing.assert_array_equal(
      val["tokens"], next(data.make_iterator(cfg, split="val", batch_size=2, seed=9))["tokens"]
  )


def test_a_run_keeps_the_byte_tokenizer(tmp_path):
  cfg = _cfg()
  assert data.vocab_size(cfg) == 256
  tokenizer, kept = loop._run_tokenizer(cfg, tmp_path)
  assert isinstance(tokenizer, tokenizers.ByteTokenizer) and not kept


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"icl_ways": 1}, "data.icl_ways must be in [2, data.icl_pool], got 1"),
        ({"icl_ways": 9, "icl_pool": 8}, "data.icl_ways must be in [2, data.icl_pool], got 9"),
        ({"icl_anonymous": 1.5}, "data.icl_anonymous must be in [0, 1], got 1.5"),
        ({"icl_anonymous": -0.1}, "data.icl_anonymous must be in [0, 1], got -0.1"),
    ],
)
def test_bad_settings_are_refused_by_name(fields, message):
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    _cfg(**fields)


def test_a_tokenizer_other_than_bytes_or_a_pool_too_large_is_refused():
  with pytest.raises(data.DataError, match="icl_bursty.*data.tokenizer='byte', got 'char'"):
    data.vocab_size(_cfg(tokenizer="char"))
  with pytest.raises(data.DataError, match=r"data.icl_pool=5000 classes: .*too few words"):
    data.make_iterator(_cfg(icl_pool=5000), split="train", batch_size=2, seed=0)


def test_the_icl_experiments_compare_equal_sizes_on_equal_data_whose_context_holds_8_shots():
  mm2, llama = (registry.get(f"{family}-icl-cpu") for family in ("mm2", "llama"))
  assert (mm2.data, mm2.train) == (llama.data, llama.train)
  counts = [families.param_count(e.model) for e in (mm2, llama)]
  assert abs(counts[1] / counts[0] - 1) < 0.1, counts
  # The evaluation's longest 8-shot prompt of 4 classes, with its answer, fits the context.
  settings = icl.Settings(num_classes=4, labels="anonymous")
  dataset = icl.load(settings, BYTES)
  names = icl.label_names(dataset.classes, "anonymous", 0, BYTES)
  demos, queries = icl.pools(dataset, 8, 0)
  fmt = settings.format(BYTES.fit)
  longest = max(
      len(p + fmt.continuation(names[0], v.delimiter))
      for v in icl.VARIANTS
      for p in fmt.prompts(
          icl.demonstrations(demos, 8, v.grouped, 0), names, queries[0], v.delimiter
      )
  )
  assert 2000 < longest <= mm2.data.seq_len
