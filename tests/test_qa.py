"""RULER's QA tasks (qa_1, qa_2) on small hand-made dev files, and synthetic_qa: RULER's template,
the gold documents, the length budget, scoring, determinism, and errors."""

from __future__ import annotations

import json
import pathlib
import random
import re

import pytest

from mosaics_jax import tokenizers
from mosaics_jax.eval import prompts, qa, scoring

SHAKESPEARE = pathlib.Path("/work/shared/data/tinyshakespeare/input.txt")

# RULER's QA template (scripts/data/synthetic/constants.py), answer prefix included.
INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output"
    " any other words."
)
HEAD = f"{INSTRUCTION}\n\nThe following are given documents.\n\nDocument "
TAIL = "\n\n" + INSTRUCTION + "\n\nQuestion: {question} Answer:"

# (article, paragraph, [(question, answers)]); answers None: an unanswerable question.
SQUAD = [
    (
        "Lighthouses",
        "The lighthouse at Gull Point was built in 1850 by the harbour board. Its lamp burned whale"
        " oil until the keepers switched to kerosene, and its light could be seen twenty miles out"
        " to sea on a clear night.",
        [
            ("When was the lighthouse at Gull Point built?", ["1850"]),
            ("What did the lamp burn before kerosene?", ["whale oil", "whale oil"]),
            ("Who painted the lighthouse?", None),
        ],
    ),
    (
        "Lighthouses",
        "Keepers lived in a small cottage beside the tower. They wound the clockwork that turned"
        " the lens every four hours, and in winter they cleared ice from the gallery windows so"
        " that the beam would not be dimmed.",
        [("What did the keepers wind every four hours?", ["the clockwork", "clockwork"])],
    ),
    (
        "Lighthouses",
        "The tower was automated when an electric lamp and a timer replaced the keepers. The"
        " cottage became a small museum that shows the old lens, the logbooks and a model of the"
        " harbour.",
        [("What did the cottage become?", ["a small museum"])],
    ),
    (
        "Bread",
        "Sourdough bread rises because of a culture of wild yeast and lactic acid bacteria. Bakers"
        " keep the culture alive by feeding it flour and water, and some cultures have been kept"
        " for generations.",
        [("What do bakers feed the culture?", ["flour and water"])],
    ),
    (
        "Bread",
        "A baguette is a long thin loaf with a crisp crust. In the old quarter the bakery Caf\u00e9"
        " Lumi\u00e8re sells its first baguettes at dawn, and a queue forms outside long before"
        " the doors open.",
        [("Which bakery sells baguettes at dawn?", ["Caf\u00e9 Lumi\u00e8re"])],
    ),
    (
        "Bread",
        "Rye bread is dense and dark. It keeps for a week or more, which made it the bread of"
        " sailors and of farmers who baked only once a week in a shared village oven.",
        [("Who ate rye bread on long voyages?", ["sailors"])],
    ),
    (
        "Rivers",
        "The river Wend rises in the northern hills and flows south through three market towns"
        " before it reaches the sea at Saltmouth, where its estuary is a refuge for wading birds.",
        [("Where does the river Wend reach the sea?", ["Saltmouth", "at Saltmouth"])],
    ),
    (
        "Rivers",
        "Mills once lined the banks of the Wend. Their wheels ground grain and later drove looms,"
        " until steam engines made the power of the river unnecessary and the mills fell silent.",
        [("What did the mill wheels grind?", ["grain"])],
    ),
]

# (question, answer, [(title, sentences)]): HotpotQA's distractor setting, smaller.
HOTPOT = [
    (
        "Which river flows past the town where the poet Ada Finch was born?",
        "the Wend",
        [
            (
                "Ada Finch",
                [
                    "Ada Finch was a poet who wrote about the sea and the lives of the",
                    " fishing families of the coast.",
                    " She was born in Marlow.",
                ],
            ),
            (
                "Marlow",
                [
                    "Marlow is a market town in a wide valley, known for its wool fair",
                    " and its stone bridge.",
                    " The river Wend flows past it.",
                ],
            ),
            (
                "Saltmouth",
                [
                    "Saltmouth is a port at the mouth of the Wend.",
                    " A ferry crosses",
                    " the estuary twice a day, and the old fish market is now a gallery.",
                ],
            ),
        ],
    ),
    (
        "Are Gull Point and Saltmouth both ports?",
        "no",
        [
            (
                "Gull Point",
                [
                    "Gull Point is a rocky headland with a lighthouse and a coastguard",
                    " station.",
                    " No ships dock there, since the water is shallow.",
                ],
            ),
            (
                "Saltmouth",
                [
                    "Saltmouth is a port at the mouth of the Wend.",
                    " A ferry crosses",
                    " the estuary twice a day, and the old fish market is now a gallery.",
                ],
            ),
            (
                "Harbour board",
                [
                    "The harbour board is the body that runs the docks of Saltmouth.",
                    " It built the lighthouse at Gull Point and still keeps its lamp.",
                ],
            ),
        ],
    ),
    (
        "What instrument did the founder of the Wend Choir play?",
        "the viola",
        [
            (
                "Wend Choir",
                [
                    "The Wend Choir is an amateur choir that sings in the towns along",
                    " the river.",
                    " It was founded by Tom Reed.",
                ],
            ),
            (
                "Tom Reed",
                [
                    "Tom Reed was a schoolteacher and musician from Marlow.",
                    " He played",
                    " the viola in the town orchestra for forty years.",
                ],
            ),
            (
                "Viola",
                [
                    "The viola is a bowed string instrument, a little larger than a",
                    " violin, with a lower and darker sound.",
                ],
            ),
        ],
    ),
    (
        "In which hills does the river that flows through Marlow rise?",
        "the northern hills",
        [
            (
                "Wend",
                [
                    "The Wend is a river that rises in the northern hills and flows south",
                    " to the sea.",
                    " Its valley is farmed for sheep.",
                ],
            ),
            (
                "Marlow",
                [
                    "Marlow is a market town in a wide valley, known for its wool fair",
                    " and its stone bridge.",
                    " The river Wend flows past it.",
                ],
            ),
            (
                "Northern hills",
                [
                    "The northern hills are a range of low moorland hills, wet and",
                    " windy, where many small streams begin.",
                ],
            ),
        ],
    ),
]


def squad_json() -> dict:
  articles: dict[str, list] = {}
  for title, context, questions in SQUAD:
    qas = [
        {
            "question": q,
            "answers": [{"text": a, "answer_start": 0} for a in answers or []],
            "is_impossible": answers is None,
        }
        for q, answers in questions
    ]
    articles.setdefault(title, []).append({"context": context, "qas": qas})
  return {"version": "v2.0", "data": [{"title": t, "paragraphs": p} for t, p in articles.items()]}


def hotpot_json() -> list:
  return [
      {"question": q, "answer": a, "context": [[t, s] for t, s in context], "type": "bridge"}
      for q, a, context in HOTPOT
  ]


@pytest.fixture(scope="module", params=["char", "byte"])
def tokenizer(request) -> tokenizers.Tokenizer:
  if request.param == "char":
    return tokenizers.CharTokenizer.from_text(SHAKESPEARE.read_text())
  return tokenizers.ByteTokenizer()


@pytest.fixture
def squad(tmp_path) -> qa.QaSettings:
  path = tmp_path / "squad.json"
  path.write_text(json.dumps(squad_json()))
  return qa.QaSettings(path=str(path))


@pytest.fixture
def hotpot(tmp_path) -> qa.QaSettings:
  path = tmp_path / "hotpot.json"
  path.write_text(json.dumps(hotpot_json()))
  return qa.QaSettings(path=str(path))


def generate(name, settings, tokenizer, length, num_examples=3, seed=42):
  return qa.generate(
      name, settings, tokenizer=tokenizer, length=length, num_examples=num_examples, seed=seed
  )


def documents(prompt: str) -> list[tuple[str, str]]:
  """The (number, text) of each document of a prompt in RULER's template."""
  context = prompt[len(HEAD) - len("Document ") : prompt.rindex("\n\n" + INSTRUCTION)]
  return re.findall(r"Document ([a-z0-9 ]+):\n(.*?)(?=\n\nDocument |\Z)", context, re.S)


def numbers(tokenizer) -> list[str]:
  if isinstance(tokenizer, tokenizers.ByteTokenizer):
    return [str(i) for i in range(1, 10)]
  return "one two three four five six seven eight nine".split()


def check_prompts(examples, tokenizer, length, questions):
  task = qa.TASKS["qa_1"]
  fit = prompts.Alphabet(tokenizer).fit
  for example, question in zip(examples, questions):
    assert example.prompt.startswith(HEAD)
    assert example.prompt.endswith(TAIL.format(question=fit(question)))
    assert prompts.count_tokens(tokenizer, example.prompt) + task.tokens_to_generate <= length
    found = documents(example.prompt)
    assert [n for n, _ in found] == numbers(tokenizer)[: len(found)]
    assert all(r and r in example.prompt for r in example.answers)


def test_tasks():
  assert set(qa.TASKS) == {"qa_1", "qa_2", "synthetic_qa"}
  for name, task in qa.TASKS.items():
    assert task.name == name and task.tokens_to_generate == 32
    assert task.metric == "string_match_part" and task.metric in scoring.METRICS
  assert qa.TASKS["qa_1"].settings_class is qa.QaSettings
  assert qa.TASKS["synthetic_qa"].settings_class is qa.SyntheticQaSettings


def test_squad(squad, tokenizer):
  char = isinstance(tokenizer, tokenizers.CharTokenizer)
  fit = prompts.Alphabet(tokenizer).fit
  # Answerable questions in file order; tinyshakespeare has no digits: the year's question goes.
  asked = [(q, a, c) for _, c, qs in SQUAD for q, a in qs if a and not (char and a == ["1850"])]
  examples = generate("qa_1", squad, tokenizer, 700, num_examples=len(asked))
  check_prompts(examples, tokenizer, 700, [q for q, _, _ in asked])
  for example, (_, answers, context) in zip(examples, asked):
    assert fit(context) in example.prompt
    assert example.answers == tuple(dict.fromkeys(fit(a) for a in answers))
  bakery = ("Cafe Lumiere",) if char else ("Caf\u00e9 Lumi\u00e8re",)
  assert bakery in [e.answers for e in examples]
  short, long = (generate("qa_1", squad, tokenizer, n) for n in (700, 1400))
  assert all(len(documents(s.prompt)) < len(documents(g.prompt)) for s, g in zip(short, long))
  check_prompts(long, tokenizer, 1400, [q for q, _, _ in asked])


def test_squad_distractors_and_shuffle(squad):
  """The other paragraphs of the article come first, and the documents are shuffled as RULER
  does: `random.Random(seed).shuffle` of [gold, distractors...]."""
  tokenizer = tokenizers.ByteTokenizer()
  examples = generate("qa_1", squad, tokenizer, 1000, num_examples=2, seed=7)
  article = {c for t, c, _ in SQUAD if t == "Lighthouses"}
  for example in examples:
    texts = [text for _, text in documents(example.prompt)]
    assert len(texts) == 3 and set(texts) == article
    positions = list(range(len(texts)))
    random.Random(7).shuffle(positions)
    assert texts[positions.index(0)] == SQUAD[0][1]  # Both questions are on the first paragraph.


def test_hotpotqa(hotpot, tokenizer):
  fit = prompts.Alphabet(tokenizer).fit
  short, long = (generate("qa_2", hotpot, tokenizer, n) for n in (1000, 1400))
  check_prompts(short, tokenizer, 1000, [q for q, _, _ in HOTPOT])
  check_prompts(long, tokenizer, 1400, [q for q, _, _ in HOTPOT])
  for examples in (short, long):
    for example, (_, answer, context) in zip(examples, HOTPOT):
      assert example.answers == (fit(answer),)
      texts = [text for _, text in documents(example.prompt)]
      # RULER's gold documents: all of the question's paragraphs, title then sentences.
      assert all(fit(f"{t}\n{''.join(s)}") in texts for t, s in context)
      assert len(texts) == len(set(texts))
  assert all(len(documents(s.prompt)) < len(documents(g.prompt)) for s, g in zip(short, long))


@pytest.mark.parametrize("name", ["qa_1", "qa_2", "synthetic_qa"])
def test_scores(name, squad, hotpot, tokenizer):
  settings = {"qa_1": squad, "qa_2": hotpot, "synthetic_qa": qa.SyntheticQaSettings()}[name]
  examples = generate(name, settings, tokenizer, 1300)
  references = [e.answers for e in examples]
  assert scoring.string_match_part([e.answers[0] for e in examples], references) == 100
  assert scoring.string_match_part(["" for _ in examples], references) == 0


def synthetic_oracle(prompt: str) -> str:
  """The answer read from the facts stated in the prompt, each (attribute, entity) once."""
  facts = re.findall(r"The ([a-z ]+) of ([A-Za-z]+) is ([A-Za-z]+)\.", prompt)
  stated = {(attribute, entity): value for attribute, entity, value in facts}
  assert len(stated) == len(facts)
  question = re.search(r"Question: What is the ([a-z ]+) of ([A-Za-z]+)\? Answer:$", prompt)
  return stated[question.groups()]


def test_synthetic(tokenizer):
  settings = qa.SyntheticQaSettings()
  short, long = (
      generate("synthetic_qa", settings, tokenizer, n, num_examples=5) for n in (600, 2000)
  )
  for examples, length in ((short, 600), (long, 2000)):
    for example in examples:
      assert example.prompt.startswith(HEAD)
      assert prompts.count_tokens(tokenizer, example.prompt) + 32 <= length
      (answer,) = example.answers
      assert example.prompt.lower().count(answer.lower()) == 1
      assert synthetic_oracle(example.prompt) == answer
      for _, text in documents(example.prompt):
        assert len(re.findall(r"The [a-z ]+ of [A-Za-z]+ is [A-Za-z]+\.", text)) == 4
  assert all(len(documents(s.prompt)) < len(documents(g.prompt)) for s, g in zip(short, long))
  # The gold document is not always at one place.
  assert len({e.prompt.index(e.answers[0]) // 200 for e in long}) > 1


def test_synthetic_settings():
  settings = qa.SyntheticQaSettings(facts_per_document=2, name_syllables=2)
  (example,) = generate("synthetic_qa", settings, tokenizers.ByteTokenizer(), 800, 1)
  for _, text in documents(example.prompt):
    assert len(re.findall(r"The [a-z ]+ of ([A-Za-z]{4}) is ([A-Za-z]{4})\.", text)) == 2
  for bad in ({"facts_per_document": 0}, {"facts_per_document": 13}, {"name_syllables": 0}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      qa.SyntheticQaSettings(**bad)


@pytest.mark.parametrize("name", ["qa_1", "synthetic_qa"])
def test_deterministic(name, squad):
  settings = squad if name == "qa_1" else qa.SyntheticQaSettings()
  tokenizer = tokenizers.ByteTokenizer()
  first = generate(name, settings, tokenizer, 1000, num_examples=4)
  assert first == generate(name, settings, tokenizer, 1000, num_examples=4)
  assert first[:2] == generate(name, settings, tokenizer, 1000, num_examples=2)
  assert first[3] == generate(name, settings, tokenizer, 1000, num_examples=4)[3]
  assert first != generate(name, settings, tokenizer, 1000, num_examples=4, seed=0)


def write(tmp_path, content) -> qa.QaSettings:
  path = tmp_path / "dev.json"
  path.write_text(content if isinstance(content, str) else json.dumps(content))
  return qa.QaSettings(path=str(path))


def test_file_errors(tmp_path):
  byte = tokenizers.ByteTokenizer()
  settings = write(tmp_path, "{not json")
  for name in ("qa_1", "qa_2"):
    with pytest.raises(ValueError, match=r"dev\.json is not a .* file: it is not JSON"):
      generate(name, settings, byte, 1000)
  bad_squad = squad_json()
  del bad_squad["data"][1]["paragraphs"][0]["qas"]
  wrong = [
      ("qa_1", hotpot_json(), "the top level is list, expected dict"),
      ("qa_1", {"version": "v2.0"}, "the top level has no 'data'"),
      ("qa_1", bad_squad, "data[1].paragraphs[0] has no 'qas'"),
      ("qa_2", squad_json(), "the top level is dict, expected list"),
      (
          "qa_2",
          [{"question": "Who?", "answer": "me", "context": [["t", "s"]]}],
          "[0]['context'][0]",
      ),
      ("qa_2", [{"question": "Who?", "answer": 3, "context": []}], "[0]['answer'] is int"),
  ]
  for name, content, message in wrong:
    with pytest.raises(ValueError, match=r"dev\.json is not a (SQuAD v2|HotpotQA) file: .*"):
      generate(name, write(tmp_path, content), byte, 1000)
    with pytest.raises(ValueError, match=re.escape(message)):
      generate(name, write(tmp_path, content), byte, 1000)


def test_request_errors(squad, hotpot):
  byte = tokenizers.ByteTokenizer()
  for name in ("qa_1", "qa_2"):
    with pytest.raises(ValueError, match="not redistributable: set path"):
      generate(name, qa.QaSettings(), byte, 1000)
  with pytest.raises(ValueError, match="length 400 is too small for qa_1 example 0"):
    generate("qa_1", squad, byte, 400)
  with pytest.raises(ValueError, match="length 700 is too small for qa_2 example 0"):
    generate("qa_2", hotpot, byte, 700)
  with pytest.raises(ValueError, match="length 300 is too small for synthetic_qa example 0"):
    generate("synthetic_qa", qa.SyntheticQaSettings(), byte, 300)
  with pytest.raises(ValueError, match="has 9 questions .* fewer than the 10 examples"):
    generate("qa_1", squad, byte, 1000, num_examples=10)
  with pytest.raises(ValueError, match="all 8 documents of the file fit in length 5000"):
    generate("qa_1", squad, byte, 5000)
  with pytest.raises(ValueError, match="unknown QA task 'qa_3'"):
    generate("qa_3", squad, byte, 1000)
  with pytest.raises(TypeError, match="qa_1 takes QaSettings"):
    generate("qa_1", qa.SyntheticQaSettings(), byte, 1000)
