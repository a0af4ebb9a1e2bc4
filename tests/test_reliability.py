"""Runs that survive people and clusters: one run per workdir, honest restores, no diverged
checkpoint, preemption, validated files, readers that never write, and fine-tuning."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_runs

from mosaics_jax import checkpoints, config as config_lib, load, overrides
from mosaics_jax.cli import (
    eval as eval_cli,
    generate as generate_cli,
    port as port_cli,
    train as train_cli,
)
from mosaics_jax.model import families
from mosaics_jax.port import layout, pretrained
from mosaics_jax.train import data, loop, metrics, workdir as workdir_lib


def _tree(directory: pathlib.Path) -> dict[str, tuple[int, int]]:
  """Every file under `directory` with its size and modification time."""
  return {
      str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
      for p in sorted(directory.rglob("*"))
  }


def _corrupt(checkpoint: pathlib.Path) -> None:
  """Overwrites every metadata file of a checkpoint with bytes that are not JSON."""
  for path in checkpoint.rglob("*"):
    if path.is_file() and "metadata" in path.name.lower():
      path.write_text("not json")


# One run per workdir ------------------------------------------------------------------------------


def test_a_second_lock_names_the_holder(tmp_path):
  with workdir_lib.WorkdirLock(tmp_path):
    with pytest.raises(workdir_lib.WorkdirLocked, match=f"in use by process {os.getpid()} on"):
      workdir_lib.WorkdirLock(tmp_path).acquire()
  workdir_lib.WorkdirLock(tmp_path).acquire()  # Released on exit.


def test_a_killed_holder_leaves_no_lock(tmp_path):
  code = (
      "import sys, time; from mosaics_jax.train import workdir;"
      f" workdir.WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True);"
      " time.sleep(600)"
  )
  holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lib.WorkdirLocked, match=f"process {holder.pid}"):
    workdir_lib.WorkdirLock(tmp_path).acquire()
  holder.kill()
  holder.wait()
  workdir_lib.WorkdirLock(tmp_path).acquire()


@pytest.mark.slow
def test_a_second_run_on_a_workdir_exits_2_naming_the_first(tmp_path):
  first = subprocess.Popen(
      tiny_runs.cli(tmp_path, *tiny_runs.cli_sets("train.steps=100000")),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.time() + 300
    while not (tmp_path / "metrics.jsonl").exists():  # Training has started.
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.2)
    second = subprocess.run(
        tiny_runs.cli(tmp_path, *tiny_runs.cli_sets("train.seed=1")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 2
    assert f"in use by process {first.pid}" in second.stderr
  finally:
    first.kill()
    first.wait()


# Honest restores ----------------------------------------------------------------------------------


def test_a_checkpoint_of_another_model_is_an_error_and_nothing_moves(tmp_path):
  loop.train(tiny_runs.tiny(2), tmp_path, progress=False)
  before = _tree(tmp_path / "checkpoints")
  # The workdir's config says two layers (edited by hand): its checkpoint still has one.
  other = tiny_runs.tiny(2, model__num_layers=2)
  config = json.loads((tmp_path / "config.json").read_text())
  config["model"]["num_layers"] = 2
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(loop.TrainingError, match="does not fit this run: it has no params/layer_1"):
    loop.train(other, tmp_path, progress=False)
  assert _tree(tmp_path / "checkpoints") == before
  assert not (tmp_path / checkpoints.UNREADABLE_DIR).exists()


@pytest.mark.slow
def test_no_readable_checkpoint_stops_until_restart(tmp_path):
  exp = tiny_runs.tiny(4, train__checkpoint_every=2)
  loop.train(exp, tmp_path, progress=False)
  for step in (2, 4):
    _corrupt(tmp_path / "checkpoints" / str(step))
  before = _tree(tmp_path / "checkpoints")
  with pytest.raises(loop.TrainingError, match="no checkpoint .* can be read.*--restart"):
    loop.train(exp, tmp_path, progress=False)
  assert _tree(tmp_path / "checkpoints") == before  # Nothing was moved.
  assert not (tmp_path / checkpoints.UNREADABLE_DIR).exists()
  assert loop.train(exp, tmp_path, progress=False, restart=True).step == 4
  aside = [p for p in tmp_path.iterdir() if p.name.startswith("restarted-")]
  assert len(aside) == 1 and (aside[0] / "checkpoints" / "4").is_dir()


@pytest.mark.slow
def test_a_data_state_out_of_range_is_unreadable(tmp_path):
  exp = tiny_runs.tiny(4, train__checkpoint_every=2)
  loop.train(exp, tmp_path, progress=False)
  (tmp_path / "checkpoints/4/data/metadata").write_text(json.dumps({"next_index": 999999}))
  longer = overrides.override(exp, "train.steps", 6)
  with pytest.warns(UserWarning, match="checkpoints/4 is unreadable.*not at batch 4"):
    result = loop.train(longer, tmp_path, progress=False)
  assert result.step == 6
  # Steps 3 and 4 were trained again from step 2's checkpoint: metrics hold each step once.
  steps = [r["step"] for r in metrics.read_metrics(tmp_path) if "split" not in r]
  assert steps == sorted(set(steps))


@pytest.mark.slow
def test_a_garbage_line_in_the_metrics_does_not_block_a_resume(tmp_path):
  exp = tiny_runs.tiny(2)
  loop.train(exp, tmp_path, progress=False)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write("garbage\n")
  with pytest.warns(UserWarning, match="dropped a line that is not a record"):
    assert loop.train(overrides.override(exp, "train.steps", 4), tmp_path, progress=False).step == 4


# NaN and Inf --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_checkpoint_holds_diverged_parameters(tmp_path):
  exp = tiny_runs.tiny(20, train__learning_rate=1e3, train__checkpoint_every=1, train__log_every=1)
  with pytest.raises(loop.TrainingError, match=r"stopped at step \d+") as error:
    loop.train(exp, tmp_path, progress=False)
  if "No checkpoint was saved" in str(error.value):
    assert not checkpoints.Checkpoints(tmp_path / "checkpoints", 3).steps()
    return
  # The checkpoint's parameters give finite logits on the run's probe batch (the first validation
  # batch), which the loop checks before every save.
  probe = next(data.make_iterator(exp.data, split="val", batch_size=exp.train.batch_size, seed=0))
  assert np.isfinite(load(tmp_path).logits(probe["tokens"], probe["segment_ids"])).all()


@pytest.mark.slow
def test_a_failure_before_the_first_checkpoint_does_not_block_the_corrected_command(tmp_path):
  diverging = tiny_runs.tiny(3, train__learning_rate=float("nan"), train__log_every=1)
  with pytest.raises(loop.TrainingError, match="No checkpoint was saved"):
    loop.train(diverging, tmp_path, progress=False)
  corrected = tiny_runs.tiny(2, model__width=16)  # Another model, in the same workdir.
  assert loop.train(corrected, tmp_path, progress=False).step == 2


# Preemption ---------------------------------------------------------------------------------------


def _run_until_training(workdir: pathlib.Path, *sets: str) -> subprocess.Popen:
  proc = subprocess.Popen(
      tiny_runs.cli(workdir, *tiny_runs.cli_sets(*sets)),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  deadline = time.time() + 300
  metrics_file = workdir / "metrics.jsonl"
  while not (metrics_file.exists() and metrics_file.read_text()):  # A step is logged.
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline
    time.sleep(0.05)
  return proc


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_the_resume_is_exact(tmp_path):
  steps = 400
  sets = [f"train.steps={steps}", "train.checkpoint_every=1000", "train.log_every=1"]
  proc = _run_until_training(tmp_path / "stopped", *sets)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err
  stopped = int(out.split("at step ")[1].split(":")[0])
  assert 0 < stopped < steps, out
  assert (tmp_path / f"stopped/checkpoints/{stopped}").is_dir()
  assert "Traceback" not in err
  resumed = subprocess.run(
      tiny_runs.cli(tmp_path / "stopped", *tiny_runs.cli_sets(*sets)), capture_output=True
  )
  assert resumed.returncode == 0, resumed.stderr
  straight = subprocess.run(
      tiny_runs.cli(tmp_path / "straight", *tiny_runs.cli_sets(*sets)), capture_output=True
  )
  assert straight.returncode == 0, straight.stderr
  exp = overrides.apply(tiny_runs.tiny(steps), tiny_runs.cli_sets(*sets))
  (_, a), (_, b) = (tiny_runs.final_params(tmp_path / d, exp) for d in ("stopped", "straight"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_a_second_one_aborts(tmp_path):
  sets = ["train.steps=100000", "train.checkpoint_every=100000", "train.log_every=1"]
  proc = _run_until_training(tmp_path / "once", *sets)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130 and "stopped by SIGINT" in out, err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  proc = _run_until_training(tmp_path / "twice", *sets)
  proc.send_signal(signal.SIGINT)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130 and "Traceback" not in err


# Validated configs and files ----------------------------------------------------------------------


def test_a_billion_layers_are_refused_before_anything_is_built(tmp_path):
  huge = tiny_runs.tiny(2, model__num_layers=10**9)
  with pytest.raises(loop.TrainingError, match="parameters needs about .* GiB"):
    loop.train(huge, tmp_path / "run", progress=False)
  assert not (tmp_path / "run/config.json").exists()
  export = tmp_path / "export"
  export.mkdir()
  model = {"family": "mm2", **config_lib.to_dict(huge.model)}
  (export / "config.json").write_text(json.dumps({"model": model, "step": None}))
  with pytest.raises(layout.PortError, match="describes a mm2 model of .* parameters"):
    load(export)


@pytest.mark.parametrize(
    "model, error",
    [
        ({"family": "mm2", "num_layers": "1"}, "must be an int"),
        (None, "no model config"),
        ([1, 2], "no model config"),
    ],
)
def test_bad_json_configs_are_named(tmp_path, model, error):
  text = {"model": model} if model is not None else {"step": 3}
  if isinstance(model, dict):
    text["model"] = {**config_lib.to_dict(tiny_runs.tiny(1).model), **model}
  (tmp_path / "config.json").write_text(json.dumps(text))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises((config_lib.ConfigError, layout.PortError), match=error):
    load(tmp_path)


def test_load_never_writes_and_reads_past_a_corrupt_checkpoint(tmp_path):
  run = tmp_path / "run"
  loop.train(tiny_runs.tiny(4, train__checkpoint_every=2), run, progress=False)
  _corrupt(run / "checkpoints/4")
  before = _tree(run)
  for path in run.rglob("*"):  # Read-only storage (a root user writes anyway; the tree tells).
    path.chmod(path.stat().st_mode & 0o555)
  try:
    with pytest.warns(UserWarning, match="checkpoints/4 is unreadable.*left in place"):
      model = load(run)
  finally:
    for path in run.rglob("*"):
      path.chmod(path.stat().st_mode | 0o200)
  assert model.step == 2
  assert _tree(run) == before


# Loading a live run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_run(tmp_path_factory) -> pathlib.Path:
  """A tiny run's workdir with checkpoints at steps 2 and 4 (copy it before changing it)."""
  run = tmp_path_factory.mktemp("live") / "run"
  loop.train(tiny_runs.tiny(4, train__checkpoint_every=2), run, progress=False)
  return run


def _while_restoring(monkeypatch, writer) -> None:
  """Makes `writer(step)` run inside each Orbax restore, between listing the steps and reading
  one: what a training run that saves and deletes checkpoints may do to a reader."""
  original = ocp.CheckpointManager.restore

  def restore(self, step, *args, **kwargs):
    writer(step)
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)


def _params(run: pathlib.Path, step: int, solo: pathlib.Path) -> dict:
  """The params of checkpoint `step`, read through a copy in `solo` holding it alone."""
  shutil.copytree(run, solo)
  for other in checkpoints.saved_steps(solo):
    if other != step:
      shutil.rmtree(solo / "checkpoints" / str(other))
  return load(solo).params


@pytest.mark.parametrize("half", [False, True], ids=["deleted", "half-deleted"])
def test_a_checkpoint_deleted_while_it_is_read_gives_the_newest_left(
    live_run, tmp_path, monkeypatch, half
):
  # keep_checkpoints=1 as the run saves step 6: step 4 goes (its files first, then its folder:
  # "half" stops before the folder) while the reader reads it.
  run = tmp_path / "run"
  shutil.copytree(live_run, run)
  ckpt = run / "checkpoints"
  shutil.rmtree(ckpt / "2")
  shutil.copytree(ckpt / "4", tmp_path / "next")

  def writer(step):
    if step == 4:
      shutil.copytree(tmp_path / "next", ckpt / "6")
      if half:
        for path in (ckpt / "4").rglob("*"):
          if path.is_file():
            path.unlink()
      else:
        shutil.rmtree(ckpt / "4")

  _while_restoring(monkeypatch, writer)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = load(run)
  messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
  assert model.step == 6
  assert any("checkpoints/4 was deleted while it was read" in m and "step 6" in m for m in messages)
  assert not any("unreadable" in m for m in messages), messages
  monkeypatch.undo()
  jax.tree.map(np.testing.assert_array_equal, model.params, _params(live_run, 4, tmp_path / "solo"))


def test_a_run_that_deletes_every_checkpoint_it_is_read_is_a_named_error(
    live_run, tmp_path, monkeypatch, capsys
):
  run = tmp_path / "run"
  shutil.copytree(live_run, run)
  ckpt = run / "checkpoints"

  def writer(step):  # Each read sees its checkpoint replaced by a newer one.
    shutil.copytree(ckpt / str(step), ckpt / str(step + 2))
    shutil.rmtree(ckpt / str(step))

  _while_restoring(monkeypatch, writer)
  with pytest.raises(checkpoints.NoReadableCheckpoint, match="deleted while they were read"):
    load(run)
  assert port_cli.main(["to-safetensors", str(run), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("mosaics-port: error:") and "deleted while they were read" in err
  assert len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["eval", "generate", "port"])
def test_clis_name_a_workdir_without_a_readable_checkpoint_in_one_line(
    live_run, tmp_path, capsys, command
):
  run = tmp_path / "run"
  shutil.copytree(live_run, run)
  for step in (2, 4):
    _corrupt(run / "checkpoints" / str(step))
  argv, main = {
      "eval": ([str(run), "--task", "perplexity"], eval_cli.main),
      "generate": ([str(run), "--prompt", "a"], generate_cli.main),
      "port": (["to-safetensors", str(run), str(tmp_path / "out")], port_cli.main),
  }[command]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"mosaics-{command}: error: no checkpoint in {run / 'checkpoints'} can")
  assert len(err.splitlines()) == 1


@pytest.mark.slow
def test_loading_a_live_run_reads_a_checkpoint_each_time(tmp_path):
  # The scenario: a checkpoint every step, three kept, loads while it trains.
  run = tmp_path / "run"
  sets = tiny_runs.cli_sets(
      "train.steps=100000", "train.checkpoint_every=1", "train.keep_checkpoints=3"
  )
  trainer = subprocess.Popen(
      tiny_runs.cli(run, *sets), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  try:
    while len(checkpoints.saved_steps(run)) < 3:
      assert trainer.poll() is None, "the run stopped"
      time.sleep(0.2)
    steps = [load(run).step for _ in range(8)]
  finally:
    trainer.kill()
    trainer.wait()
  assert all(isinstance(s, int) for s in steps) and steps == sorted(steps), steps


def test_segment_ids_that_come_back_are_refused(tmp_path):
  config = tiny_runs.tiny(1).model
  model = families.build_model(config)
  tokens = np.zeros((1, 6), np.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  back = np.array([[0, 0, 1, 1, 0, 0]], np.int32)
  with pytest.raises(ValueError, match="non-decreasing.*row 0 goes from 1 to 0 at position 4"):
    model.apply({"params": params}, tokens, back)
  pretrained.save_exported(tmp_path, config, params)
  with pytest.raises(ValueError, match="non-decreasing"):
    load(tmp_path).logits(tokens, back)
  load(tmp_path).logits(tokens, np.array([[0, 0, 1, 1, 2, 2]], np.int32))


# Fine-tuning --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fine_tuning_starts_from_the_source_parameters(tmp_path):
  source = tmp_path / "source"
  loop.train(tiny_runs.tiny(2), source, progress=False)
  args = ["--experiment", "mm2-tiny", "--workdir", str(tmp_path / "tuned"), "--no-progress"]
  sets = ["--set", *tiny_runs.cli_sets("train.steps=1", "train.learning_rate=0")]
  assert train_cli.main([*args, "--init-from", str(source), *sets]) == 0
  exp = overrides.apply(tiny_runs.tiny(1), tiny_runs.cli_sets("train.learning_rate=0"))
  _, tuned = tiny_runs.final_params(tmp_path / "tuned", exp)
  for x, y in zip(jax.tree.leaves(tuned), jax.tree.leaves(load(source).params)):
    np.testing.assert_array_equal(x, y)  # A zero learning rate keeps the source's parameters.
  origin = [r for r in metrics.read_metrics(tmp_path / "tuned") if r.get("split") == "init"]
  assert origin == [
      {
          "step": 0,
          "split": "init",
          "time": origin[0]["time"],
          "init_from": str(source),
          "init_step": 2,
      }
  ]


def test_fine_tuning_from_another_model_is_refused(tmp_path, capsys):
  source = tmp_path / "source"
  loop.train(tiny_runs.tiny(2), source, progress=False)
  args = ["--workdir", str(tmp_path / "tuned"), "--experiment", "mm2-tiny", "--no-progress"]
  sets = ["--set", *tiny_runs.cli_sets("model.width=64")]
  assert train_cli.main([*args, "--init-from", str(source), *sets]) == 2
  assert "holds another model than mm2-tiny's: width: 32 there, 64 here" in capsys.readouterr().err


def test_an_experiment_that_fine_tunes_needs_init_from(tmp_path, capsys):
  assert train_cli.main(["--experiment", "mm2-small-32k", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "mm2-small-32k fine-tunes from mm2-small: give --init-from PATH" in err
  assert not any(tmp_path.iterdir())


def test_restart_sets_the_old_run_aside(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "metrics.jsonl").write_text("")
  aside = workdir_lib.set_aside(tmp_path)
  assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "metrics.jsonl"]
  assert workdir_lib.set_aside(tmp_path) is None
  shutil.rmtree(aside)
