"""Orbax checkpoints of a training run, and the run's saved config.

A checkpoint holds the train state (step, params, optimizer state, RNG key) and the data iterator's
state, so that a resumed run continues bit for bit. Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a checkpoint cut short by a crash is never listed; one
that is listed but cannot be read is skipped with a warning for the one before it. A checkpoint
restores onto the shardings of the template it is given, so a run saved on one mesh resumes on
another mesh or device count.

In a multi-process run every process calls every method (Orbax writes each process's shards and
synchronises them); files outside Orbax's (the config, a set-aside checkpoint) are changed by
process 0 alone.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from mosaics_jax import config as config_lib

CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
  """A workdir that cannot be used for this run."""


class Checkpoints:
  """Asynchronous saves every few steps, keeping the last `keep`; restore with fallback."""

  def __init__(self, directory: pathlib.Path, keep: int):
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data"),
    )

  def save(self, step: int, state: Any, data_state: dict) -> None:
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
        force=True,
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, template: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data state) of the newest readable checkpoint, or None if there is none.

    The state comes back with the shapes, dtypes and shardings of `template`'s arrays.
    """
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template
    )
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
            ),
        )
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back the same way.
        aside = self._set_aside(step)
        warnings.warn(
            f"checkpoint {self.directory / str(step)} is unreadable ({type(e).__name__}: {e});"
            f" using the previous one (the unreadable one is kept in {aside})",
            stacklevel=2,
        )
        continue
      return step, restored["state"], restored["data"]
    return None

  def _set_aside(self, step: int) -> pathlib.Path:
    """Moves an unreadable checkpoint out of the manager's sight, so its step can be saved again."""
    aside = self.directory.with_name(self.directory.name + "-unreadable") / str(step)
    if jax.process_index() == 0:
      aside.parent.mkdir(parents=True, exist_ok=True)
      if aside.exists():
        shutil.rmtree(aside)
      (self.directory / str(step)).rename(aside)
    ocp.multihost.sync_global_processes(f"mosaics_set_aside_{step}")  # Moved before any reloads.
    self._manager.reload()
    return aside

  def wait(self) -> None:
    """Blocks until every asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def check_or_save_config(workdir: pathlib.Path, experiment: config_lib.Experiment) -> None:
  """Saves the resolved config in workdir; refuses a workdir trained with a different model.

  The training recipe may change between runs (more steps, say); the model may not. Every process
  checks; process 0 saves.
  """
  path = workdir / CONFIG_FILE
  if path.exists():
    try:
      saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise CheckpointError(
          f"{path} is not valid JSON ({e}); remove it or use another workdir"
      ) from None
    new = config_lib.to_dict(experiment)["model"]
    old = saved.get("model", {})
    differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differing:
      details = ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in differing)
      raise CheckpointError(
          f"{workdir} holds a run of a different model ({details}); use another --workdir"
      )
  if jax.process_index() != 0:
    return
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(config_lib.to_dict(experiment), indent=2) + "\n")
  tmp.replace(path)  # Atomic: a crash never leaves a half-written config.
