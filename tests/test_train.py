"""Training: exact resume after SIGKILL, checkpoint fallback, learning, and every bad input."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
import tiny_runs
from jax.experimental import multihost_utils

from mosaics_jax import checkpoints, config as config_lib, load, overrides, registry
from mosaics_jax.cli import train as train_cli
from mosaics_jax.train import loop, preemption

import sharded_runs

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tmp_path):
  steps = 24
  sets = tiny_runs.CLI_SETS + [f"train.steps={steps}"]
  straight = tmp_path / "straight"
  subprocess.run(tiny_runs.cli(straight, *sets), check=True, capture_output=True)

  killed = tmp_path / "killed"
  proc = subprocess.Popen(
      tiny_runs.cli(killed, *sets), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  deadline = time.time() + 300
  # Kill once a mid-run checkpoint exists: the process is then between steps, or saving.
  while time.time() < deadline and proc.poll() is None:
    saved = [p.name for p in (killed / "checkpoints").glob("[0-9]*")]
    if any(int(s) >= 9 for s in saved if s.isdigit()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  result = subprocess.run(tiny_runs.cli(killed, *sets), capture_output=True, text=True)
  assert result.returncode == 0, result.stderr

  exp = overrides.apply(registry.get("mm2-tiny"), sets)
  step_a, params_a = tiny_runs.final_params(straight, exp)
  step_b, params_b = tiny_runs.final_params(killed, exp)
  assert step_a == step_b == steps
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  # The resumed run's metrics hold each step once.
  records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in records if "split" not in r]
  assert train_steps == sorted(set(train_steps)) and train_steps[-1] == steps


@pytest.mark.slow
def test_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path):
  exp = tiny_runs.tiny(6, train__checkpoint_every=3)
  loop.train(exp, tmp_path, progress=False)
  latest = tmp_path / "checkpoints" / "6"
  for f in latest.rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "state" in str(f):
      f.write_bytes(b"\0garbage" * 8)
  longer = overrides.override(exp, "train.steps", 8)
  with pytest.warns(UserWarning, match="unreadable.*using an earlier one"):
    result = loop.train(longer, tmp_path, progress=False)
  assert result.step == 8
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if "split" not in r]
  assert steps == sorted(set(steps))


def test_a_short_run_learns_and_writes_metrics(tmp_path):
  exp = tiny_runs.tiny(40, train__learning_rate=1e-2, train__warmup_steps=4, train__eval_every=40)
  result = loop.train(exp, tmp_path, progress=False)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if "split" not in r]
  for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec"):
    assert key in train_records[0]
  assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.3
  val = [r for r in records if r.get("split") == "val"]
  assert val and "accuracy" in val[-1] and result.val["accuracy"] == val[-1]["accuracy"]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["train"]["steps"] == 40 and saved["model"]["family"] == "mm2"


@pytest.mark.parametrize(
    "grad_accum",
    [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 4],
)
def test_the_step_minimises_the_batch_mean_whatever_the_micro_batches(grad_accum):
  """Loss and gradient are the mean over every masked target of the global batch, computed
  directly, however the batch is split: micro-batches here count 0 to 128 targets."""
  exp = sharded_runs.accum_experiment(grad_accum)
  batch = sharded_runs.uneven_batch(exp)
  loss, grads, params = sharded_runs.step_gradient(exp, batch, on_mesh=False)
  ref_loss, ref_grads = sharded_runs.token_weighted_reference(exp, params, batch)
  assert loss == pytest.approx(ref_loss, rel=1e-6)
  leaves = zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True)
  for (path, x), y in leaves:
    np.testing.assert_allclose(x, y, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_an_all_masked_batch_has_zero_loss_and_gradient():
  exp = sharded_runs.accum_experiment(4)
  batch = sharded_runs.uneven_batch(exp)
  batch["loss_mask"][:] = 0
  loss, grads, _ = sharded_runs.step_gradient(exp, batch, on_mesh=False)
  assert loss == 0 and not any(np.any(x) for x in jax.tree.leaves(grads))


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  exp = tiny_runs.tiny(4, train__checkpoint_every=2)
  loop.train(exp, tmp_path, progress=False)
  diverging = overrides.override(
      overrides.override(exp, "train.steps", 10), "train.learning_rate", float("nan")
  )
  # A nan learning rate makes the first update of the second run (step 5) non-finite.
  with pytest.raises(
      loop.TrainingError, match="stopped at step 5: its update left parameters that are not.*step 4"
  ):
    loop.train(diverging, tmp_path, progress=False)
  assert checkpoints.Checkpoints(tmp_path / "checkpoints", 3).steps()[-1] == 4


@pytest.mark.parametrize("processes, stop, gathered", [(1, 6, []), (2, 8, [4, 8])])
def test_processes_agree_on_a_signal_only_every_agree_every_steps(
    monkeypatch, processes, stop, gathered
):
  """A signal in step 6: one process stops after it; several all-gather their flags at steps 4
  and 8 only (never in the steps between) and stop after step 8, which none was signalled in."""
  gathers = []

  def process_allgather(flag):
    gathers.append(step)
    return np.stack([flag, np.asarray(False)])  # The other process was not signalled.

  monkeypatch.setattr(jax, "process_count", lambda: processes)
  monkeypatch.setattr(multihost_utils, "process_allgather", process_allgather)
  with preemption.Preemption(agree_every=4) as stopper:
    for step in range(1, 13):
      if step == 6:
        signal.raise_signal(signal.SIGTERM)
      if stopper.should_stop(step):
        break
  assert (step, gathers, stopper.signal) == (stop, gathered, signal.SIGTERM)


def test_workdir_of_a_different_model_is_refused(tmp_path):
  loop.train(tiny_runs.tiny(2), tmp_path, progress=False)
  other = overrides.override(tiny_runs.tiny(2), "model.width", 64)
  with pytest.raises(loop.TrainingError, match="different model.*width: 32 there, 64 here"):
    loop.train(other, tmp_path, progress=False)


@pytest.mark.slow
def test_relative_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert (
      loop.train(tiny_runs.tiny(2, train__checkpoint_every=1), "runs/a", progress=False).step == 2
  )
  assert (tmp_path / "runs/a/checkpoints/2").is_dir()


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("")
  with pytest.raises(loop.TrainingError, match="cannot write to workdir"):
    loop.train(tiny_runs.tiny(2), blocker / "run", progress=False)


def test_unknown_set_key_suggests_names(tmp_path, capsys):
  assert train_cli.main(["--workdir", str(tmp_path), "--set", "train.step=3"]) == 2
  assert "did you mean steps" in capsys.readouterr().err
  assert train_cli.main(["--workdir", str(tmp_path), "--set", "train.steps"]) == 2
  assert "KEY=VALUE" in capsys.readouterr().err


def test_set_values_take_the_field_type():
  exp = overrides.apply(
      registry.get("mm2-tiny"),
      [
          "train.learning_rate=1",
          "model.long_term_delay_range=[3,9]",
          "data.path=123",
          "model.dtype=bfloat16",
      ],
  )
  assert exp.train.learning_rate == 1.0 and isinstance(exp.train.learning_rate, float)
  assert exp.model.long_term_delay_range == (3, 9)
  assert exp.data.path == "123"


def test_missing_and_empty_data_files(tmp_path, capsys):
  sets = ["data.source=text", "data.tokenizer=byte", "train.steps=1"]
  assert (
      train_cli.main(
          [
              "--experiment",
              "mm2-tiny",
              "--workdir",
              str(tmp_path / "a"),
              "--set",
              *sets,
              f"data.path={tmp_path / 'nope.txt'}",
          ]
      )
      == 2
  )
  assert "nope.txt" in capsys.readouterr().err
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  assert (
      train_cli.main(
          [
              "--experiment",
              "mm2-tiny",
              "--workdir",
              str(tmp_path / "b"),
              "--set",
              *sets,
              f"data.path={empty}",
          ]
      )
      == 2
  )
  assert "empty" in capsys.readouterr().err


def test_data_shorter_than_one_batch(tmp_path, capsys):
  short = tmp_path / "short.txt"
  short.write_text("to be or not to be")
  assert (
      train_cli.main(
          [
              "--experiment",
              "mm2-tiny",
              "--workdir",
              str(tmp_path / "run"),
              "--set",
              "data.source=text",
              "data.tokenizer=byte",
              f"data.path={short}",
          ]
      )
      == 2
  )
  assert "short.txt" in capsys.readouterr().err


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data/tinyshakespeare missing")
def test_tokenizer_vocabulary_larger_than_the_model(tmp_path):
  exp = overrides.override(
      tiny_runs.tiny(1),
      "data",
      config_lib.DataConfig(source="text", tokenizer="char", path=str(SHAKESPEARE), seq_len=32),
  )
  exp = overrides.override(exp, "model.vocab_size", 40)
  with pytest.raises(loop.TrainingError, match="65 token ids but model.vocab_size is 40"):
    loop.train(exp, tmp_path, progress=False)


@pytest.mark.slow
def test_a_partial_checkpoint_is_never_used(tmp_path):
  """Orbax writes into a temporary directory and renames it when complete: a crash leaves only
  the temporary one, which restore ignores."""
  exp = tiny_runs.tiny(4, train__checkpoint_every=2)
  loop.train(exp, tmp_path, progress=False)
  partial = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234"
  partial.mkdir()
  (partial / "state").mkdir()
  assert checkpoints.Checkpoints(tmp_path / "checkpoints", 3).steps() == [2, 4]
  result = loop.train(overrides.override(exp, "train.steps", 6), tmp_path, progress=False)
  assert result.step == 6


@pytest.mark.slow
@pytest.mark.parametrize("name, learns", [("quickstart", True), ("quickstart-llama", False)])
def test_quickstart_one_layer_induction(tmp_path, name, learns):
  """The v1 claim on a shortened schedule: one memory layer solves induction, one attention
  layer (RoPE) does not."""
  exp = overrides.apply(
      registry.get(name), ["train.steps=80", "train.eval_every=80", "train.checkpoint_every=80"]
  )
  accuracy = loop.train(exp, tmp_path, progress=False).val["accuracy"]
  assert accuracy >= 0.95 if learns else accuracy < 0.2


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data/tinyshakespeare missing")
@pytest.mark.parametrize(
    "name", ["mm1-shakespeare-char", "mm2-shakespeare-char", "llama-shakespeare-char"]
)
def test_shakespeare_experiments_run(tmp_path, name):
  exp = overrides.apply(
      registry.get(name),
      [
          f"data.path={SHAKESPEARE}",
          "train.steps=3",
          "train.batch_size=4",
          "train.eval_every=3",
          "train.eval_batches=1",
      ],
  )
  result = loop.train(exp, tmp_path, progress=False)
  assert result.step == 3 and np.isfinite(result.val["loss"])
  # The run kept its tokenizer: the trained model reads and writes text without the data.
  model = load(tmp_path)
  assert model.decode(model.encode("ROMEO:")) == "ROMEO:"
  assert len(model.generate_text("ROMEO:", 5)) == 5
