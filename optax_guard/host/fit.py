"""An optional training loop wiring the pieces together, preemption included.

:func:`fit` runs a train step (:func:`optax_guard.make_train_step`) over a
data iterator with a :class:`optax_guard.Checkpointer` (resume, periodic
async saves, a save on preemption), a :class:`optax_guard.Recovery`
(rollback to the last good checkpoint), logging (JSONL and TensorBoard event
files) and a progress bar. Every piece is usable on its own; this is the loop
for users who don't want to write one.
"""

import collections
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np

from optax_guard.host import checkpoint as checkpoint_lib
from optax_guard.host import recovery as recovery_lib

_log = logging.getLogger('optax_guard')

TrainState = checkpoint_lib.TrainState


class PreemptionHandler:
  """Turns SIGTERM / SIGINT into a request to stop after the current step.

  Inside the ``with`` block the first signal only sets :attr:`requested`
  (the loop then saves and stops); a second SIGINT interrupts at once, as
  usual. The previous handlers come back on exit. Outside the main thread,
  where Python cannot install handlers, it does nothing.

  Examples:
    >>> import os, signal
    >>> from optax_guard.host.fit import PreemptionHandler
    >>> with PreemptionHandler() as preemption:
    ...   os.kill(os.getpid(), signal.SIGTERM)
    ...   preemption.requested, preemption.signal_name
    (True, 'SIGTERM')

  Args:
    signals: the signals to catch.
  """

  def __init__(
      self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)
  ):
    self.signals = tuple(signals)
    self.requested = False
    self.signal_name: Optional[str] = None
    self._previous: dict[int, Any] = {}

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

  def __enter__(self) -> 'PreemptionHandler':
    if threading.current_thread() is threading.main_thread():
      for signum in self.signals:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()


class RunLogger:
  """Writes per-step metrics and events as JSONL (and TensorBoard scalars).

  Files in ``log_dir``: ``metrics.jsonl`` (one object per step: ``step``,
  ``time`` and the scalar metrics), ``events.jsonl`` (one object per event:
  skipped steps, rollbacks, preemption) and, with ``tensorboard``, a
  tensorboardX event file. Appends, so a resumed run continues the files
  (steps redone after a crash appear again; the last record of a step wins).

  Args:
    log_dir: the directory, created if needed.
    tensorboard: also write TensorBoard event files (needs tensorboardX).
  """

  def __init__(self, log_dir: str | os.PathLike, *, tensorboard: bool = True):
    os.makedirs(log_dir, exist_ok=True)
    self.log_dir = os.fspath(log_dir)
    self._metrics = open(os.path.join(log_dir, 'metrics.jsonl'), 'a')
    self._events = open(os.path.join(log_dir, 'events.jsonl'), 'a')
    self._writer = None
    if tensorboard:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(
            'TensorBoard logging needs tensorboardX (pip install tensorboardX)'
            ' or pass tensorboard=False.'
        ) from e
      self._writer = tensorboardX.SummaryWriter(self.log_dir)

  def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends one step's scalar metrics."""
    record = {'step': step, 'time': time.time(), **metrics}
    self._metrics.write(json.dumps(record) + '\n')
    if self._writer is not None:
      for name, value in metrics.items():
        self._writer.add_scalar(f'train/{name}', float(value), step)

  def log_event(self, event: Mapping[str, Any]) -> None:
    """Appends one event."""
    self._events.write(json.dumps({'time': time.time(), **event}) + '\n')
    if self._writer is not None:
      self._writer.add_text(
          f'events/{event["kind"]}', json.dumps(event), event['step']
      )

  def flush(self) -> None:
    self._metrics.flush()
    self._events.flush()
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    self._metrics.close()
    self._events.close()
    if self._writer is not None:
      self._writer.close()


class EventLog:
  """Counts of events and the most recent ones, small enough to checkpoint.

  Kinds written by :func:`fit`: ``skipped_step`` (the guard rejected a
  step: ``reason`` is ``nonfinite`` or ``spike``), ``diverged`` (the guard
  raised ``diverged`` and no recovery is configured), ``rollback`` (see
  :meth:`optax_guard.Recovery.rollback`; ``skipped_batches`` counts the
  data window skipped), ``preempted``.

  Args:
    keep: how many recent events to keep.
  """

  def __init__(self, keep: int = 100):
    self.counts: collections.Counter[str] = collections.Counter()
    self.recent: collections.deque[dict[str, Any]] = collections.deque(
        maxlen=keep
    )

  def add(self, kind: str, step: int, **details: Any) -> dict[str, Any]:
    event = {'kind': kind, 'step': step, **details}
    self.counts[kind] += 1
    self.recent.append(event)
    return event

  def state_dict(self) -> dict[str, Any]:
    return {'counts': dict(self.counts), 'recent': list(self.recent)}

  def load_state_dict(self, saved: Mapping[str, Any]) -> None:
    self.counts = collections.Counter(saved['counts'])
    self.recent.clear()
    self.recent.extend(saved['recent'])


class FitResult(NamedTuple):
  """What :func:`fit` returns.

  Attributes:
    state: the final state.
    events: the :class:`EventLog` (counts of skipped steps, rollbacks, ...).
    recovery: the :class:`optax_guard.Recovery` (rollback history, loss EMA).
    preempted: whether a signal stopped the run early (state saved).
  """

  state: TrainState
  events: EventLog
  recovery: recovery_lib.Recovery
  preempted: bool


def _host_scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Scalar metrics as Python numbers (one device-to-host transfer)."""
  fetched = jax.device_get(dict(metrics))
  return {
      name: np.asarray(value).item()
      for name, value in fetched.items()
      if np.ndim(value) == 0
  }


def _committed(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.device_put(x, x.sharding)
      if isinstance(x, jax.Array) and not x.committed else x,
      tree,
  )


def _progress_bar(enabled: bool, total: int, initial: int):
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True)


def fit(
    train_step: Callable[..., tuple[Any, Any, Mapping[str, Any]]],
    state: TrainState,
    data: Iterator[Any],
    *,
    num_steps: int,
    checkpointer: Optional[checkpoint_lib.Checkpointer] = None,
    recovery: Optional[recovery_lib.RecoveryPolicy] = None,
    log_dir: Optional[str | os.PathLike] = None,
    tensorboard: bool = True,
    progress: bool = True,
    handle_preemption: bool = True,
    exit_on_preemption: bool = True,
    callback: Optional[Callable[[TrainState, dict[str, Any]], None]] = None,
) -> FitResult:
  """Trains to step ``num_steps`` (or until the data ends), fault-tolerant.

  Each loop step draws one batch and runs ``train_step(params, opt_state,
  batch) -> (params, opt_state, metrics)``; ``state.step`` counts batches
  drawn, so after a rollback it keeps counting while the optimizer's own
  step count (in ``opt_state``) goes back.

  With a ``checkpointer``: the run first resumes from the newest valid
  checkpoint (data iterator, event log and recovery state included), saves
  the initial state if the directory is empty (a rollback target), saves
  every ``save_interval_steps`` (healthy or not, as :class:`Recovery` says),
  right after a rollback, on preemption and at the end. Killing the process
  at any moment and calling :func:`fit` again gives bitwise the same final
  state as an uninterrupted run (given a deterministic ``train_step`` and a
  restorable ``data`` iterator).

  With ``recovery``: a divergence rolls back to the last good checkpoint,
  skipping the batches drawn since (see :class:`optax_guard.Recovery`).

  On SIGTERM or SIGINT (``handle_preemption``) the current step finishes,
  the state is saved, and the process exits with status 0
  (``exit_on_preemption``; otherwise :func:`fit` returns with
  ``preempted=True``).

  Examples:
    >>> import numpy as np
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> x = np.linspace(-1, 1, 64, dtype=np.float32)
    >>> data = og.batches({'x': x, 'y': 3 * x}, batch_size=16)
    >>> loss_fn = lambda p, b: jnp.mean((p['w'] * b['x'] - b['y']) ** 2)
    >>> tx = og.guard(optax.sgd(0.5))
    >>> params = {'w': jnp.zeros(())}
    >>> init = og.TrainState(0, params, tx.init(params))
    >>> result = og.fit(og.make_train_step(loss_fn, tx), init, data,
    ...                 num_steps=50, progress=False)
    >>> result.state.step, round(float(result.state.params['w']), 3)
    (50, 3.0)

  Args:
    train_step: the jitted step, e.g. from :func:`optax_guard.make_train_step`.
    state: the initial state (also the restore target: structure, shardings).
    data: an iterator of batches; with a ``checkpointer`` it needs
      ``get_state()`` / ``set_state()``.
    num_steps: the total number of loop steps (batches) to reach.
    checkpointer: saves and restores (``None``: nothing on disk).
    recovery: rollback policy (needs a ``checkpointer``).
    log_dir: write ``metrics.jsonl``, ``events.jsonl`` and TensorBoard files.
    tensorboard: with ``log_dir``, also write TensorBoard event files.
    progress: show a tqdm progress bar.
    handle_preemption: catch SIGTERM / SIGINT (see above).
    exit_on_preemption: raise ``SystemExit(0)`` after the preemption save.
    callback: called as ``callback(state, metrics)`` after every step, with
      the scalar metrics as Python numbers. The state's arrays are donated to
      the next step: read them, don't keep them.

  Returns:
    A :class:`FitResult`.

  Raises:
    TrainingDiverged: when ``recovery`` gives up.
    ValueError: for bad arguments (``recovery`` without ``checkpointer``, a
      ``lr_backoff`` with no injected learning rate, ...).
  """
  if not isinstance(num_steps, int) or num_steps < 0:
    raise ValueError(f'num_steps must be an int >= 0, got {num_steps!r}.')
  if recovery is not None and checkpointer is None:
    raise ValueError('recovery needs a checkpointer to roll back to.')
  if recovery is not None and recovery.lr_backoff is not None:
    recovery_lib.scale_hyperparam(state.opt_state, 1.0, recovery.lr_hyperparam)
  policy = recovery or recovery_lib.RecoveryPolicy()
  watch = recovery_lib.Recovery(policy, checkpointer)
  events = EventLog()

  if checkpointer is not None:
    state, saved = checkpointer.restore_or_init(state, data_iter=data)
  # Restored arrays are committed to their devices; committing fresh ones too
  # means the step compiles once, not again after a resume or rollback.
  state = state._replace(
      params=_committed(state.params), opt_state=_committed(state.opt_state),
      rng=_committed(state.rng),
  )
  if checkpointer is not None:
    if saved:
      events.load_state_dict(saved['log'])
      watch.load_state_dict(saved['recovery'])
    elif checkpointer.latest_step() is None:
      checkpointer.save(state, data_iter=data, force=True,
                        events={'log': events.state_dict(),
                                'recovery': watch.state_dict()})

  def save(current: TrainState, *, healthy: bool, force: bool) -> None:
    if checkpointer is not None:
      checkpointer.save(
          current, data_iter=data, healthy=healthy, force=force,
          events={'log': events.state_dict(), 'recovery': watch.state_dict()},
      )

  logger = RunLogger(log_dir, tensorboard=tensorboard) if log_dir else None

  def record(kind: str, step: int, **details: Any) -> None:
    event = events.add(kind, step, **details)
    if logger is not None:
      logger.log_event(event)

  preemption = PreemptionHandler() if handle_preemption else None
  bar = _progress_bar(progress, num_steps, state.step)
  preempted = False
  try:
    if preemption is not None:
      preemption.__enter__()
    while state.step < num_steps:
      try:
        batch = next(data)
      except StopIteration:
        _log.warning('The data ran out at step %d of %d.', state.step,
                     num_steps)
        break
      params, opt_state, metrics = train_step(
          state.params, state.opt_state, batch
      )
      state = state._replace(
          step=state.step + 1, params=params, opt_state=opt_state
      )
      scalars = _host_scalars(metrics)
      if logger is not None:
        logger.log_metrics(state.step, scalars)
      if scalars.get('skipped'):
        record('skipped_step', state.step,
               reason='nonfinite' if scalars.get('nonfinite') else 'spike',
               loss=scalars['loss'], grad_norm=scalars.get('grad_norm'))
      reason = watch.observe(state.step, scalars)
      rolled_back = False
      if reason is not None and recovery is not None:
        state = watch.rollback(state, reason, data_iter=data, metrics=scalars)
        details = dict(watch.rollbacks[-1])
        record('rollback', details.pop('step'), **details)
        rolled_back = True
      elif reason is not None:
        record('diverged', state.step, reason=reason)
      if callback is not None:
        callback(state, scalars)
      stopping = preemption is not None and preemption.requested
      if stopping:
        record('preempted', state.step, signal=preemption.signal_name)
      if rolled_back or stopping or checkpointer is not None and (
          checkpointer.should_save(state.step)
      ):
        # A rolled-back state is the last good one: healthy by definition.
        save(state, healthy=rolled_back or watch.healthy,
             force=rolled_back or stopping)
      if bar is not None:
        bar.update(state.step - bar.n)
        bar.set_postfix(
            loss=f'{scalars["loss"]:.4g}',
            skips=events.counts['skipped_step'],
            rollbacks=len(watch.rollbacks), refresh=False,
        )
      if stopping:
        preempted = True
        break
    if not preempted:
      save(state, healthy=watch.healthy, force=True)
    if checkpointer is not None:
      checkpointer.wait_until_finished()
  finally:
    if preemption is not None:
      preemption.__exit__(None, None, None)
    if bar is not None:
      bar.close()
    if logger is not None:
      logger.close()
  if preempted and exit_on_preemption:
    _log.warning('Saved step %d after %s; exiting.', state.step,
                 preemption.signal_name)
    raise SystemExit(0)
  return FitResult(state, events, watch, preempted)
