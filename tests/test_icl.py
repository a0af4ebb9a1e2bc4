"""icl_classification: LongICLBench's prompts (n demonstrations per class, the four variants, the
anonymous labels), no query among the demonstrations, both scorers by hand, an oracle that scores
100 and a wrong one 0 through the whole task, the datasets' files and their errors, the length
limit, and one run of a tiny model."""

from __future__ import annotations

import collections
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaics_jax import config as config_lib, tokenizers
from mosaics_jax.eval import harness as harness_lib, icl, prompts, tasks
from mosaics_jax.model import families
from mosaics_jax.port import pretrained

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
BANKING77 = SHARED / "banking77"
# Every printable ASCII character and the newline: a tokenizer that writes all the prompts.
ASCII = tokenizers.CharTokenizer("\n" + "".join(chr(c) for c in range(32, 127)))
ALPHABET = prompts.Alphabet(ASCII)


def _settings(**kwargs) -> icl.Settings:
  return icl.Settings(**kwargs)


def _examples(*rows) -> tuple[icl.Example, ...]:
  return tuple(icl.Example(text, label) for text, label in rows)


# The prompts.


def test_a_prompt_is_longiclbench_s_instruction_demonstrations_and_query():
  fmt = icl.Settings(dataset="banking77").format()
  demos = _examples(("Where is my card?", 0), ("Is my top up pending?", 1))
  query = icl.Example("My card has not come yet.", 0)
  want = (
      "Given a customer service query, please predict the intent of the query. The predict answer"
      " must come from the demonstration examples with the exact format. The examples are as"
      " follows: \n"
      "service query: Where is my card?\nintent category: card_arrival{d}"
      "service query: Is my top up pending?\nintent category: pending_top_up{d}"
      "service query: My card has not come yet.\nintent category:"
  )
  labels = ("card_arrival", "pending_top_up")
  for delimiter in ("\n", " "):
    assert fmt.prompts(demos, labels, [query], delimiter) == [want.format(d=delimiter)]
    assert fmt.continuation("card_arrival", delimiter) == " card_arrival" + delimiter
  assert fmt.head == "service query:"
  tacred = icl.Settings(dataset="tacred").format()
  fields = icl.Example("Ann works at Acme.", 0, ("Ann", "Acme"))
  assert tacred.example(fields, "per:employee_of") == (
      "sentence: Ann works at Acme.\nthe subject is Ann and the object is Acme\nthe relation"
      " between the two entities is: per:employee_of"
  )


@pytest.mark.parametrize("shots", [1, 2, 5])
def test_n_shots_are_n_demonstrations_per_class_shuffled_or_grouped(shots):
  dataset = icl.synthetic(ALPHABET, 4)
  demo_pools, _ = icl.pools(dataset, 5, seed=0)
  shuffled = icl.demonstrations(demo_pools, shots, False, seed=0)
  grouped = icl.demonstrations(demo_pools, shots, True, seed=0)
  for demos in (shuffled, grouped):
    assert collections.Counter(d.label for d in demos) == {c: shots for c in range(4)}
  assert sorted(shuffled, key=lambda d: d.key) == sorted(grouped, key=lambda d: d.key)
  # Grouped: four runs of one class each; shuffled: classes interleaved (for this seed).
  runs = [label for i, label in enumerate(d.label for d in grouped) if i % shots == 0]
  assert [d.label for d in grouped] == [c for c in runs for _ in range(shots)]
  assert sorted(runs) == [0, 1, 2, 3]
  if shots > 1:
    assert [d.label for d in shuffled] != [d.label for d in grouped]
  # More shots add to the fewer: the first n of each class's pool.
  fewer = icl.demonstrations(demo_pools, 1, True, seed=0)
  assert {d.key for d in fewer} <= {d.key for d in grouped}
  # The order depends on the seed.
  assert icl.demonstrations(demo_pools, shots, False, seed=1) != shuffled or shots == 1


def test_the_variants_differ_in_delimiter_and_order():
  assert {(v.name, v.delimiter, v.grouped) for v in icl.VARIANTS} == {
      ("newline-shuffled", "\n", False),
      ("newline-grouped", "\n", True),
      ("space-shuffled", " ", False),
      ("space-grouped", " ", True),
  }


def test_anonymous_labels_are_a_seeded_permutation():
  classes = [f"name{i}" for i in range(12)]
  names = icl.label_names(classes, "anonymous", 0, ALPHABET)
  assert sorted(names) == [f"class_{i:02d}" for i in range(12)]
  assert names != tuple(sorted(names))  # Not in the classes' order.
  assert icl.label_names(classes, "anonymous", 0, ALPHABET) == names
  assert icl.label_names(classes, "anonymous", 1, ALPHABET) != names
  assert icl.label_names(classes, "semantic", 0, ALPHABET) == tuple(classes)
  big = icl.label_names([str(i) for i in range(120)], "anonymous", 0, ALPHABET)
  assert sorted(big)[:2] == ["class_000", "class_001"]
  # A character model without digits or "_": letters, distinct; semantic names lose the "_".
  shakespeare = prompts.Alphabet(tokenizers.CharTokenizer.from_text(SHAKESPEARE.read_text()))
  letters = icl.label_names(classes, "anonymous", 0, shakespeare)
  assert len(set(letters)) == 12 and all(re.fullmatch("class [a-z]{2}", n) for n in letters)
  assert icl.label_names(["card_arrival"], "semantic", 0, shakespeare) == ("card arrival",)
  with pytest.raises(ValueError, match="cannot write the class names apart"):
    icl.label_names(["a1", "a2"], "semantic", 0, shakespeare)


def test_no_query_is_among_the_demonstrations():
  train = _examples(("alpha", 0), ("beta", 0), ("gamma", 1), ("delta", 1))
  test = _examples(("alpha", 0), ("omega", 0), ("delta", 1), ("sigma", 1))
  demo_pools, query_pools = icl.pools(icl.Dataset(("a", "b"), train, test), 2, seed=0)
  assert {e.text for p in query_pools for e in p} == {"omega", "sigma"}
  # One file: a class's first demonstrations, its queries the rest.
  single = icl.Dataset(("a", "b"), train + _examples(("epsilon", 0), ("zeta", 1)), None)
  demo_pools, query_pools = icl.pools(single, 2, seed=0)
  shown = {e.key for p in demo_pools for e in p}
  assert [len(p) for p in demo_pools] == [2, 2] and [len(p) for p in query_pools] == [1, 1]
  assert not shown & {e.key for p in query_pools for e in p}
  fmt = _settings().format()
  with pytest.raises(ValueError, match="among the demonstrations"):
    fmt.prompts(train, ("a", "b"), [icl.Example("beta", 0)], "\n")


def test_queries_are_drawn_round_robin_over_the_classes():
  pools = [
      _examples(("a1", 0), ("a2", 0)),
      _examples(
          ("b1", 1),
      ),
      _examples(("c1", 2), ("c2", 2)),
  ]
  drawn = icl.round_robin(pools, 5)
  assert [e.text for e in drawn] == ["a1", "b1", "c1", "a2", "c2"]
  assert len(icl.round_robin(pools, 99)) == 5


# Scoring.


def test_a_generated_label_is_read_as_longiclbench_reads_it():
  head = "service query:"
  assert icl.prediction(" card_arrival\nservice query: Where?", head) == "card_arrival"
  assert icl.prediction(" Card_Arrival service query: Where?", head) == "card_arrival"
  assert icl.prediction("\n\n  class_03  \nclass_04", head) == "class_03"
  assert icl.prediction(" top up failed", "") == "top up failed"
  assert icl.exact_match(["card_arrival", "x", "class_01"], ["Card_Arrival", "y", "class_01"]) == (
      pytest.approx(200 / 3)
  )
  scores = np.array([[-1.0, -3.0, -2.0], [-5.0, -4.0, -0.5], [-2.0, -1.0, -9.0]])
  assert icl.likelihood_accuracy(scores, [0, 2, 0]) == pytest.approx(200 / 3)
  # LongICLBench's TACRED F1: 2 right of 4; 3 predictions are labels.
  predictions = ["per:title", "org:founded", "nonsense", "per:age"]
  labels = ["per:title", "org:founded_by", "per:age", "per:age"]
  precision, recall = 2 / 3, 2 / 4
  want = 100 * 2 * precision * recall / (precision + recall)
  assert icl.f1(predictions, labels, ["per:title", "org:founded", "per:age"]) == pytest.approx(want)
  with pytest.raises(ValueError, match="2 predictions for 1 labels"):
    icl.exact_match(["a", "b"], ["a"])


# The whole task through a fake model.


class Oracle(harness_lib.Harness):
  """A harness whose model reads the query's class from a table of the dataset and answers the
  label the prompt's demonstrations give that class (`wrong`: the next class's label)."""

  def __init__(self, dataset, head, middle, *, wrong=False, seed=0, limit=None, tokenizer=ASCII):
    self.classes = {e.text: e.label for e in (*dataset.train, *(dataset.test or ()))}
    self.head, self.middle, self.wrong, self.seed, self.limit = head, middle, wrong, seed, limit
    self._tokenizer = tokenizer
    self.progress, self.prompts, self.checked, self.lengths = False, [], [], []

  @property
  def tokenizer(self):
    return self._tokenizer

  @property
  def batch_size(self):
    return 4

  def check_length(self, length):
    self.checked.append(length)

  def answer(self, prompt: str) -> str:
    *demos, query = prompt.split(self.head + " ")[1:]
    shown = {}
    for demo in demos:
      text, label = demo.split(self.middle)
      shown[self.classes[text]] = label.strip()
    c = self.classes[query.removesuffix(self.middle.rstrip())]
    return shown[(c + 1) % len(shown) if self.wrong else c]

  def generate_text(self, prompts, max_new_tokens, length, bar=None):
    self.prompts += prompts
    self.lengths.append(length)
    for p in prompts:
      assert len(self.tokenizer.encode(p)) <= length - max_new_tokens
    if bar is not None:
      bar.update(len(prompts))
    # A model that goes on with the next example on the line.
    return [f" {self.answer(p)} {self.head} more" for p in prompts]

  def continuation_scores(self, context, continuations):
    right = self.answer(self.tokenizer.decode(context))
    return [
        (0.0 if self.tokenizer.decode(c).strip() == right else -1.0, False) for c in continuations
    ]


def _run(harness, **kwargs):
  settings = _settings(**kwargs)
  return icl.run(harness, settings)


def _by_row(results):
  return {(r.row["shots"], r.row.get("variant"), r.metric): r for r in results}


@pytest.mark.parametrize("labels", ["anonymous", "semantic"])
def test_an_oracle_scores_100_and_a_wrong_answer_0(labels):
  dataset = icl.synthetic(ALPHABET, 3)
  kwargs = dict(num_classes=3, shots=(1, 2), num_examples=7, labels=labels)
  found = _by_row(_run(Oracle(dataset, "text:", "\ncategory: "), **kwargs))
  variants = [None, *(v.name for v in icl.VARIANTS)]
  metrics = ("exact_match", "likelihood_accuracy", "prompt_tokens")
  assert set(found) == {(n, v, m) for n in (1, 2) for v in variants for m in metrics}
  for (_, _, metric), r in found.items():
    assert r.num_examples == 7 and r.task == icl.NAME
    if metric != "prompt_tokens":
      assert r.value == 100.0
  assert found[2, None, "prompt_tokens"].value > found[1, None, "prompt_tokens"].value
  wrong = _by_row(_run(Oracle(dataset, "text:", "\ncategory: ", wrong=True), **kwargs))
  assert {r.value for (_, _, m), r in wrong.items() if m != "prompt_tokens"} == {0.0}


def test_the_task_is_deterministic_for_the_seed_and_draws_the_queries_round_robin():
  dataset = icl.synthetic(ALPHABET, 4)
  runs = []
  for seed in (0, 0, 1):
    oracle = Oracle(dataset, "text:", "\ncategory: ", seed=seed)
    results = _run(oracle, num_classes=4, shots=(2,), num_examples=8)
    runs.append((oracle.prompts, [(r.metric, r.row, r.value) for r in results]))
  assert runs[0] == runs[1] and runs[0][0] != runs[2][0]
  prompts_ = runs[0][0][:8]  # newline-shuffled, the first variant.
  assert [_query_class(p, dataset) for p in prompts_] == [0, 1, 2, 3, 0, 1, 2, 3]
  # Two demonstrations of each of 4 classes in every prompt.
  assert all(p.count("\ncategory: ") == 8 for p in runs[0][0])


def _query_class(prompt, dataset):
  text = prompt.rsplit("text: ", 1)[1].removesuffix("\ncategory:")
  return next(e.label for e in dataset.test if e.text == text)


def test_limit_caps_the_queries_and_the_settings_record_what_ran():
  dataset = icl.synthetic(ALPHABET, 2)
  results = _run(Oracle(dataset, "text:", "\ncategory: ", limit=3), num_classes=2, shots=(1,))
  assert {r.num_examples for r in results} == {3}
  assert results[0].settings["num_examples"] == 3 and results[0].settings["num_classes"] == 2
  assert results[0].settings["max_new_tokens"] >= 1


def test_settings_beyond_max_length_are_skipped_and_memory_is_checked_first():
  dataset = icl.synthetic(ALPHABET, 3)
  oracle = Oracle(dataset, "text:", "\ncategory: ")
  results = _run(oracle, num_classes=3, shots=(1, 8), num_examples=3, max_length=512)
  found = _by_row(results)
  assert found[8, None, "prompt_tokens"].num_examples == 0
  assert found[8, None, "prompt_tokens"].value > 512
  assert not any(n == 8 and m != "prompt_tokens" for n, _, m in found)
  assert found[1, None, "exact_match"].value == 100.0
  assert oracle.checked == [max(oracle.lengths)] and max(oracle.lengths) <= 512
  with pytest.raises(harness_lib.EvalError, match="every setting needs more than max_length=64"):
    _run(oracle, num_classes=3, shots=(1,), max_length=64)


# The datasets.


@pytest.mark.skipif(not BANKING77.is_dir(), reason="no Banking77 files")
@pytest.mark.slow
def test_banking77_is_read_from_its_csv_files_and_runs_with_semantic_labels():
  dataset = icl.load(_settings(dataset="banking77", path=str(BANKING77)), ALPHABET)
  assert len(dataset.classes) == 77 and len(dataset.train) == 10003 and len(dataset.test) == 3080
  # The classes in their order in the training file (LongICLBench's), which categories.json has.
  assert dataset.classes == tuple(json.loads((BANKING77 / "categories.json").read_text()))
  assert dataset.train[0] == icl.Example("I am still waiting on my card?", 0)
  small = _settings(dataset="banking77", path=str(BANKING77), num_classes=3)
  dataset = icl.load(small, ALPHABET)
  assert dataset.classes == ("card_arrival", "card_linking", "exchange_rate")
  assert {e.label for e in dataset.test} == {0, 1, 2}
  oracle = Oracle(dataset, "service query:", "\nintent category: ")
  kwargs = dict(num_classes=3, shots=(1, 2), labels="semantic", num_examples=6)
  results = _run(oracle, dataset="banking77", path=str(BANKING77), **kwargs)
  assert {r.value for r in results if r.metric != "prompt_tokens"} == {100.0}
  assert "intent category: card_linking\n" in oracle.prompts[0]


def test_the_synthetic_dataset_is_fixed_writable_and_its_splits_disjoint():
  shakespeare = prompts.Alphabet(tokenizers.CharTokenizer.from_text(SHAKESPEARE.read_text()))
  dataset = icl.synthetic(shakespeare, 5)
  assert dataset == icl.synthetic(shakespeare, 5)
  assert len(dataset.classes) == len(set(dataset.classes)) == 5
  assert collections.Counter(e.label for e in dataset.train) == {c: 64 for c in range(5)}
  assert not {e.text for e in dataset.train} & {e.text for e in dataset.test}
  for e in (*dataset.train, *dataset.test):
    assert shakespeare.writes_all(e.text) and len(e.text.split()) == 8
  # A class's texts share its keywords: each text holds 3 of 4.
  words = collections.Counter(w for e in dataset.train if e.label == 0 for w in set(e.text.split()))
  assert len([w for w, n in words.items() if n > 20]) == 4


def test_goemotions_tsv_keeps_single_label_comments_with_standard_or_given_names(tmp_path):
  rows = ["I love it\t18\tid1", "Thanks!\t15\tid2", "So sad and angry\t2,25\tid3", "ok\t27\tid4"]
  (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
  (tmp_path / "test.tsv").write_text("Wow, thanks\t15\tid5\nHate this\t2\tid6\n")
  dataset = icl.load(_settings(dataset="goemotions", path=str(tmp_path)), ALPHABET)
  assert dataset.classes == ("love", "gratitude", "neutral")
  assert [e.text for e in dataset.train] == ["I love it", "Thanks!", "ok"]
  assert [e.text for e in dataset.test] == ["Wow, thanks"]  # anger has no demonstrations.
  names = tmp_path / "names.txt"
  names.write_text("\n".join(f"emotion{i}" for i in range(28)) + "\n")
  given = icl.load(
      _settings(dataset="goemotions", path=str(tmp_path), label_names=str(names)), ALPHABET
  )
  assert given.classes == ("emotion18", "emotion15", "emotion27")
  (tmp_path / "test.tsv").write_text("just one cell\n")
  with pytest.raises(ValueError, match=r"test.tsv:1 is not GoEmotions'"):
    icl.load(_settings(dataset="goemotions", path=str(tmp_path)), ALPHABET)


def test_tacred_json_of_ldc_or_longiclbench_records(tmp_path):
  ldc = [
      {
          "token": ["Ann", "Lee", "works", "for", "Acme", "-LRB-", "Boston", "-RRB-", "."],
          "subj_start": 0,
          "subj_end": 1,
          "obj_start": 4,
          "obj_end": 4,
          "relation": "per:employee_of",
      },
      {
          "token": ["x"],
          "subj_start": 0,
          "subj_end": 0,
          "obj_start": 0,
          "obj_end": 0,
          "relation": "no_relation",
      },
  ]
  (tmp_path / "train.json").write_text(json.dumps(ldc))
  processed = [
      {
          "sentence": "Bo, 40, sings.",
          "subject_entity": "Bo",
          "object_entity": "40",
          "relation": "per:age",
      }
  ]
  (tmp_path / "test.json").write_text(json.dumps(processed + ldc[:1]))
  dataset = icl.load(_settings(dataset="tacred", path=str(tmp_path)), ALPHABET)
  assert dataset.classes == ("per:employee_of",)
  assert dataset.train == (icl.Example("Ann Lee works for Acme (Boston).", 0, ("Ann Lee", "Acme")),)
  assert dataset.test == dataset.train  # per:age has no demonstrations; pools drop the repeat.
  (tmp_path / "train.json").write_text(json.dumps([{"sentence": "s", "relation": "per:age"}]))
  with pytest.raises(ValueError, match="train.json: record 1 has the fields"):
    icl.load(_settings(dataset="tacred", path=str(tmp_path)), ALPHABET)


def test_a_csv_or_jsonl_file_and_the_errors_that_name_the_file(tmp_path):
  lines = [{"text": f"query {i}", "label": ["card", "fee"][i % 2]} for i in range(6)]
  (tmp_path / "all.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
  dataset = icl.load(_settings(dataset="banking77", path=str(tmp_path / "all.jsonl")), ALPHABET)
  assert dataset.classes == ("card", "fee") and dataset.test is None and len(dataset.train) == 6
  (tmp_path / "train.csv").write_text("sentence,category\nhello,card\n")
  with pytest.raises(ValueError, match=r"train.csv has the columns \['sentence', 'category'\]"):
    icl.load(_settings(dataset="banking77", path=str(tmp_path / "train.csv")), ALPHABET)
  with pytest.raises(ValueError, match=r"has no test.csv or test.jsonl"):
    icl.load(_settings(dataset="banking77", path=str(tmp_path)), ALPHABET)
  with pytest.raises(ValueError, match="nowhere.csv does not exist"):
    icl.load(_settings(dataset="banking77", path=str(tmp_path / "nowhere.csv")), ALPHABET)
  (tmp_path / "ids.csv").write_text("text,label\nhello,3\n")
  with pytest.raises(ValueError, match="ids.csv: record 1 has label id 3: give the class names"):
    icl.load(_settings(dataset="banking77", path=str(tmp_path / "ids.csv")), ALPHABET)
  with pytest.raises(ValueError, match="set icl_classification.path=DIR"):
    icl.load(_settings(dataset="banking77"), ALPHABET)
  # Through the task: an EvalError, before any work.
  oracle = Oracle(icl.synthetic(ALPHABET, 2), "text:", "\ncategory: ")
  with pytest.raises(harness_lib.EvalError, match="icl_classification: .*nowhere.csv"):
    _run(oracle, dataset="banking77", path=str(tmp_path / "nowhere.csv"))
  assert not oracle.prompts and not oracle.checked


@pytest.mark.parametrize(
    "assignment, error",
    [
        ("icl_classification.shots=[2,2]", "shots must be distinct numbers >= 1"),
        ("icl_classification.shots=[0]", "shots must be distinct numbers >= 1"),
        ("icl_classification.num_classes=1", "num_classes must be >= 2"),
        ("icl_classification.path=x.csv", "synthetic dataset is built in and reads no file"),
        (
            "icl_classification.banking77_template=q: {label} {text}",
            "must end with its one {label}",
        ),
        ("icl_classification.tacred_template={text} {label}", r"needs the fields \['object'"),
        ("icl_classification.synthetic_template={txt} {label}", "fields are"),
    ],
)
def test_bad_settings_are_named(assignment, error):
  with pytest.raises(config_lib.ConfigError, match=error):
    tasks.settings([icl.NAME], [assignment])


def test_a_template_with_newlines_is_set_as_a_json_string():
  settings = tasks.settings(
      [icl.NAME], ['icl_classification.synthetic_template="in: {text}\\nout: {label}"']
  )[icl.NAME]
  assert settings.format().query_template == "in: {text}\nout:"


# A tiny model.


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
  """A tiny v2 model of the tinyshakespeare characters, exported with its tokenizer; its
  parameters drawn at random in their shapes (compiling the init would take longer than the
  test)."""
  chars = tokenizers.CharTokenizer.from_text(SHAKESPEARE.read_text())
  cfg = config_lib.MosaicV2Config(
      vocab_size=chars.vocab_size,
      num_layers=2,
      width=32,
      num_heads=4,
      ffn_width=48,
      short_term_window=8,
      long_term_delay=4,
  )
  model = families.build_model(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32), shapes)
  path = tmp_path_factory.mktemp("char") / "model"
  pretrained.save_exported(path, cfg, params, step=1, tokenizer=chars)
  return path


@pytest.mark.slow
def test_a_tiny_model_runs_the_synthetic_task(char_model):
  harness = harness_lib.Harness.load(str(char_model), batch_size=2, progress=False)
  settings = tasks.settings(
      [icl.NAME],
      [
          "icl_classification.num_classes=2",
          "icl_classification.shots=[1,2]",
          "icl_classification.num_examples=2",
      ],
  )[icl.NAME]
  results = tasks.get(icl.NAME).run(harness, settings)
  found = _by_row(results)
  variants = [None, *(v.name for v in icl.VARIANTS)]
  metrics = ("exact_match", "likelihood_accuracy", "prompt_tokens")
  assert set(found) == {(n, v, m) for n in (1, 2) for v in variants for m in metrics}
  for (n, variant, metric), r in found.items():
    assert r.num_examples == 2
    if metric != "prompt_tokens":
      assert r.value in (0.0, 50.0, 100.0)
      if variant is None:  # The best variant's.
        assert r.value == max(found[n, v.name, metric].value for v in icl.VARIANTS)
  assert found[1, "newline-shuffled", "prompt_tokens"].value < found[2, None, "prompt_tokens"].value
