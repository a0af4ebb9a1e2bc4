"""Stopping a run cleanly on SIGTERM (what TPU and Slurm preemption send) and SIGINT (Ctrl-C).

    with Preemption() as preemption:
      for step in ...:
        ...
        if preemption.agreed():
          ...  # checkpoint this step, flush the metrics, stop

A first signal is only recorded: the loop finishes the step it is in, checkpoints it and stops. A
second Ctrl-C raises KeyboardInterrupt at once. In a multi-process run every process asks
`agreed()` after every step, which all-gathers the processes' flags, so all of them stop at the
same step even when the signal reached only some: no host is left waiting in a collective.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """Records SIGTERM and SIGINT while active; `agreed()` says whether to stop now."""

  def __init__(self):
    self.signal: signal.Signals | None = None  # The first signal received.
    self._previous: dict[int, object] = {}

  def __enter__(self) -> Preemption:
    # Handlers can only be installed from the main thread; elsewhere signals keep their defaults.
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    del frame
    if self.signal is None:
      self.signal = signal.Signals(signum)
      # A second Ctrl-C is an abort.
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def agreed(self) -> bool:
    """Whether any process has been signalled; the same answer on every process."""
    local = self.signal is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))

  @property
  def exit_code(self) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number (SIGTERM's
    on a process that stopped because another one was signalled)."""
    return 128 + int(self.signal or signal.SIGTERM)
