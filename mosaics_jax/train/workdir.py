"""The run directory as training writes it: created and probed, locked, set aside to restart, and
the record of the data files the run reads.

One run per workdir: `WorkdirLock` is an OS advisory lock (`fcntl.flock`) on `workdir/.lock`, which
the kernel releases when the holding process dies, however it dies (SIGKILL included): a stale lock
file never blocks the next run. The file records the holder's host, pid and start time, so a second
run can say who holds the workdir. In a multi-process run only process 0 takes it.

    prepare(workdir)
    with WorkdirLock(workdir):
      set_aside(workdir)   # --restart: the old run's files move to workdir/restarted-<time>/
      record_data(workdir, {"path": "/abs/input.txt"}, step)
      ...                  # train

A run's data files are recorded in `workdir/data.json` (`record_data`, process 0), so that
evaluation finds them from any directory and knows when they changed:

    {"step": 120,    # the step from which the run reads these files (0: its first start)
     "files": {"path": {"path": "/abs/input.txt", "sha256": "<hex>", "bytes": 1115394},
               "tokenizer_path": {...}},   # the data config's file fields, paths absolute
     "earlier": [{"step": 0, "files": {...}}]}   # records a resume replaced, oldest first

A resume that finds a file changed (another sha256) says so and keeps the old record in "earlier".
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pathlib
import socket
import time
import warnings
from typing import Any

from mosaics_jax import checkpoints, tokenizers

# What a run writes in its workdir, besides the lock: `--restart` moves these aside.
RUN_FILES = (
    checkpoints.CONFIG_FILE,
    *tokenizers.FILES,
    checkpoints.DATA_FILE,
    checkpoints.CHECKPOINTS_DIR,
    checkpoints.UNREADABLE_DIR,
    "metrics.jsonl",
    "tensorboard",
    "loss.png",
)


class WorkdirError(RuntimeError):
  """A workdir that cannot be written; the message says why."""


def prepare(workdir: pathlib.Path) -> None:
  """Creates `workdir` and checks that this process can write in it."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-probe-{socket.gethostname()}-{os.getpid()}"  # Hosts may share it.
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"cannot write to workdir {workdir}: {e.strerror or e}") from None


def set_aside(workdir: pathlib.Path) -> pathlib.Path | None:
  """Moves the files of the run in `workdir` into `workdir/restarted-<time>/`; returns that
  directory, or None when there was nothing to move. Call it holding the lock."""
  found = [name for name in RUN_FILES if (workdir / name).exists()]
  if not found:
    return None
  aside = workdir / time.strftime("restarted-%Y%m%d-%H%M%S")
  aside.mkdir()
  for name in found:
    (workdir / name).rename(aside / name)
  return aside


def file_record(path: str) -> dict[str, Any]:
  """{"path": path, "sha256": hex digest of its content, "bytes": its size}; the file is read in
  chunks (`hashlib.file_digest`), never whole into memory."""
  with open(path, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").hexdigest()
    size = f.tell()
  return {"path": path, "sha256": digest, "bytes": size}


def record_data(workdir: pathlib.Path, files: dict[str, str], step: int) -> dict[str, str]:
  """Records `files` (data config field -> absolute path) as what the run reads from `step` on.

  At step 0 (a first start) the record is written anew. A resume compares with the record: each
  file whose content changed is returned, by field, with a line saying so (both hashes); any
  change moves the old record to "earlier". Process 0 only.
  """
  path = workdir / checkpoints.DATA_FILE
  now = {field: file_record(name) for field, name in files.items()}
  before = _read_record(path) if step else None
  if before is not None and before["files"] == now:
    return {}
  changed = {}
  if before is not None:
    for field, then in before["files"].items():
      if field in now and then.get("sha256") != now[field]["sha256"]:
        changed[field] = (
            f"data.{field} changed since step {before['step']}: {then.get('path')} had sha256"
            f" {then.get('sha256')}, {now[field]['path']} has {now[field]['sha256']}"
        )
  earlier = []
  if before is not None:
    earlier = [*before.get("earlier", []), {"step": before["step"], "files": before["files"]}]
  record = {"step": step, "files": now, "earlier": earlier}
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(record, indent=2) + "\n")
  tmp.replace(path)  # Atomic: a crash never leaves a half-written record.
  return changed


def _read_record(path: pathlib.Path) -> dict[str, Any] | None:
  """The record in `path`; None, with a warning, when it is missing or not a record."""
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    warnings.warn(f"{path} cannot be read ({e}): writing a new record", stacklevel=3)
    return None
  if not (
      isinstance(record, dict)
      and isinstance(record.get("step"), int)
      and isinstance(record.get("files"), dict)
      and all(isinstance(f, dict) for f in record["files"].values())
      and isinstance(record.get("earlier", []), list)
  ):
    warnings.warn(f"{path} is not a record of data files: writing a new one", stacklevel=3)
    return None
  return record


class WorkdirLocked(WorkdirError):
  """Another process holds the workdir; the message names it."""


class WorkdirLock:
  """An exclusive lock on a run directory for the lifetime of a `with` block."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / checkpoints.LOCK_FILE
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirLocked naming its holder."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirLocked(
          f"{self.path.parent} is in use by {_holder(self.path)}: one run per workdir. Wait for"
          " it to finish, stop it, or use another --workdir"
      ) from None
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": round(time.time())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    self._fd = fd

  def release(self) -> None:
    """Gives the lock back (the file stays: removing it would race with a waiting run)."""
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def _holder(path: pathlib.Path) -> str:
  """The holder recorded in the lock file, in words."""
  try:
    holder = json.loads(path.read_text())
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
    return f"process {holder['pid']} on {holder['host']} (since {since})"
  except (OSError, ValueError, KeyError, TypeError):
    return "another process"
