"""RULER's synthetic tasks (`mosaics_jax.eval.ruler`) and scorers (`mosaics_jax.eval.scoring`).

Every task's prompts encode with a tinyshakespeare character tokenizer and a byte tokenizer, fit
(and nearly fill) the length, and an oracle that reads the answers out of the prompt with its own
parsing (regexes, chain following, counting) scores 100. Answers occur exactly once where the task
says so; generation is deterministic per seed and per example; errors name what is wrong.
"""

from __future__ import annotations

import collections
import pathlib
import re

import pytest

from mosaics_jax import tokenizers
from mosaics_jax.eval import prompts, ruler, scoring

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
pytestmark = pytest.mark.skipif(not SHAKESPEARE.exists(), reason="tinyshakespeare missing")

NUM_EXAMPLES = 3

# (id, task, settings, lengths): RULER's configs and variants, at lengths where the character
# tokenizer's prompts fit (noise haystacks need a noise line per needle, as RULER's; cwe's 8192 is
# RULER's long form, from 4096 tokens on).
CASES = [
    ("niah_single", "niah_single", ruler.NiahSingleSettings(), (512, 2048)),
    ("niah_single_1", "niah_single", ruler.NiahSingleSettings(type_haystack="noise"), (1024, 2048)),
    ("niah_single_3", "niah_single", ruler.NiahSingleSettings(type_needle_v="uuids"), (512, 2048)),
    ("niah_multikey", "niah_multikey", ruler.NiahMultikeySettings(), (1024, 2048)),
    (
        "niah_multikey_2",
        "niah_multikey",
        ruler.NiahMultikeySettings(type_haystack="needle", num_needle_k=1),
        (1024, 2048),
    ),
    (
        "niah_multikey_3",
        "niah_multikey",
        ruler.NiahMultikeySettings(
            type_haystack="needle", num_needle_k=1, type_needle_k="uuids", type_needle_v="uuids"
        ),
        (1024, 2048),
    ),
    (
        "niah_multikey_word_values",
        "niah_multikey",
        ruler.NiahMultikeySettings(type_haystack="noise", type_needle_v="words"),
        (2048, 4096),
    ),
    ("niah_multivalue", "niah_multivalue", ruler.NiahMultivalueSettings(), (1024, 2048)),
    ("niah_multiquery", "niah_multiquery", ruler.NiahMultiquerySettings(), (1024, 2048)),
    ("vt", "vt", ruler.VTSettings(), (2048, 4096)),
    ("vt_no_fewshot", "vt", ruler.VTSettings(add_fewshot=False), (1024, 2048)),
    ("vt_essay", "vt", ruler.VTSettings(type_haystack="essay", num_chains=2), (2048, 4096)),
    ("cwe", "cwe", ruler.CWESettings(), (2048, 8192)),
    ("cwe_no_fewshot", "cwe", ruler.CWESettings(num_fewshot=0, num_cw=5), (1024, 2048)),
    ("fwe", "fwe", ruler.FWESettings(), (1024, 2048)),
    ("fwe_flat", "fwe", ruler.FWESettings(alpha=1.5, coded_wordlen=4, vocab_size=30), (2048,)),
]


@pytest.fixture(scope="module")
def shakespeare() -> str:
  return SHAKESPEARE.read_text()


@pytest.fixture(scope="module", params=["char", "byte"])
def tokenizer(request, shakespeare):
  if request.param == "char":
    return tokenizers.CharTokenizer.from_text(shakespeare)
  return tokenizers.ByteTokenizer()


# --- Oracles: the answers read from a prompt, without the generator's code. ---

_NEEDLE = re.compile(r"One of the special magic \w+ for (.+?) is: ([^.\n]+)\.")
_NIAH_QUESTION = re.compile(
    r"What (?:are all|is) the special magic \w+ for (.+?) mentioned in the provided text\?"
)
_ASSIGNMENT = re.compile(r"VAR ([A-Z]+)\s*=?\s*(VAR [A-Z]+|[a-z0-9]+)")


def _niah_oracle(prompt: str) -> list[str]:
  (query,) = _NIAH_QUESTION.findall(prompt)
  keys = re.split(r", and |, ", query)
  needles = _NEEDLE.findall(prompt)
  return [value for key in keys for needle_key, value in needles if needle_key == key]


def _vt_question(prompt: str) -> str:
  """The prompt from its last question's instruction on (past any solved example)."""
  return prompt[prompt.rindex("Memorize and track") :]


def _vt_oracle(prompt: str) -> list[str]:
  question = _vt_question(prompt)
  (value,) = set(re.findall(r"assigned the value (\w+)", question))
  holders, names = {value}, []
  for name, source in _ASSIGNMENT.findall(question):  # Lines come in chain order.
    if source.removeprefix("VAR ") in holders:
      holders.add(name)
      names.append(name)
  return names


def _cwe_counts(prompt: str) -> collections.Counter:
  question = prompt[prompt.rindex("Below is a numbered list") :]
  return collections.Counter(re.findall(r"[a-z]+", question.split("\n")[1]))


def _fwe_counts(prompt: str) -> collections.Counter:
  context = prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
  return collections.Counter(word for word in context.split() if word != "...")


def _oracle(name: str, settings, prompt: str) -> list[str]:
  if name.startswith("niah"):
    return _niah_oracle(prompt)
  if name == "vt":
    return _vt_oracle(prompt)
  if name == "cwe":
    return _top(_cwe_counts(prompt), settings.num_cw)
  return _top(_fwe_counts(prompt), 3)


def _top(counts: collections.Counter, k: int) -> list[str]:
  """The k most common words, asserting that no other word is as common as the k-th."""
  ranked = counts.most_common()
  if len(ranked) > k:
    assert ranked[k - 1][1] > ranked[k][1]
  return [word for word, _ in ranked[:k]]


def _check_once(name: str, settings, example: scoring.Example) -> None:
  """Each answer occurs where the task puts it and nowhere else (ignoring case, as scoring)."""
  low = example.prompt.lower()
  if name.startswith("niah"):
    for answer in example.answers:
      assert low.count(answer.lower()) == 1, answer
    (query,) = _NIAH_QUESTION.findall(example.prompt)
    for key in re.split(r", and |, ", query):
      # In its needles, the question and the answer prefix.
      assert low.count(key.lower()) == settings.num_needle_v + 2, key
  elif name == "vt":
    question = _vt_question(example.prompt)
    for i, answer in enumerate(example.answers):
      # Assigned, then used by the next hop; the last one only assigned.
      mentions = 1 if i == len(example.answers) - 1 else 2
      assert low.count(answer.lower()) == question.count(answer) == mentions, answer
  elif name == "cwe":
    counts = _cwe_counts(example.prompt)
    others = [count for word, count in counts.items() if word not in example.answers]
    assert len({counts[a] for a in example.answers}) == 1  # Every common word as often.
    assert counts[example.answers[0]] > max(others, default=0)
  else:
    counts = _fwe_counts(example.prompt)
    assert all(counts[a] >= 1 for a in example.answers)


@pytest.mark.parametrize(("case", "name", "settings", "lengths"), CASES, ids=[c[0] for c in CASES])
def test_prompts_fit_and_an_oracle_scores_100(
    case, name, settings, lengths, tokenizer, shakespeare
):
  del case
  task = ruler.TASKS[name]
  for length in lengths:
    examples = ruler.generate(
        name,
        settings,
        tokenizer=tokenizer,
        length=length,
        num_examples=NUM_EXAMPLES,
        seed=7,
        haystack=shakespeare,
    )
    assert len(examples) == NUM_EXAMPLES
    for example in examples:
      ids = tokenizer.encode(example.prompt)
      assert tokenizer.decode(ids) == example.prompt
      total = prompts.count_tokens(tokenizer, example.prompt) + task.tokens_to_generate
      assert total <= length
      if length >= 2048:  # Long enough that one haystack unit is a small share of it.
        assert total >= 0.9 * length, (total, length)
      oracle = _oracle(name, settings, example.prompt)
      assert sorted(oracle) == sorted(example.answers)
      assert scoring.string_match_all([" ".join(oracle)], [example.answers]) == 100
      assert scoring.string_match_all([""], [example.answers]) == 0
      _check_once(name, settings, example)
    assert len({e.prompt for e in examples}) == NUM_EXAMPLES


def test_character_prompts_use_letters_for_numbers(shakespeare):
  char = tokenizers.CharTokenizer.from_text(shakespeare)
  (example,) = ruler.generate(
      "niah_single",
      ruler.NiahSingleSettings(type_needle_v="uuids"),
      tokenizer=char,
      length=1024,
      num_examples=1,
      seed=0,
      haystack=shakespeare,
  )
  (answer,) = example.answers
  assert re.fullmatch(r"[a-z]{8}-[a-z]{4}-[a-z]{4}-[a-z]{4}-[a-z]{12}", answer)
  assert "A special magic uuid is hidden" in example.prompt  # RULER's singular rewording.
  byte = ruler.generate(
      "vt",
      ruler.VTSettings(),
      tokenizer=tokenizers.ByteTokenizer(),
      length=4096,
      num_examples=1,
      seed=0,
  )[0]
  assert re.search(r"VAR [A-Z]{5} = \d{5}\n", byte.prompt)
  assert "5 variables are assigned the value" in byte.prompt


@pytest.mark.parametrize("name", list(ruler.TASKS))
def test_deterministic_per_seed_and_example(name, shakespeare):
  char = tokenizers.CharTokenizer.from_text(shakespeare)
  settings = ruler.TASKS[name].settings_class()
  make = lambda seed, n: ruler.generate(
      name, settings, tokenizer=char, length=2048, num_examples=n, seed=seed, haystack=shakespeare
  )
  first = make(3, 3)
  assert make(3, 3) == first
  assert make(3, 2) == first[:2]  # Example i does not depend on how many are asked for.
  assert [e.prompt for e in make(4, 3)] != [e.prompt for e in first]


def test_settings_defaults_are_rulers():
  niah = lambda name: ruler.TASKS[name].settings_class()
  assert [
      (s.type_haystack, s.type_needle_k, s.type_needle_v, s.num_needle_k, s.num_needle_v)
      + (s.num_needle_q,)
      for s in map(niah, ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"))
  ] == [
      ("essay", "words", "numbers", 1, 1, 1),
      ("essay", "words", "numbers", 4, 1, 1),
      ("essay", "words", "numbers", 1, 4, 1),
      ("essay", "words", "numbers", 1, 1, 4),
  ]
  assert ruler.VTSettings() == ruler.VTSettings(type_haystack="noise", num_chains=1, num_hops=4)
  assert ruler.CWESettings() == ruler.CWESettings(freq_cw=30, freq_ucw=3, num_cw=10)
  assert ruler.FWESettings().alpha == 2.0
  budgets = {name: task.tokens_to_generate for name, task in ruler.TASKS.items()}
  assert budgets == {
      "niah_single": 128,
      "niah_multikey": 128,
      "niah_multivalue": 128,
      "niah_multiquery": 128,
      "vt": 30,
      "cwe": 120,
      "fwe": 50,
  }
  assert all(task.metric == "string_match_all" for task in ruler.TASKS.values())
  assert all(task.metric in scoring.METRICS for task in ruler.TASKS.values())


def test_needs_haystack():
  needs = lambda name, settings: ruler.TASKS[name].needs_haystack(settings)
  assert needs("niah_single", ruler.NiahSingleSettings())
  assert not needs("niah_single", ruler.NiahSingleSettings(type_haystack="noise"))
  assert not needs("niah_multikey", ruler.NiahMultikeySettings(type_haystack="needle"))
  assert not needs("vt", ruler.VTSettings())
  assert needs("vt", ruler.VTSettings(type_haystack="essay"))
  assert not needs("cwe", ruler.CWESettings())
  assert not needs("fwe", ruler.FWESettings())


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: ruler.NiahSingleSettings(type_haystack="hay"), "type_haystack"),
        (lambda: ruler.NiahMultikeySettings(type_needle_k="names"), "type_needle_k"),
        (lambda: ruler.NiahMultikeySettings(num_needle_k=0), "num_needle_k"),
        (lambda: ruler.NiahMultivalueSettings(num_needle_v=41), "num_needle_v"),  # > 40 depths.
        (lambda: ruler.NiahMultiquerySettings(num_needle_q=0), "num_needle_q"),
        (lambda: ruler.VTSettings(num_hops=0), "num_hops"),
        (lambda: ruler.VTSettings(num_chains=0), "num_chains"),
        (lambda: ruler.VTSettings(type_haystack="needle"), "type_haystack"),
        (lambda: ruler.CWESettings(freq_cw=3, freq_ucw=3), "freq_cw"),
        (lambda: ruler.CWESettings(num_cw=20), "num_cw"),
        (lambda: ruler.FWESettings(alpha=1.0), "alpha"),
        (lambda: ruler.FWESettings(vocab_size=3), "vocab_size"),
    ],
)
def test_bad_settings_name_the_field(make, field):
  # A wrong choice is caught first by the suite's type-check hook (a TypeError naming the
  # parameter); without the hook, by the settings' own check (next test).
  with pytest.raises((ValueError, TypeError), match=field):
    make()


def test_bad_choice_is_a_value_error_naming_the_field():
  settings = ruler.NiahSingleSettings()
  object.__setattr__(settings, "type_needle_v", "names")  # As if the hook had let it through.
  with pytest.raises(ValueError, match="NiahSingleSettings.type_needle_v must be one of"):
    settings.__post_init__()


def test_errors(shakespeare):
  char = tokenizers.CharTokenizer.from_text(shakespeare)
  run = lambda name, settings, **kw: ruler.generate(
      name, settings, **{"tokenizer": char, "num_examples": 1, "seed": 0} | kw
  )
  with pytest.raises(ValueError, match="length 256 is too small for niah_single"):
    run("niah_single", ruler.NiahSingleSettings(), length=256, haystack=shakespeare)
  with pytest.raises(ValueError, match="too small for cwe"):
    run("cwe", ruler.CWESettings(), length=1024)
  with pytest.raises(ValueError, match="too small for fwe"):
    run("fwe", ruler.FWESettings(), length=200)
  with pytest.raises(ValueError, match=r"has \d+ tokens of this tokenizer, about \d+ are needed"):
    run("niah_single", ruler.NiahSingleSettings(), length=8192, haystack=shakespeare[:3000])
  with pytest.raises(ValueError, match="haystack"):
    run("niah_multiquery", ruler.NiahMultiquerySettings(), length=2048)
  with pytest.raises(ValueError, match="unknown RULER task"):
    run("niah", ruler.NiahSingleSettings(), length=2048, haystack=shakespeare)
  with pytest.raises(TypeError, match="NiahMultikeySettings"):
    run("niah_multikey", ruler.NiahSingleSettings(), length=2048, haystack=shakespeare)
  with pytest.raises(ValueError, match="26 lowercase"):
    run("fwe", ruler.FWESettings(), length=2048, tokenizer=tokenizers.CharTokenizer("abc ."))


def test_string_match_by_hand():
  assert scoring.string_match_all(["A x"], [["a", "b"]]) == 50
  assert scoring.string_match_part(["A x"], [["a", "b"]]) == 100
  assert scoring.string_match_all(["b then A"], [["a", "b"]]) == 100
  assert scoring.string_match_all(["x", "b a"], [["a"], ["a", "b", "c"]]) == pytest.approx(100 / 3)
  assert scoring.string_match_part(["x", "b a"], [["a"], ["a", "b", "c"]]) == 50
  assert scoring.string_match_all([""], [["a"]]) == 0
  with pytest.raises(ValueError, match="2 predictions for 1"):
    scoring.string_match_all(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="no predictions"):
    scoring.string_match_part([], [])
