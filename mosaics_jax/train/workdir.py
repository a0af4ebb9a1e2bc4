"""The run directory as training writes it: created and probed, locked, and set aside to restart.

One run per workdir: `WorkdirLock` is an OS advisory lock (`fcntl.flock`) on `workdir/.lock`, which
the kernel releases when the holding process dies, however it dies (SIGKILL included): a stale lock
file never blocks the next run. The file records the holder's host, pid and start time, so a second
run can say who holds the workdir. In a multi-process run only process 0 takes it.

    prepare(workdir)
    with WorkdirLock(workdir):
      set_aside(workdir)   # --restart: the old run's files move to workdir/restarted-<time>/
      ...                  # train
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import socket
import time

LOCK_FILE = ".lock"
# What a run writes in its workdir, besides the lock: `--restart` moves these aside.
RUN_FILES = (
    "config.json",
    "checkpoints",
    "checkpoints-unreadable",
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


class WorkdirLocked(WorkdirError):
  """Another process holds the workdir; the message names it."""


class WorkdirLock:
  """An exclusive lock on a run directory for the lifetime of a `with` block."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / LOCK_FILE
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
