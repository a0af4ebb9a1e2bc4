"""lm-evaluation-harness on our models (`mosaics_jax.eval.lm_harness`): log-likelihoods as the
model's logits give them (trailing spaces, empty contexts), a local multiple-choice task through
`simple_evaluate` and through `mosaics-lm-eval`, generation cut at stop sequences, documents scored
whole, and model overrides (the v2 paper's Table 2 ablation) from model_args."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import tiny_runs

from mosaics_jax import config as config_lib, load, tokenizers
from mosaics_jax.cli import lm_eval as lm_eval_cli
from mosaics_jax.eval import harness as harness_lib
from mosaics_jax.model import families
from mosaics_jax.port import pretrained

pytest.importorskip("lm_eval")
import lm_eval  # noqa: E402
from lm_eval import tasks as lm_eval_tasks  # noqa: E402
from lm_eval.api import instance as instance_lib, registry  # noqa: E402

from mosaics_jax.eval import lm_harness  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
# Scored in chunks of 64 tokens through the decode cache, in batches of 4 rows. The contexts are
# shorter than a chunk: their caches hold 128 tokens, and most calls share compiled functions.
ARGS = "batch_size=4,chunk=64"
CONTEXT = "First Citizen:\nBefore we proceed any further, hear me"


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
  """A v2 model of the tinyshakespeare characters with long-term memory (delay 4), its
  parameters drawn around their init; exported with its tokenizer (no end-of-text id)."""
  chars = tokenizers.CharTokenizer.from_text(SHAKESPEARE.read_text())
  cfg = config_lib.MosaicV2Config(
      vocab_size=chars.vocab_size,
      num_layers=1,
      width=32,
      num_heads=4,
      ffn_width=48,
      short_term_window=8,
      long_term_delay=4,
  )
  _, params = tiny_runs.params_near_init(cfg)
  path = tmp_path_factory.mktemp("char") / "model"
  pretrained.save_exported(path, cfg, params, step=3, tokenizer=chars)
  return path


@pytest.fixture(scope="module")
def lm(char_model):
  return registry.get_model("mosaics").create_from_arg_string(f"path={char_model},{ARGS}")


@pytest.fixture(scope="module")
def reference(char_model):
  return load(char_model)


def _log_probs(model: pretrained.Pretrained, rows: list[list[int]]) -> list[np.ndarray]:
  """log p(next token | row[: i + 1]) of each row [n, v], from one full forward of the rows padded
  into one batch (each row's padding a document of its own) of 24 rows of whole 128 tokens: one
  compilation for most calls."""
  assert len(rows) <= 24
  tokens = np.zeros((24, -(-max(len(r) for r in rows) // 128) * 128), np.int32)
  segment_ids = np.ones_like(tokens)
  for i, row in enumerate(rows):
    tokens[i, : len(row)], segment_ids[i, : len(row)] = row, 0
  log_probs = np.asarray(jax.nn.log_softmax(model.logits(tokens, segment_ids)), np.float64)
  return [log_probs[i, : len(row)] for i, row in enumerate(rows)]


def _greedy(model: pretrained.Pretrained, prompts: list[str], n: int) -> list[str]:
  """The n greedy characters after each prompt, a token at a time through full forwards."""
  rows = [model.encode(p) for p in prompts]
  for _ in range(n):
    for row, log_probs in zip(rows, _log_probs(model, rows)):
      row.append(int(log_probs[-1].argmax()))
  return [model.decode(row[-n:]) for row in rows]


def _by_hand(
    model: pretrained.Pretrained, pairs: list[tuple[str, str]]
) -> list[tuple[float, bool]]:
  """(log p(continuation | context), greedy) of text pairs, split as lm-eval does: trailing spaces
  of the context go to the continuation, and an empty context is the newline (the prefix token of
  a run without an end-of-text id), unless the continuation starts with it."""
  rows, splits = [], []
  for context, continuation in pairs:
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    if not stripped:
      stripped = "\n"
      continuation = continuation.removeprefix("\n")
    context_ids, continuation_ids = model.encode(stripped), model.encode(continuation)
    rows.append(context_ids + continuation_ids)
    splits.append((len(context_ids), continuation_ids))
  out = []
  for log_probs, (start, continuation) in zip(_log_probs(model, rows), splits):
    predicted = log_probs[start - 1 : start - 1 + len(continuation)]
    value = predicted[np.arange(len(continuation)), continuation].sum()
    out.append((float(value), bool((predicted.argmax(-1) == continuation).all())))
  return out


def _requests(kind: str, arguments: list[tuple]) -> list[instance_lib.Instance]:
  return [instance_lib.Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def test_loglikelihood_is_the_log_probability_of_the_continuation(lm, reference):
  """Six continuations of one context (two batches from one copy of its cache), trailing spaces
  moved to the continuation, the greedy continuation flagged, and empty contexts."""
  [greedy] = _greedy(reference, [CONTEXT], 5)
  pairs = [
      (CONTEXT, " speak"),
      (CONTEXT + " ", "speak"),  # The same request once lm-eval moves the space.
      (CONTEXT + "  ", "All:"),
      (CONTEXT, greedy),
      (CONTEXT, "."),
      (CONTEXT, ", First Citizen"),
      ("", "Speak, speak."),  # Conditioned on the newline.
      ("", "\nAll:"),  # Starts with the newline: it becomes the context.
  ]
  assert lm.tok_encode(CONTEXT + " ") == reference.encode(CONTEXT + " ")
  assert lm._encode_pair(CONTEXT + "  ", "All:") == (
      reference.encode(CONTEXT),
      reference.encode("  All:"),
  )
  got = lm.loglikelihood(_requests("loglikelihood", pairs))
  want = _by_hand(reference, pairs)
  for (value, is_greedy), (want_value, want_greedy) in zip(got, want):
    assert value == pytest.approx(want_value, rel=1e-5)
    assert is_greedy == want_greedy
  assert got[0] == got[1] and got[3][1]
  assert lm.prefix_token_id == lm.eot_token_id == reference.encode("\n")[0]


def _mc_task(tmp_path: pathlib.Path, docs: list[dict]) -> pathlib.Path:
  """A local multiple-choice task, `mosaics_mc`, over `docs` (JSON lines); its directory."""
  (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  config = {
      "task": "mosaics_mc",
      "dataset_path": "json",
      "dataset_kwargs": {
          "data_files": {"test": str(tmp_path / "mc.jsonl")},
          "cache_dir": str(tmp_path / "hf-datasets"),
      },
      "test_split": "test",
      "output_type": "multiple_choice",
      "doc_to_text": "{{question}}",
      "doc_to_choice": "{{choices}}",
      "doc_to_target": "{{answer}}",
      "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
  }
  (tmp_path / "mosaics_mc.yaml").write_text(json.dumps(config))  # JSON is YAML.
  return tmp_path


DOCS = [
    {"question": "First Citizen:\nYou are all resolved rather to", "choices": ["die", "famish"]},
    {"question": "All:\nWe know't, we", "choices": ["know't", "do", "know it well"]},
    {"question": "MENENIUS:\nWhat work's, my countrymen, in", "choices": ["hand", "arms", "x"]},
    {"question": "First Citizen:\nWe are accounted poor", "choices": ["citizens", "men", "a"]},
    {"question": "Second Citizen:\nWould you proceed", "choices": ["especially", "now", "so"]},
    {"question": "MARCIUS:\nThank you. What's the", "choices": ["matter", "news", "noise"]},
]


@pytest.mark.slow
def test_simple_evaluate_scores_a_local_multiple_choice_task(lm, reference, tmp_path):
  """acc and acc_norm (log-likelihood per character of the choice, as lm-eval divides) of a
  JSON-lines task, against the choices' log-likelihoods by hand."""
  pairs = [(d["question"], " " + c) for d in DOCS for c in d["choices"]]
  values = iter(v for v, _ in _by_hand(reference, pairs))
  lls = [np.array([next(values) for _ in d["choices"]]) for d in DOCS]
  lengths = [np.array([len(c) for c in d["choices"]]) for d in DOCS]
  # Answers the two metrics judge apart: the likeliest choice, then the likeliest per character.
  docs = [
      dict(d, answer=int(np.argmax(ll if i < 4 else ll / n)))
      for i, (d, ll, n) in enumerate(zip(DOCS, lls, lengths))
  ]
  acc = np.mean([np.argmax(ll) == d["answer"] for d, ll in zip(docs, lls)])
  acc_norm = np.mean([np.argmax(ll / n) == d["answer"] for d, ll, n in zip(docs, lls, lengths)])
  assert acc != acc_norm
  out = lm_eval.simple_evaluate(
      model=lm,
      tasks=["mosaics_mc"],
      task_manager=lm_eval_tasks.TaskManager(
          include_path=str(_mc_task(tmp_path, docs)), include_defaults=False
      ),
      bootstrap_iters=0,
  )
  found = out["results"]["mosaics_mc"]
  assert found["acc,none"] == pytest.approx(acc)
  assert found["acc_norm,none"] == pytest.approx(acc_norm)
  assert out["config"]["model_step"] == 3


def test_mosaics_lm_eval_knows_the_model_by_name(char_model, tmp_path, capsys, monkeypatch):
  """lm-eval's command line with `--model mosaics`; its --batch_size 1 and --device cuda:0
  (defaults it always passes) give way to the model_args and JAX. A model override that would
  change the parameters exits with 2."""
  # lm-eval's command line also reads its thousands of built-in task files (seconds): not here.
  monkeypatch.setattr(
      lm_eval_tasks,
      "TaskManager",
      functools.partial(lm_eval_tasks.TaskManager, include_defaults=False),
  )
  task_dir = _mc_task(tmp_path, [dict(d, answer=0) for d in DOCS[:2]])
  argv = ["--model", "mosaics", "--model_args", f"path={char_model},{ARGS}", "--tasks"]
  assert lm_eval_cli.main([*argv, "mosaics_mc", "--include_path", str(task_dir)]) == 0
  printed = capsys.readouterr().out
  assert "mosaics_mc" in printed and "acc_norm" in printed
  argv[3] += ",width=64"
  assert lm_eval_cli.main([*argv, "mosaics_mc", "--include_path", str(task_dir)]) == 2
  assert "change the parameters: width" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_until_stops_at_stop_sequences_and_max_gen_toks(lm, reference, monkeypatch):
  """Greedy text cut before a stop sequence of two characters (looked for between dispatches: the
  batch ends at the first) or of one (a stop token), and max_gen_toks tokens without one."""
  monkeypatch.setattr(lm_harness, "CHECK_EVERY", 8)
  prompts = [CONTEXT, "MENENIUS:\n"]
  texts = _greedy(reference, prompts, 10)  # The cuts and max_gen_toks come before 10 tokens.
  # Stop sequences that cut the texts after a few characters: two characters of the first text,
  # and a character of the second new in it from its fourth on.
  new = next(c for i, c in enumerate(texts[1]) if i >= 3 and c not in texts[1][:i])
  stops = [texts[0][3:5], new]
  dispatches = []
  stream = lm.harness.generator.stream

  def counted(*args, **kwargs):
    for part in stream(*args, **kwargs):
      dispatches.append(part.shape[1])
      yield part

  monkeypatch.setattr(lm.harness.generator, "stream", counted)
  requests = [
      (prompts[0], {"until": stops, "max_gen_toks": 40}),
      (prompts[1], {"until": stops, "max_gen_toks": 40}),
      (prompts[0], {"until": [], "max_gen_toks": 8}),
  ]
  got = lm.generate_until(_requests("generate_until", requests))
  cut = [t.split(stops[0])[0].split(stops[1])[0] for t in texts]
  assert got == [*cut, texts[0][:8]]
  assert all(3 <= len(text) < 8 for text in got[:2])
  # Each row has a stop sequence in its first 8 tokens: one dispatch after the prefill, not five.
  assert dispatches == [0, 8, 0, 8]


@pytest.mark.slow
def test_loglikelihood_rolling_scores_a_long_document_as_one_row(lm, reference):
  """A document of 300 characters (five chunks) and one of one character: the negated sum of the
  per-token losses of the newline and the document, and the log-probabilities of one full
  forward."""
  documents = [SHAKESPEARE.read_text()[1000:1300], "A"]
  got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d,) for d in documents]))
  rows = [reference.encode("\n" + d) for d in documents]
  losses = lm.harness.token_losses([np.asarray(row) for row in rows])
  want = [-float(row_losses.sum(dtype=np.float64)) for row_losses in losses]
  assert got == pytest.approx(want, rel=1e-6)
  for value, row, log_probs in zip(got, rows, _log_probs(reference, rows)):
    assert value == pytest.approx(log_probs[np.arange(len(row) - 1), row[1:]].sum(), rel=1e-5)


@pytest.mark.slow
def test_max_length_cuts_contexts_and_rolls_windows(char_model, lm, reference):
  """With max_length=16: a context keeps its last tokens, and a document goes in lm-eval's rolling
  windows of 16 tokens, each token predicted once from at most 16 before it."""
  short = registry.get_model("mosaics").create_from_arg_string(
      f"path={char_model},{ARGS},max_length=16"
  )
  assert short.max_length == 16 and lm.max_length is None
  [(value, _)] = short.loglikelihood(_requests("loglikelihood", [(CONTEXT, " all")]))
  [(want, _)] = _by_hand(reference, [(CONTEXT[-13:], " all")])  # 13 + 4 - 1 = 16 tokens fed.
  assert value == pytest.approx(want, rel=1e-5)
  document = SHAKESPEARE.read_text()[:40]
  [got] = short.loglikelihood_rolling(_requests("loglikelihood_rolling", [(document,)]))
  ids = reference.encode(document)
  # lm-eval's windows: each feeds 16 tokens and predicts ids[start:end], the last of its row.
  rows = [reference.encode("\n") + ids[:16], ids[15:32], ids[23:40]]
  predicted = [(0, 16), (16, 32), (32, 40)]
  want = 0.0
  for log_probs, row, (start, end) in zip(_log_probs(reference, rows), rows, predicted):
    n = end - start
    want += log_probs[len(row) - n - 1 + np.arange(n), ids[start:end]].sum()
  assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_dropping_long_term_memory_changes_the_log_likelihoods(char_model, lm, reference):
  """drop_long_term_memory=true in model_args: the v2 model without its long-term memory's
  output, by hand from a model built with it."""
  dropped = registry.get_model("mosaics").create_from_arg_string(
      f"path={char_model},{ARGS},drop_long_term_memory=true",
      {"batch_size": 1, "device": "cuda:0"},  # What lm-eval's command line passes by default.
  )
  assert dropped.batch_size == 4 and dropped.harness.model.config.drop_long_term_memory
  assert dropped.get_model_info()["model_overrides"] == ("model.drop_long_term_memory=true",)
  pairs = [(CONTEXT, " speak"), (CONTEXT[:30], " we")]
  requests = _requests("loglikelihood", pairs)
  got = [value for value, _ in dropped.loglikelihood(requests)]
  kept = [value for value, _ in lm.loglikelihood(requests)]
  config = dataclasses.replace(reference.config, drop_long_term_memory=True)
  without = dataclasses.replace(reference, config=config, model=families.build_model(config))
  assert got == pytest.approx([v for v, _ in _by_hand(without, pairs)], rel=1e-5)
  assert all(abs(a - b) > 1e-3 for a, b in zip(got, kept))


def test_the_prefix_token_is_the_runs_end_of_text_id(char_model, tmp_path):
  """The eot_id of the run's data config (a workdir keeps it in config.json), or of model_args;
  its text is a stop sequence of generation."""
  run = tmp_path / "run"
  shutil.copytree(char_model, run)
  saved = json.loads((run / "config.json").read_text())
  (run / "config.json").write_text(json.dumps(dict(saved, data={"eot_id": 7})))
  assert lm_harness.MosaicsLM(run).prefix_token_id == 7
  given = lm_harness.MosaicsLM(char_model, eot_id=9)
  assert given.prefix_token_id == given.eot_token_id == 9
  setting = given._generation({"until": ["\n\n"]})
  assert setting.until == ("\n\n", given.tok_decode([9])) and setting.max_gen_toks == 256


@pytest.mark.parametrize(
    "args, error",
    [
        ("batch_size=auto", "lm-eval's auto batch size is not supported"),
        ("width=64", "change the parameters: width"),
        ("max_gen_toks=0", "max_gen_toks must be >= 1"),
        ("eot_id=1000", "eot_id 1000 is outside the model's vocabulary"),
    ],
)
def test_bad_model_args_are_named(char_model, args, error):
  with pytest.raises(harness_lib.EvalError, match=error):
    lm_harness.MosaicsLM.create_from_arg_string(f"path={char_model},{args}")
