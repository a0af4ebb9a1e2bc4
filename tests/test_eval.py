"""Evaluation: chunked scoring equals the full forward, perplexity is the mean of the per-token
losses of `logits`, tasks run end to end through `mosaics-eval` (tables, JSON lines, determinism,
plots), the same results on 1 and 8 devices, and bad input named."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_runs

from mosaics_jax import config as config_lib, load, regbench, sharding, tokenizers
from mosaics_jax.cli import eval as eval_cli, plot as plot_cli
from mosaics_jax.eval import harness as harness_lib, results as results_lib, tasks
from mosaics_jax.inference import generate as generate_lib, score as score_lib
from mosaics_jax.model import families
from mosaics_jax.port import pretrained

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TINY = dict(num_layers=2, width=32, num_heads=4)
CONFIGS = {
    "mm1": config_lib.MosaicV1Config(vocab_size=50, **TINY, block_size=16, pmem_size=16),
    "mm2": config_lib.MosaicV2Config(
        vocab_size=50, **TINY, ffn_width=48, short_term_window=6, long_term_delay=3
    ),
    "llama": config_lib.LlamaConfig(vocab_size=50, **TINY, ffn_width=48),
}


def _full_losses(cfg, params, rows):
  """-log p(row[i + 1] | row[: i + 1]) of each row from one full forward of the rows padded into
  one batch (the padding a document of its own; v1 widened to the longest row)."""
  width = max(len(r) for r in rows)
  tokens = np.zeros((len(rows), width), np.int32)
  segment_ids = np.ones_like(tokens)
  for i, row in enumerate(rows):
    tokens[i, : len(row)], segment_ids[i, : len(row)] = row, 0
  if cfg.family == "mm1":
    cfg = dataclasses.replace(cfg, block_size=width)
  logits = jax.jit(families.build_model(cfg).apply)({"params": params}, tokens, segment_ids)
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  return [-log_probs[i, np.arange(len(r) - 1), r[1:]] for i, r in enumerate(rows)]


# The default suite scores v1 (past its block_size) in chunks of 5; the slow suite every family.
@pytest.mark.parametrize(
    "name", [n if n == "mm1" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CONFIGS)]
)
@pytest.mark.parametrize("chunk", [5, pytest.param(16, marks=pytest.mark.slow)])
def test_chunked_scores_equal_the_full_forward(name, chunk):
  """Rows of 23, 4 and 16 tokens in batches of 2 (the last padded), in chunks through the cache:
  v1 goes past its block_size of 16."""
  cfg = CONFIGS[name]
  model, params = tiny_runs.params_near_init(cfg)
  rng = np.random.default_rng(0)
  rows = [rng.integers(0, 50, n).astype(np.int32) for n in (23, 4, 16)]
  # token_losses, the same path with another output, is checked by the perplexity test.
  log_probs = score_lib.Scorer(model, chunk=chunk, batch_size=2).next_log_probs(params, rows)
  for row, full, want in zip(rows, log_probs, _full_losses(cfg, params, rows)):
    assert full.shape == (len(row), 50)
    np.testing.assert_allclose(-full[np.arange(len(row) - 1), row[1:]], want, atol=2e-5)


@pytest.mark.slow
def test_a_scorer_compiles_per_bucket_not_per_length():
  model, params = tiny_runs.params_near_init(CONFIGS["mm2"])
  scorer = score_lib.Scorer(model, chunk=8, batch_size=2)
  for n in (9, 11, 14, 16):  # All in one bucket: two chunks, a cache of 16.
    scorer.token_losses(params, [np.arange(n) % 50])
  assert scorer._first._cache_size() == 1 and scorer._next._cache_size() == 1
  assert scorer.capacity(9) == scorer.capacity(16) == 16 and scorer.capacity(17) == 32


# Also checked against hand-computed log-likelihoods through lm-eval (tests/test_lm_harness.py).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mm1", "mm2"])
def test_continuations_of_one_cached_context_score_as_whole_rows(name):
  """Five continuations of a 21-token context, in batches of 2 from one copy of the context's
  cache (v1 past its block_size): the sums of the losses of the whole rows; the greedy
  continuation, and only it, is flagged greedy."""
  model, params = tiny_runs.params_near_init(CONFIGS[name])
  rng = np.random.default_rng(0)
  context = rng.integers(0, 50, 21)
  greedy = generate_lib.Generator(model, prefill_chunk=8)(params, [context.tolist()], 4)[0]
  continuations = [greedy, *(rng.integers(0, 50, n) for n in (1, 3, 9, 2))]
  scorer = score_lib.Scorer(model, chunk=8, batch_size=2)
  got = scorer.continuation_scores(params, context, continuations)
  rows = [np.concatenate([context, c]) for c in continuations]
  for (value, is_greedy), losses, c in zip(got, scorer.token_losses(params, rows), continuations):
    assert value == pytest.approx(-losses[len(context) - 1 :].sum(), rel=1e-5)
    assert is_greedy == (c is greedy)


# In the default suite, the generation tasks' long prompts go through chunked prefills (mm2).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mm1", "mm2"])
def test_chunked_prefill_generates_as_one_prefill(name):
  """Prompts of 23 and 5 tokens in prefill chunks of 4 or 7 (v1 past its block_size), and one
  fixed width: the tokens of a prefill token by token."""
  model, params = tiny_runs.params_near_init(CONFIGS[name])
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 50, 23).tolist(), rng.integers(0, 50, 5).tolist()]
  want = generate_lib.Generator(model, prefill_chunk=1)(params, prompts, 6)
  for chunk in (4, 7):
    generator = generate_lib.Generator(model, prefill_chunk=chunk)
    assert generator(params, prompts, 6) == want
    assert generator(params, prompts, 6, width=30) == want


# A model of the tinyshakespeare characters, exported with its tokenizer.
@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
  chars = tokenizers.CharTokenizer.from_text(SHAKESPEARE.read_text())
  cfg = config_lib.MosaicV2Config(
      vocab_size=chars.vocab_size, **TINY, ffn_width=48, short_term_window=8, long_term_delay=4
  )
  _, params = tiny_runs.params_near_init(cfg)
  path = tmp_path_factory.mktemp("char") / "model"
  pretrained.save_exported(path, cfg, params, step=7, tokenizer=chars)
  return path


def test_perplexity_is_the_mean_of_the_per_token_losses(char_model, tmp_path):
  text = SHAKESPEARE.read_text()[:2000]
  (tmp_path / "part.txt").write_text(text)
  h = harness_lib.Harness.load(str(char_model), batch_size=2, chunk=64, progress=False)
  settings = tasks.settings(
      ["perplexity"],
      [
          f"perplexity.path={tmp_path / 'part.txt'}",
          "perplexity.length=300",
          "perplexity.num_buckets=3",
      ],
  )["perplexity"]
  found = {
      (r.metric, r.row.get("position_start")): r.value
      for r in tasks.get("perplexity").run(h, settings)
  }
  # By hand: six windows of 300 characters, the losses of `logits` of each.
  lm = load(char_model)
  ids = lm.tokenizer.encode(text)[:1800].reshape(6, 300)
  log_probs = jax.nn.log_softmax(lm.logits(ids), axis=-1)
  losses = -np.take_along_axis(np.asarray(log_probs)[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
  assert found["loss", None] == pytest.approx(losses.mean(), rel=1e-5)
  np.testing.assert_allclose(np.stack(lm.token_losses(list(ids))), losses, rtol=1e-5, atol=1e-6)
  assert found["perplexity", None] == pytest.approx(math.exp(losses.mean()), rel=1e-5)
  assert found["bits_per_char", None] == pytest.approx(losses.mean() / math.log(2), rel=1e-5)
  predicted = "".join(lm.tokenizer.decode(row[1:]) for row in ids)
  bits_per_byte = losses.sum() / math.log(2) / len(predicted.encode("utf-8"))
  assert found["bits_per_byte", None] == pytest.approx(bits_per_byte, rel=1e-5)
  # Buckets of positions 1-100, 101-199, 200-299 (of the predicted tokens).
  assert found["loss_at_position", 1] == pytest.approx(losses[:, :100].mean(), rel=1e-5)
  assert found["loss_at_position", 200] == pytest.approx(losses[:, 199:].mean(), rel=1e-5)


def _eval(path, *args):
  return eval_cli.main([str(path), "--no-progress", *args])


def test_mosaics_eval_prints_tables_and_appends_records(char_model, tmp_path, capsys):
  out = tmp_path / "results.jsonl"
  args = [
      "--task",
      "perplexity",
      "--task",
      "synthetic_qa",
      "--set",
      f"perplexity.path={SHAKESPEARE}",
      "perplexity.length=256",
      "synthetic_qa.lengths=[768]",
      "synthetic_qa.num_examples=3",
      "model.long_term_delay=5",
      "--limit",
      "2",
      "--batch-size",
      "2",
      "--out",
      str(out),
  ]
  assert _eval(char_model, *args) == 0
  printed = capsys.readouterr().out
  assert "### perplexity" in printed and "### synthetic_qa" in printed
  assert "| length | string_match_part | examples |" in printed
  assert "examples/s" in printed
  records = results_lib.read_jsonl(out)
  qa = [r for r in records if r["task"] == "synthetic_qa"]
  assert [r["settings"]["length"] for r in qa] == [768]
  assert all(r["num_examples"] == 2 and 0 <= r["value"] <= 100 for r in qa)  # --limit 2
  first = records[0]
  assert first["model"] == {
      "path": str(char_model),
      "step": 7,
      "overrides": ["model.long_term_delay=5"],
  }
  assert first["seed"] == 0 and first["date"] and first["settings"]["length"] == 256
  assert {r["metric"] for r in records if r["task"] == "perplexity"} >= {
      "loss",
      "perplexity",
      "bits_per_byte",
      "loss_at_position",
  }
  # The same seed, the same values; appended after the first run's.
  assert _eval(char_model, *args) == 0
  again = results_lib.read_jsonl(out)
  assert len(again) == 2 * len(records)
  assert [r["value"] for r in again[len(records) :]] == [r["value"] for r in records]
  assert plot_cli.main([str(out), "-o", str(tmp_path / "eval.png")]) == 0
  assert (tmp_path / "eval.png").stat().st_size > 0


def test_mosaics_eval_lists_every_task_with_its_settings(capsys):
  assert eval_cli.main(["--list"]) == 0
  listed = capsys.readouterr().out
  for name in tasks.TASKS:
    assert f"\n{name}: " in "\n" + listed
  assert "niah_single.lengths = (1024, 2048, 4096)" in listed
  assert "regbench.ngram = 3" in listed


@pytest.mark.parametrize(
    "args, error",
    [
        (
            ["--task", "niah_singel"],
            "unknown key 'niah_singel' in the tasks; did you mean niah_single",
        ),
        (
            ["--task", "vt", "--set", "vt.num_hopz=2"],
            "unknown key 'num_hopz'.*did you mean num_hops",
        ),
        (["--task", "vt", "--set", "vt.lengths=big"], "lengths must be"),
        (["--task", "vt", "--set", "cwe.num_cw=2"], "task 'cwe' is not evaluated here"),
        (["--task", "vt", "--set", "model.width=64"], "change the parameters: width"),
        (["--task", "niah_single"], "give a long English text with --haystack FILE"),
        (["--task", "perplexity"], "set perplexity.path=FILE"),
        (["--task", "regbench"], "regbench reads RegBench's token ids, but .* reads text"),
        (["--task", "qa_1", "--set", "qa_1.lengths=[256]"], "qa_1 .*path"),
    ],
)
def test_mosaics_eval_names_bad_input(char_model, capsys, args, error):
  assert _eval(char_model, *args) == 2
  assert re.search(error, capsys.readouterr().err)


def test_a_haystack_too_short_for_the_length_is_named(char_model, tmp_path, capsys):
  (tmp_path / "short.txt").write_text("A short essay. " * 5)
  args = ["--task", "niah_single", "--haystack", str(tmp_path / "short.txt")]
  assert _eval(char_model, *args, "--set", "niah_single.lengths=[2048]") == 2
  assert "niah_single at length 2048" in capsys.readouterr().err


def test_a_length_beyond_memory_is_refused_before_it_starts(char_model, capsys, monkeypatch):
  monkeypatch.setattr(sharding, "memory_available", lambda: 2**20)
  args = [
      "--task",
      "perplexity",
      "--set",
      f"perplexity.path={SHAKESPEARE}",
      "perplexity.length=4096",
  ]
  assert _eval(char_model, *args) == 2
  assert re.search(r"rows of 4096 tokens need about .* GiB", capsys.readouterr().err)


@pytest.fixture(scope="module")
def regbench_model(tmp_path_factory):
  cfg = config_lib.MosaicV2Config(
      vocab_size=regbench.VOCAB_SIZE + 1, **TINY, ffn_width=48, short_term_window=8
  )
  _, params = tiny_runs.params_near_init(cfg)
  path = tmp_path_factory.mktemp("regbench") / "model"
  pretrained.save_exported(path, cfg, params)
  return path


@pytest.mark.slow
def test_regbench_scores_the_model_and_the_ngram_baseline(regbench_model):
  h = harness_lib.Harness.load(str(regbench_model), batch_size=4, chunk=128, progress=False)
  settings = tasks.settings(["regbench"], ["regbench.num_examples=6", "regbench.max_string=8"])
  found = {r.metric: r.value for r in tasks.get("regbench").run(h, settings["regbench"])}
  assert set(found) == {"accuracy", "l1", "ngram3_accuracy", "ngram3_l1"}
  # By hand: the same sequences through `logits`, scored by regbench.scores.
  from mosaics_jax.eval import regbench as regbench_task  # pylint: disable=import-outside-toplevel

  rows, automata = regbench_task.sequences(settings["regbench"], 0, 6, 8)
  lm = load(regbench_model)
  longest = max(len(r) for r in rows)
  tokens = np.full((6, longest), regbench.PAD, np.int32)
  segment_ids = np.ones_like(tokens)  # The padding: a document of its own.
  for i, row in enumerate(rows):
    tokens[i, : len(row)], segment_ids[i, : len(row)] = row, 0
  probs = np.array(jax.nn.softmax(lm.logits(tokens, segment_ids), axis=-1))
  probs[segment_ids == 1] = 0  # Nothing is scored past a row's end.
  want = regbench.scores(probs, tokens, automata)
  assert found["accuracy"] == pytest.approx(want["accuracy"])
  assert found["l1"] == pytest.approx(want["l1"], rel=1e-5)
  assert 0 < found["ngram3_accuracy"] <= 1 and 0 <= found["ngram3_l1"] <= 2


@pytest.mark.slow
def test_the_same_results_on_one_and_eight_devices(char_model, regbench_model, tmp_path):
  """mosaics-eval in subprocesses on 1 and on 8 simulated CPU devices (batches split over them)."""
  values = []
  for devices in (1, 8):
    out = tmp_path / f"results-{devices}.jsonl"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    common = ["--no-progress", "--batch-size", "8", "--out", str(out)]
    for path, task, sets in (
        (char_model, "perplexity", [f"perplexity.path={SHAKESPEARE}", "perplexity.length=200"]),
        (char_model, "synthetic_qa", ["synthetic_qa.lengths=[768]", "synthetic_qa.num_examples=8"]),
        (regbench_model, "regbench", ["regbench.num_examples=8", "regbench.max_string=8"]),
    ):
      command = [sys.executable, "-m", "mosaics_jax.cli.eval", str(path), "--task", task]
      subprocess.run([*command, *common, "--limit", "8", "--set", *sets], check=True, env=env)
    values.append(
        {
            (r["task"], r["metric"], json.dumps(r["settings"])): r["value"]
            for r in results_lib.read_jsonl(out)
        }
    )
  assert values[0].keys() == values[1].keys()
  for key, one in values[0].items():
    assert values[1][key] == pytest.approx(one, rel=1e-4, abs=1e-5), key
