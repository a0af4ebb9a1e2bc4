"""Stopping a run cleanly on SIGTERM (what TPU and Slurm preemption send) and SIGINT (Ctrl-C).

    with Preemption(agree_every=log_every) as preemption:
      for step in ...:
        ...
        if preemption.should_stop(step):
          ...  # checkpoint this step, flush the metrics, stop

A first signal is only recorded: a single-process run finishes the step it is in, checkpoints it
and stops. A second Ctrl-C raises KeyboardInterrupt at once. In a multi-process run the processes
agree (`agreed()`, an all-gather of their flags) after every `agree_every`-th step only, so that
the other steps never wait for a collective that carries only a flag; all of them stop at the same
step, the first such step after a signal, even when it reached only some: no host is left waiting
in a collective.

JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`) would agree without
a collective on the host path, but it only hears SIGTERM, through a handler of its own that
Python's handlers replace, and only when `jax.distributed` is initialised.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """Records SIGTERM and SIGINT while active; `should_stop(step)` says whether to stop now."""

  def __init__(self, agree_every: int = 1):
    self.agree_every = agree_every  # Of a multi-process run: the steps where processes agree.
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

  def should_stop(self, step: int) -> bool:
    """Whether to stop after `step`, the same answer on every process: at once in a
    single-process run; in a multi-process run at the first multiple of `agree_every` after a
    signal to any process. Every process must ask after every step."""
    if jax.process_count() > 1 and step % self.agree_every:
      return False
    return self.agreed()

  def agreed(self) -> bool:
    """Whether any process has been signalled; the same answer on every process (in a
    multi-process run a collective: every process must ask at once)."""
    local = self.signal is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))

  @property
  def exit_code(self) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number (SIGTERM's
    on a process that stopped because another one was signalled)."""
    return 128 + int(self.signal or signal.SIGTERM)
