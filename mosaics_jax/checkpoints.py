"""Orbax checkpoints of a training run, and the run's saved config.

A checkpoint holds the train state (step, params, optimizer state, RNG key) and the data iterator's
state, so that a resumed run continues bit for bit. Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a checkpoint cut short by a crash is never listed. A
checkpoint restores onto the shardings of the template it is given, so a run saved on one mesh
resumes on another mesh or device count.

Restores tell the truth (`Checkpoints.restore_latest`):
- a checkpoint whose saved tree does not fit the template (structure, shapes, dtypes) is an error
  (`CheckpointMismatch`) naming the first parameter that differs; nothing is moved;
- a checkpoint that cannot be read at all, or whose data state does not fit the run, is
  unreadable: the newest readable one before it is used, with a warning, and a writer sets the
  unreadable one aside (`checkpoints-unreadable/`) so that its step can be saved again; a reader
  (`read_only=True`) leaves it in place;
- when checkpoints exist but none is readable, that is an error (`NoReadableCheckpoint`) and
  nothing is moved: starting over is the user's explicit choice (`mosaics-train --restart`).

In a multi-process run every process calls every method (Orbax writes each process's shards and
synchronises them); files outside Orbax's (the config, a set-aside checkpoint) are changed by
process 0 alone.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from mosaics_jax import config as config_lib

CONFIG_FILE = "config.json"
DATA_FILE = "data.json"  # The run's data files: absolute paths and hashes (`train/workdir.py`).
LOCK_FILE = ".lock"  # One run per workdir (`train/workdir.py`); left by every run that started.
CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints-unreadable"
# How many times a reader lists the steps again after the checkpoint it read was deleted.
VANISHED_RETRIES = 8


def saved_steps(workdir: str | os.PathLike) -> list[int]:
  """The steps of the checkpoints in `workdir` (its step-numbered folders), without opening one."""
  return _steps_in(pathlib.Path(workdir) / CHECKPOINTS_DIR)


def _steps_in(folder: pathlib.Path) -> list[int]:
  return (
      sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
  )


class CheckpointError(RuntimeError):
  """A workdir that cannot be used for this run."""


class CheckpointMismatch(CheckpointError):
  """A readable checkpoint of another model (or optimizer) than the template's."""


class LayoutMismatch(CheckpointError):
  """A run resumed with another `model.scan_layers` than its checkpoints were saved with; the
  training loop converts the state (`saved_scan_layers` is the checkpoints' layout)."""

  def __init__(self, message: str, saved_scan_layers: bool):
    super().__init__(message)
    self.saved_scan_layers = saved_scan_layers


class NoReadableCheckpoint(CheckpointError):
  """Checkpoints exist, and none of them can be read."""


class _Vanished(Exception):
  """A checkpoint deleted while it was read (`Checkpoints.restore_latest` lists the steps again)."""

  def __init__(self, step: int):
    super().__init__(step)
    self.step = step


class UnreadableData(ValueError):
  """A checkpoint's data-iterator state that does not fit the run (`restore_latest`'s check)."""


class Checkpoints:
  """Asynchronous saves every few steps, keeping the last `keep`; honest restores with fallback.

  With `read_only=True` nothing is ever written, moved or deleted (readers: `mosaics_jax.load`).
  """

  def __init__(self, directory: pathlib.Path, keep: int, *, read_only: bool = False):
    self.directory = directory
    self.read_only = read_only
    options = (
        # Spelled out: Orbax warns of each setting read_only would change otherwise.
        ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
        if read_only
        else ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    )
    # Handlers given up front, so that a fresh manager reads a checkpoint's metadata too.
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

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

  def restore_latest(
      self, template: Any, check_data: Callable[[int, Any], None] | None = None
  ) -> tuple[int, Any, dict] | None:
    """(step, state, data state) of the newest readable checkpoint, or None if there is none.

    The state comes back with the shapes, dtypes and shardings of `template`'s arrays; a None
    template restores the saved tree as it is. `check_data(step, data_state)` raises
    `UnreadableData` for a data state that does not fit the run. A checkpoint deleted while it is
    read (a reader of a live run that keeps few checkpoints) is not unreadable: the steps are
    listed again and the newest one then is read, with a warning that names it.

    Raises:
      CheckpointMismatch: the newest readable checkpoint is another model's (nothing is moved).
      NoReadableCheckpoint: there are checkpoints and none can be read, or checkpoints kept
        vanishing while they were read.
    """
    vanished: list[int] = []
    for _ in range(VANISHED_RETRIES):
      try:
        restored = self._restore_newest(template, check_data)
      except _Vanished as e:
        vanished.append(e.step)
        self._manager.reload()
        continue
      if vanished and restored is not None:
        warnings.warn(
            f"checkpoint {self.directory / str(vanished[-1])} was deleted while it was read (the"
            f" run is live); read step {restored[0]}, the newest one left",
            stacklevel=2,
        )
      return restored
    raise NoReadableCheckpoint(
        f"the checkpoints in {self.directory} were deleted while they were read, {len(vanished)}"
        f" times (steps {vanished}): the run writing them keeps too few to read one (raise its"
        " train.keep_checkpoints), or read it when it stops"
    )

  def _restore_newest(
      self, template: Any, check_data: Callable[[int, Any], None] | None
  ) -> tuple[int, Any, dict] | None:
    """`restore_latest` over the steps listed now; `_Vanished` for a step deleted meanwhile."""
    unreadable: list[tuple[int, Exception]] = []
    listed = self.steps()
    for step in reversed(listed):
      try:
        saved = self._read(step, listed, lambda s: self._manager.item_metadata(s)["state"].tree)
      except _Vanished:
        raise
      except Exception as e:  # noqa: BLE001 - any unreadable metadata falls back the same way.
        unreadable.append((step, e))
        continue
      if template is not None and (mismatch := _first_mismatch(saved, template)):
        raise CheckpointMismatch(
            f"checkpoint {self.directory / str(step)} does not fit this run: {mismatch}. Nothing"
            " was moved; train this model in another --workdir"
        )
      try:
        restored = self._read(
            step, listed, lambda s: self._manager.restore(s, args=self._restore_args(template))
        )
        if check_data is not None:
          check_data(step, restored["data"])
      except _Vanished:
        raise
      except Exception as e:  # noqa: BLE001 - corrupt data or a bad data state alike.
        unreadable.append((step, e))
        continue
      for bad_step, error in unreadable:
        self._warn_unreadable(bad_step, error)
      return step, restored["state"], restored["data"]
    if unreadable:
      problems = "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in unreadable)
      raise NoReadableCheckpoint(
          f"no checkpoint in {self.directory} can be read ({problems}); nothing was moved"
      )
    return None

  def _read(self, step: int, listed: list[int], read: Callable[[int], Any]) -> Any:
    """`read(step)`; raises `_Vanished` when it fails while the run that writes the checkpoints
    changes them: the step's folder is gone, or the steps on disk are no longer `listed`.

    Orbax deletes a checkpoint's files before its folder, so a folder still there may be half
    deleted: a changed listing (the run saved a newer step) tells that from a corrupt checkpoint.
    """
    try:
      return read(step)
    except Exception as e:  # noqa: BLE001 - re-raised unless the run changed the checkpoints.
      if not (self.directory / str(step)).exists() or _steps_in(self.directory) != listed:
        raise _Vanished(step) from e
      raise

  def _restore_args(self, template: Any) -> ocp.args.Composite:
    target = (
        None
        if template is None
        else jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template
        )
    )
    return ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())

  def _warn_unreadable(self, step: int, error: Exception) -> None:
    """Warns of an unreadable checkpoint newer than the one restored; a writer sets it aside."""
    where = "left in place" if self.read_only else f"moved to {self._set_aside(step)}"
    warnings.warn(
        f"checkpoint {self.directory / str(step)} is unreadable ({type(error).__name__}: {error});"
        f" using an earlier one ({where})",
        stacklevel=3,
    )

  def _set_aside(self, step: int) -> pathlib.Path:
    """Moves an unreadable checkpoint out of the manager's sight, so its step can be saved again."""
    aside = self.directory.with_name(UNREADABLE_DIR) / str(step)
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


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{path: (shape, dtype)} of a state tree or of Orbax's metadata of one, paths as "a/b/c"."""

  def name(key) -> str:
    for attribute in ("key", "idx", "name"):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    return str(key)

  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {
      "/".join(name(k) for k in path): (tuple(x.shape), jax.numpy.dtype(x.dtype))
      for path, x in flat
      if hasattr(x, "shape")
  }


def _first_mismatch(saved: Any, template: Any) -> str | None:
  """The first difference between a saved state tree and the template, in words, or None."""
  there, here = _leaves(saved), _leaves(template)
  # The parameters first: a difference there is what names the model that does not fit.
  for path in sorted(set(there) | set(here), key=lambda p: (not p.startswith("params/"), p)):
    if path not in here:
      return f"it holds {path}, which this model does not have"
    if path not in there:
      return f"it has no {path}, which this model has"
    (shape, dtype), (want_shape, want_dtype) = there[path], here[path]
    if shape != want_shape or dtype != want_dtype:
      return f"{path} is {dtype}{list(shape)} there, {want_dtype}{list(want_shape)} here"
  return None


def check_or_save_config(
    workdir: pathlib.Path,
    experiment: config_lib.Experiment | config_lib.MoonsExperiment,
    *,
    has_checkpoints: bool,
) -> None:
  """Saves the resolved config in workdir; refuses a workdir that holds another model's run.

  The training recipe may change between runs (more steps, say); the model may not, once a
  checkpoint exists: a run that failed before its first checkpoint does not block the corrected
  command. Every process checks; process 0 saves.
  """
  path = workdir / CONFIG_FILE
  if path.exists() and has_checkpoints:
    try:
      saved = json.loads(path.read_text())
      old = saved["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"{path} is not a config this project wrote ({type(e).__name__}: {e}); restore it or use"
          " another workdir"
      ) from None
    new = config_lib.to_dict(experiment)["model"]
    differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differing == ["scan_layers"]:
      raise LayoutMismatch(
          f"{workdir} holds a run saved with model.scan_layers={old['scan_layers']}, and this"
          f" run has model.scan_layers={new['scan_layers']}",
          saved_scan_layers=bool(old["scan_layers"]),
      )
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
