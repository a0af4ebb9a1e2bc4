"""What a user types that the commands used to crash on (issue 29, case 7): lm-eval contexts of only
whitespace, generation lengths past memory, negative seeds and lm-eval model_args of the wrong
type. Each is a correct answer or one line `prog: error: ...` and exit code 2."""

from __future__ import annotations

import functools
import json
import logging
import re

import jax
import numpy as np
import pytest
import tiny_runs

from mosaics_jax import config as config_lib, load, sharding, tokenizers
from mosaics_jax.cli import (
    eval as eval_cli,
    generate as generate_cli,
    repro as repro_cli,
    train as train_cli,
)
from mosaics_jax.inference import generate as generate_lib
from mosaics_jax.port import pretrained

# The characters of the model's vocabulary: the tab and space of the contexts among them.
TEXT = "First Citizen:\n\tBefore we proceed any further, hear me speak.\n"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  """A v2 model of TEXT's characters with long-term memory, exported with its tokenizer (no
  end-of-text id: the newline is its prefix token); parameters drawn around their init."""
  chars = tokenizers.CharTokenizer.from_text(TEXT)
  cfg = config_lib.MosaicV2Config(
      vocab_size=chars.vocab_size,
      num_layers=1,
      width=16,
      num_heads=2,
      ffn_width=32,
      short_term_window=4,
      long_term_delay=2,
  )
  _, params = tiny_runs.params_near_init(cfg)
  path = tmp_path_factory.mktemp("cli-inputs") / "model"
  pretrained.save_exported(path, cfg, params, step=1, tokenizer=chars)
  return path


@pytest.fixture(scope="module")
def lm_harness():
  pytest.importorskip("lm_eval")
  from mosaics_jax.eval import lm_harness  # pylint: disable=import-outside-toplevel

  return lm_harness


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  """A local multiple-choice task of one question, `mosaics_mc` (lm-eval looks for the tasks
  before it makes the model)."""
  directory = tmp_path_factory.mktemp("task")
  (directory / "mc.jsonl").write_text(json.dumps({"q": "First", "a": [" we", " me"]}) + "\n")
  config = {
      "task": "mosaics_mc",
      "dataset_path": "json",
      "dataset_kwargs": {
          "data_files": {"test": str(directory / "mc.jsonl")},
          "cache_dir": str(directory / "hf-datasets"),
      },
      "test_split": "test",
      "output_type": "multiple_choice",
      "doc_to_text": "{{q}}",
      "doc_to_choice": "{{a}}",
      "doc_to_target": "0",
      "metric_list": [{"metric": "acc"}],
  }
  (directory / "mosaics_mc.yaml").write_text(json.dumps(config))  # JSON is YAML.
  return directory


def _one_line_error(err: str, prog: str, after_log: bool = False) -> str:
  """The error line of a command's stderr, checked to be its only line (`after_log`: its last, after
  lm-eval's log lines, and no traceback)."""
  lines = err.strip().splitlines()
  assert len(lines) == 1 or after_log and "Traceback" not in err, err
  assert lines[-1].startswith(f"{prog}: error: "), err
  return lines[-1]


def _log_likelihoods_after_prefix(model: pretrained.Pretrained, texts: list[str]) -> list[float]:
  """log p(text | the newline) of each text by one full forward of the texts' characters (right-
  padded into one batch: a causal model's row does not see its padding), a text's own first
  newline being the prefix where it starts with one (as lm-eval conditions an empty context)."""
  newline = model.encode("\n")
  rows = [ids if ids[:1] == newline else newline + ids for ids in map(model.encode, texts)]
  tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
  for i, row in enumerate(rows):
    tokens[i, : len(row)] = row
  log_probs = np.asarray(jax.nn.log_softmax(model.logits(tokens)), np.float64)
  return [
      float(sum(log_probs[r, i - 1, row[i]] for i in range(1, len(row))))
      for r, row in enumerate(rows)
  ]


def test_a_context_of_only_whitespace_is_conditioned_on_the_prefix(export, lm_harness):
  """lm-eval moves a context's trailing whitespace to the continuation: a context of only
  whitespace has no tokens left, and is scored as the empty context is, from the prefix token."""
  from lm_eval.api import instance as instance_lib  # pylint: disable=import-outside-toplevel

  lm = lm_harness.MosaicsLM.create_from_arg_string(f"path={export},batch_size=2,chunk=16")
  pairs = [
      (context, continuation)
      for context in ("", " ", "\n\t ", "\t")
      for continuation in ("First", " we", "\n")
  ]
  requests = [instance_lib.Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
  got = [value for value, _ in lm.loglikelihood(requests)]
  reference = load(export)
  want = _log_likelihoods_after_prefix(reference, [c + x for c, x in pairs])
  assert np.isfinite(got).all()
  assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("args", [["--max-new-tokens", "1000000000"], ["--max-len", "1000000000"]])
def test_mosaics_generate_refuses_samples_past_memory_before_allocating(
    export, capsys, monkeypatch, args
):
  """A billion tokens of cache, on a machine of 8 GiB: named, with the sizes, before anything of
  the generation is made."""
  monkeypatch.setattr(sharding, "memory_available", lambda: 8 * 2**30)

  def allocate(*args, **kwargs):
    raise AssertionError("the generation started")

  monkeypatch.setattr(generate_lib.Generator, "stream", allocate)
  assert generate_cli.main([str(export), "--prompt", "First", *args]) == 2
  error = _one_line_error(capsys.readouterr().err, "mosaics-generate")
  assert "tokens need about" in error and "more than the 8.0 GiB here" in error


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_mosaics_train_refuses_a_seed_outside_32_bits_before_writing(tmp_path, capsys, seed):
  """train.seed is a ConfigError naming the field, before the workdir gets any file (JAX would
  take -1 as 2**32 - 1 and 2**32 as 0)."""
  workdir = tmp_path / "run"
  argv = tiny_runs.cli(workdir, *tiny_runs.cli_sets(f"train.seed={seed}"))[3:]
  assert train_cli.main(argv) == 2
  error = _one_line_error(capsys.readouterr().err, "mosaics-train")
  assert f"train.seed must be in [0, 2**32), got {seed}" in error
  assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.parametrize("seed", ["-1", "5"])
def test_mosaics_repro_refuses_a_train_seed(capsys, seed):
  # Its runs' seeds are 0 .. --seeds - 1: another one would be replaced without a word.
  assert repro_cli.main(["regbench-short", "--dry-run", "--set", f"train.seed={seed}"]) == 2
  error = _one_line_error(capsys.readouterr().err, "mosaics-repro")
  assert "--set train.seed: a reproduction sets each run's seed itself" in error


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
@pytest.mark.parametrize(
    "main, argv",
    [
        (generate_cli.main, ["W", "--prompt", "First", "--seed"]),
        (eval_cli.main, ["W", "--task", "perplexity", "--seed"]),
    ],
    ids=["generate", "eval"],
)
def test_the_seed_flags_refuse_a_seed_outside_32_bits(capsys, main, argv, seed):
  with pytest.raises(SystemExit) as exit_info:
    main([*argv, seed])
  assert exit_info.value.code == 2
  last = capsys.readouterr().err.splitlines()[-1]
  assert f"--seed: a seed is an integer in [0, 2**32), got {seed}" in last


@pytest.mark.parametrize(
    "model_args, lm_eval_args, error",
    [
        ("eot_id=abc", [], "model_args eot_id must be an integer, got 'abc'"),
        ("max_length=1.5", [], "model_args max_length must be an integer, got 1.5"),
        ("chunk=0", [], "chunk must be >= 1, got 0"),
        ("chunk=abc", [], "model_args chunk must be an integer, got 'abc'"),
        ("batch_size=1.5", [], "model_args batch_size must be an integer, got 1.5"),
        ("max_gen_toks=true", [], "model_args max_gen_toks must be an integer, got True"),
        ("seed=-1", [], r"seed must be in \[0, 2\*\*32\), got -1"),
        ("seed=0.5", [], "model_args seed must be an integer, got 0.5"),
        ("", ["--seed", "-1"], r"--seed must be in \[0, 2\*\*32\), got -1"),
    ],
)
def test_mosaics_lm_eval_names_a_bad_model_arg_or_seed(
    export, lm_harness, task_dir, capsys, monkeypatch, model_args, lm_eval_args, error
):
  from lm_eval import tasks as lm_eval_tasks  # pylint: disable=import-outside-toplevel

  from mosaics_jax.cli import lm_eval as lm_eval_cli  # pylint: disable=import-outside-toplevel

  # lm-eval's command line also reads its thousands of built-in task files (seconds): not here.
  monkeypatch.setattr(
      lm_eval_tasks,
      "TaskManager",
      functools.partial(lm_eval_tasks.TaskManager, include_defaults=False),
  )
  # lm-eval's log handler writes to the stderr of the first test that ran it: a later test's
  # capture closes that stream, and logging would print its own traceback for each record.
  monkeypatch.setattr(logging, "raiseExceptions", False)
  argv = ["--model", "mosaics", "--model_args", f"path={export},{model_args}".rstrip(",")]
  argv += ["--tasks", "mosaics_mc", "--include_path", str(task_dir), *lm_eval_args]
  assert lm_eval_cli.main(argv) == 2
  err = capsys.readouterr().err
  assert re.search(error, _one_line_error(err, "mosaics-lm-eval", after_log=True))
