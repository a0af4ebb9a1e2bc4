"""Multi-process training: two `mosaics-train` processes on localhost train as one process does.

Each process has one CPU device; `jax.distributed` joins them (Gloo collectives) into a data=2
mesh, each reads its half of every global batch, and both write the one checkpoint. The reference
runs are one process with two simulated CPU devices on the same mesh, and one plain device.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mosaics_jax import checkpoints, config as config_lib, distributed
from mosaics_jax.model import families
from mosaics_jax.train import metrics, optim, step as step_lib

TIMEOUT_S = 240  # A process whose peer died waits in a collective: fail instead of hanging.
STEPS = 3
# Dropout and two micro-batches: the processes' rows must be the global batch's, in order.
SETS = [
    "model.num_layers=1",
    "model.width=32",
    "model.num_heads=2",
    "model.ffn_width=64",
    "model.dropout=0.1",
    "data.source=synthetic_induction",
    "data.task_vocab=32",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.grad_accum=2",
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.eval_batches=1",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(
    workdir: pathlib.Path, devices: int, *flags: str, mesh: str = "", sets: list[str] = SETS
) -> subprocess.Popen:
  """`mosaics-train` of the tiny mm2 run (`sets`) in a process with `devices` CPU devices."""
  xla_flags = re.sub(
      r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")
  )
  env = {
      **{k: v for k, v in os.environ.items() if not k.startswith("MOSAICS_")},
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"{xla_flags} --xla_force_host_platform_device_count={devices}",
  }
  command = [
      sys.executable,
      "-m",
      "mosaics_jax.cli.train",
      "--experiment",
      "mm2-tiny",
      "--workdir",
      str(workdir),
      "--no-progress",
      *flags,
      "--set",
      *sets,
  ]
  if mesh:
    command.append(mesh)
  return subprocess.Popen(
      command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def _wait(processes: dict[str, subprocess.Popen]) -> dict[str, str]:
  """The stdout of each process; fails (and kills them all) if any fails or times out."""
  out = {}
  try:
    for name, process in processes.items():
      try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
      except subprocess.TimeoutExpired:
        pytest.fail(f"{name} ran over {TIMEOUT_S} s")
      assert process.returncode == 0, f"{name} failed:\n{stderr[-4000:]}"
      out[name] = stdout
  finally:
    for process in processes.values():
      if process.poll() is None:
        process.kill()
        process.wait()
  return out


def _losses(workdir: pathlib.Path) -> tuple[list[int], list[float], list[float]]:
  records = metrics.read_metrics(workdir)
  train_records = [r for r in records if "split" not in r]
  val = [r["loss"] for r in records if r.get("split") == "val"]
  return [r["step"] for r in train_records], [r["loss"] for r in train_records], val


def _params(workdir: pathlib.Path) -> list[np.ndarray]:
  """The newest checkpoint's params, restored onto this process's first device."""
  experiment = config_lib.from_dict(
      config_lib.Experiment, json.loads((workdir / checkpoints.CONFIG_FILE).read_text())
  )
  model = families.build_model(experiment.model)
  tx = optim.make_optimizer(experiment.train)
  ckpts = checkpoints.Checkpoints(workdir / "checkpoints", 3)
  step, state, _ = ckpts.restore_latest(step_lib.abstract_state(experiment, model, tx))
  ckpts.close()
  assert step == STEPS
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
  two, mesh, one = tmp_path / "two-processes", tmp_path / "two-devices", tmp_path / "one-device"
  cluster = ["--coordinator-address", f"localhost:{_free_port()}", "--num-processes", "2"]
  stdout = _wait(
      {
          "process 0": _start(two, 1, *cluster, "--process-id", "0", mesh="mesh.data=2"),
          "process 1": _start(two, 1, *cluster, "--process-id", "1", mesh="mesh.data=2"),
          "two devices": _start(mesh, 2, mesh="mesh.data=2"),
          "one device": _start(one, 1),
      }
  )
  # Process 0 alone reports, and writes each metric once.
  assert "trained mm2-tiny to step 3" in stdout["process 0"]
  assert "trained" not in stdout["process 1"]
  steps, losses, val = _losses(two)
  assert steps == list(range(1, STEPS + 1)) and len(val) == 1
  for reference in (mesh, one):
    ref_steps, ref_losses, ref_val = _losses(reference)
    assert ref_steps == steps
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(reference))
    np.testing.assert_allclose(val, ref_val, rtol=1e-5, err_msg=str(reference))
  # The checkpoint both processes wrote holds the whole state.
  for x, y in zip(_params(two), _params(one), strict=True):
    np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [1, 3])
def test_a_signal_to_one_process_stops_both_at_one_checkpoint(tmp_path, log_every):
  """Preemption that reaches one host only: both processes stop after the same step, a log step
  (where they agree), write its checkpoint together and exit with SIGTERM's code; none is left
  waiting in a collective."""
  workdir = tmp_path / "run"
  cluster = ["--coordinator-address", f"localhost:{_free_port()}", "--num-processes", "2"]
  long = [s for s in SETS if not s.startswith(("train.steps=", "train.log_every="))]
  long += ["train.steps=100000", "train.checkpoint_every=100000", f"train.log_every={log_every}"]
  processes = [
      _start(workdir, 1, *cluster, "--process-id", str(i), mesh="mesh.data=2", sets=long)
      for i in range(2)
  ]
  try:
    deadline = time.time() + TIMEOUT_S
    while not (workdir / "metrics.jsonl").exists() or not metrics.read_metrics(workdir):
      assert time.time() < deadline and all(p.poll() is None for p in processes)
      time.sleep(0.1)
    processes[1].send_signal(signal.SIGTERM)
    results = [p.communicate(timeout=TIMEOUT_S) for p in processes]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  for process, (_, err) in zip(processes, results):
    assert process.returncode == 128 + signal.SIGTERM, err[-4000:]
  assert "stopped by a signal to another process at step " in results[0][0]
  stopped = int(results[0][0].split("at step ")[1].split(":")[0])
  assert 0 < stopped < 100000 and stopped % log_every == 0
  assert checkpoints.Checkpoints(workdir / "checkpoints", 3, read_only=True).steps() == [stopped]


@pytest.fixture
def no_cluster(monkeypatch):
  for name in (
      distributed.ENV_COORDINATOR_ADDRESS,
      distributed.ENV_NUM_PROCESSES,
      distributed.ENV_PROCESS_ID,
  ):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "cluster_detected", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a: pytest.fail("initialised"))


def test_a_single_process_initialises_nothing(no_cluster, monkeypatch):
  assert not distributed.initialize()
  assert not distributed.initialize("localhost:1234", 1, 0)
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
  assert not distributed.initialize("localhost:1234")


def test_bad_process_settings_are_clear_errors(no_cluster, monkeypatch):
  with pytest.raises(config_lib.ConfigError, match="process id < number of processes, got 2 and 2"):
    distributed.initialize("localhost:1234", 2, 2)
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, "first")
  with pytest.raises(config_lib.ConfigError, match="MOSAICS_PROCESS_ID must be an integer"):
    distributed.initialize("localhost:1234", 2)
