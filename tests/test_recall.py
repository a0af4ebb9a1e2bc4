"""The recall tasks: `synthetic` and `copy` are the greedy accuracy and the loss of `logits` on the
answers (or the copy), at every length; what they need and lack is named."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

from mosaics_jax import config as config_lib, load, synthetic, tokenizers
from mosaics_jax.eval import harness as harness_lib, tasks
from mosaics_jax.model import families
from mosaics_jax.port import pretrained

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
TINY = dict(num_layers=2, width=32, num_heads=4, ffn_width=48, short_term_window=8)


def _export(path: pathlib.Path, cfg, tokenizer=None) -> pathlib.Path:
  tokens = np.zeros((1, 8), np.int32)
  params = families.build_model(cfg).init(jax.random.key(0), tokens)["params"]
  pretrained.save_exported(path, cfg, params, tokenizer=tokenizer)
  return path


def _log_probs(lm, rows: np.ndarray) -> np.ndarray:
  return np.asarray(jax.nn.log_softmax(lm.logits(rows[:, :-1]), axis=-1))


def _run(path, task, assignments):
  h = harness_lib.Harness.load(str(path), batch_size=3, chunk=32, progress=False)
  found = tasks.get(task).run(h, tasks.settings([task], assignments)[task])
  return {(r.metric, r.row["length"]): r.value for r in found}


@pytest.mark.slow
def test_synthetic_scores_the_answers_of_fresh_sequences(tmp_path):
  path = _export(tmp_path / "m", config_lib.MosaicV2Config(vocab_size=16, **TINY))
  found = _run(
      path,
      "synthetic",
      [
          "synthetic.source=synthetic_induction",
          "synthetic.task_vocab=12",
          "synthetic.task_pairs=2",
          "synthetic.lengths=[24,40]",
          "synthetic.num_examples=5",
      ],
  )
  lm = load(path)
  for length in (24, 40):
    drawn = [
        synthetic.induction(np.random.default_rng([0, length, i]), seq_len=length, task_vocab=12)
        for i in range(5)
    ]
    rows = np.stack([s for s, _ in drawn]).astype(np.int32)
    answers = np.stack([a for _, a in drawn])
    log_probs = _log_probs(lm, rows)
    targets = rows[:, 1:]
    right = log_probs.argmax(-1) == targets
    losses = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    assert answers.any()
    assert found["accuracy", length] == pytest.approx(right[answers].mean())
    assert found["loss", length] == pytest.approx(losses[answers].mean(), rel=1e-5)


@pytest.mark.slow
def test_copy_scores_the_passage_and_its_copy(tmp_path):
  chars = tokenizers.CharTokenizer.from_text(SHAKESPEARE.read_text())
  cfg = config_lib.MosaicV2Config(vocab_size=chars.vocab_size, **TINY, long_term_delay=4)
  path = _export(tmp_path / "m", cfg, chars)
  text = SHAKESPEARE.read_text()[:3000]
  (tmp_path / "t.txt").write_text(text)
  found = _run(
      path,
      "copy",
      [f"copy.path={tmp_path / 't.txt'}", "copy.lengths=[40]", "copy.num_examples=4"],
  )
  lm = load(path)
  ids = np.asarray(chars.encode(text), np.int32)[2700:]  # start_fraction: 0.9.
  rows = np.stack([np.tile(ids[i * 20 : (i + 1) * 20], 2) for i in range(4)])
  log_probs = _log_probs(lm, rows)
  targets = rows[:, 1:]
  losses = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  # Targets 0..18 are the passage's tokens 1..19; targets 20..38 the copy's 1..19.
  assert found["loss_first", 40] == pytest.approx(losses[:, :19].mean(), rel=1e-5)
  assert found["loss_copy", 40] == pytest.approx(losses[:, 20:].mean(), rel=1e-5)
  right = log_probs.argmax(-1) == targets
  assert found["accuracy_copy", 40] == pytest.approx(right[:, 20:].mean())
  gain = losses[:, :19].mean() - losses[:, 20:].mean()
  assert found["retrieval_gain", 40] == pytest.approx(gain, rel=1e-4, abs=1e-6)


def test_what_a_recall_task_lacks_is_named(tmp_path):
  path = _export(tmp_path / "m", config_lib.MosaicV2Config(vocab_size=16, **TINY))
  h = harness_lib.Harness.load(str(path), batch_size=2, progress=False)
  settings = tasks.settings(["synthetic"], ["synthetic.lengths=[16]"])["synthetic"]
  with pytest.raises(harness_lib.EvalError, match="does not record its training data's"):
    tasks.get("synthetic").run(h, settings)
  settings = tasks.settings(
      ["synthetic"],
      [
          "synthetic.lengths=[16]",
          "synthetic.source=synthetic_mqar",
          "synthetic.task_vocab=16",
          "synthetic.task_pairs=2",
      ],
  )["synthetic"]
  with pytest.raises(harness_lib.EvalError, match="needs 17 token ids, the model has 16"):
    tasks.get("synthetic").run(h, settings)
  settings = tasks.settings(
      ["synthetic"],
      [
          "synthetic.lengths=[32,8]",
          "synthetic.source=synthetic_needles",
          "synthetic.task_vocab=16",
          "synthetic.task_pairs=4",
      ],
  )["synthetic"]
  with pytest.raises(harness_lib.EvalError, match="at length 8: needles need .* seq_len 8"):
    tasks.get("synthetic").run(h, settings)
  settings = tasks.settings(["copy"], [f"copy.path={tmp_path / 'none.txt'}", "copy.lengths=[8]"])[
      "copy"
  ]
  with pytest.raises(harness_lib.EvalError, match="none.txt does not exist"):
    tasks.get("copy").run(h, settings)
  with pytest.raises(config_lib.ConfigError, match="lengths >= 4"):
    tasks.settings(["copy"], ["copy.lengths=[2]"])
