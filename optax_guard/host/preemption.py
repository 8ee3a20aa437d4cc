"""Preemption: a signal asks the loop to stop at the same step everywhere.

:class:`PreemptionHandler` turns SIGTERM / SIGINT into a request that
:func:`optax_guard.fit` reads once per step; under ``jax.distributed`` every
process gets the same answer at the same step (the save is collective).
"""

import logging
import signal
import threading
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

_log = logging.getLogger('optax_guard')


class PreemptionHandler:
  """Turns SIGTERM / SIGINT into a request to stop after the current step.

  Inside the ``with`` block the first signal only sets :attr:`requested`
  (the loop then saves and stops); a second SIGINT interrupts at once, as
  usual. The previous handlers come back on exit. Outside the main thread,
  where Python cannot install handlers, it does nothing.

  Under ``jax.distributed`` a signal usually reaches one process, yet every
  process must stop at the same step (the save is collective):
  :meth:`reached` gives the same answer on every process. With JAX's
  preemption service (``jax_enable_preemption_service``, on by default)
  SIGTERM is left to JAX's own notifier, which tells every process, and
  :meth:`reached` is ``multihost_utils.reached_preemption_sync_point``: a
  local check each step, true on every process at the same step, about a
  second after the signal (the step Orbax's
  ``CheckpointManager.reached_preemption`` names too). A SIGINT is passed on
  to that notifier as a SIGTERM. Without the service, :meth:`reached`
  gathers every process's :attr:`requested` every ``sync_interval_steps``
  steps: a collective of about 7 ms on two CPU processes (JAX's check costs
  under a microsecond).

  Examples:
    >>> import os, signal
    >>> from optax_guard.host.preemption import PreemptionHandler
    >>> with PreemptionHandler() as preemption:
    ...   os.kill(os.getpid(), signal.SIGTERM)
    ...   preemption.reached(step=1), preemption.signal_name
    (True, 'SIGTERM')

  Args:
    signals: the signals to catch.
    sync_interval_steps: without JAX's preemption service, gather the
      processes' requests on steps that are multiples of this.
  """

  def __init__(
      self,
      signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
      *,
      sync_interval_steps: int = 1,
  ):
    if not isinstance(sync_interval_steps, int) or sync_interval_steps < 1:
      raise ValueError('sync_interval_steps must be an int >= 1, got'
                       f' {sync_interval_steps!r}.')
    self.signals = tuple(signals)
    self.sync_interval_steps = sync_interval_steps
    self.requested = False
    self.signal_name: Optional[str] = None
    self._previous: dict[int, Any] = {}
    self._jax_notifier = False
    self._answer: tuple[int, bool] = (-1, False)  # (step, reached)

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    _log.warning(
        'Received %s: finishing the current step, saving, then stopping.',
        self.signal_name,
    )
    if self._jax_notifier:  # JAX's notifier tells the other processes.
      signal.raise_signal(signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether to stop after ``step``: the same answer on every process.

    Call it on every process at every loop step, with increasing steps;
    under ``jax.distributed`` a second call for the same step gives the
    first answer (no second collective).

    Args:
      step: the loop step just finished.

    Returns:
      Whether a stop was requested (anywhere, under ``jax.distributed``) and
      this is the step to save and stop at.
    """
    if jax.process_count() == 1:
      return self.requested
    if self._answer[0] == step:
      return self._answer[1]
    if self._jax_notifier:
      reached = multihost_utils.reached_preemption_sync_point(step)
    elif step % self.sync_interval_steps == 0:
      reached = bool(np.any(
          multihost_utils.process_allgather(np.int32(self.requested))))
    else:
      reached = False
    if reached and self.signal_name is None:
      self.signal_name = 'preemption notice'
    self._answer = (step, reached)
    return reached

  def __enter__(self) -> 'PreemptionHandler':
    self._jax_notifier = jax.process_count() > 1 and bool(
        jax.config.values['jax_enable_preemption_service']
    )
    if threading.current_thread() is threading.main_thread():
      for signum in self.signals:
        # Replacing JAX's C++ SIGTERM handler would silence its notifier.
        if not (self._jax_notifier and signum == signal.SIGTERM):
          self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()
