"""An optional training loop wiring the pieces together, preemption included.

:func:`fit` runs a train step (:func:`optax_guard.make_train_step`) over a
data iterator with a :class:`optax_guard.Checkpointer` (resume, periodic
async saves, a save on preemption), a :class:`optax_guard.Recovery`
(rollback to the last good checkpoint), logging (JSONL and TensorBoard event
files) and a progress bar. Every piece is usable on its own; this is the loop
for users who don't want to write one.
"""

import collections
import dataclasses
import json
import math
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, ClassVar, Iterator, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

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
    >>> from optax_guard.host.fit import PreemptionHandler
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


def _json_safe(value: Any) -> Any:
  """``value`` as strict JSON: non-finite floats become ``'nan'``/``'inf'``."""
  if isinstance(value, float) and not math.isfinite(value):
    return 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
  if isinstance(value, Mapping):
    return {key: _json_safe(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(item) for item in value]
  return value


def _json_line(record: Mapping[str, Any]) -> str:
  return json.dumps(_json_safe(record), allow_nan=False) + '\n'


def _truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the records with ``step <= last_step``; drops a torn line.

  The file is replaced atomically, so a kill leaves the old or the new one.
  """
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # A kill mid-write leaves a partial last line.
    if record.get('step', 0) <= last_step:
      kept.append(line if line.endswith('\n') else line + '\n')
  if kept != lines:
    with open(path + '.tmp', 'w') as f:
      f.writelines(kept)
    os.replace(path + '.tmp', path)


class RunLogger:
  """Writes per-step metrics and events as JSON lines (and TensorBoard).

  Files in ``log_dir``: ``metrics.jsonl`` (one object per step: ``step``,
  ``time`` and the scalar metrics), ``events.jsonl`` (one object per
  :class:`Event`) and, with ``tensorboard``, a tensorboardX event file.
  Lines are strict JSON: a non-finite number is written as the string
  ``"nan"``, ``"inf"`` or ``"-inf"`` (``float()`` reads them back).
  TensorBoard receives finite scalars only; a non-finite one is counted as
  ``1`` under ``nonfinite/<name>`` at its step.

  A run that starts (or resumes) at ``start_step`` first cuts both files
  back to the records with ``step <= start_step`` and hides later
  TensorBoard points, so a crash-resume leaves each step once.

  Args:
    log_dir: the directory, created if needed.
    tensorboard: also write TensorBoard event files (needs tensorboardX).
    start_step: the step training continues from.
  """

  def __init__(
      self, log_dir: str | os.PathLike, *, tensorboard: bool = True,
      start_step: int = 0,
  ):
    os.makedirs(log_dir, exist_ok=True)
    self.log_dir = os.fspath(log_dir)
    paths = [os.path.join(self.log_dir, name) for name in
             ('metrics.jsonl', 'events.jsonl')]
    for path in paths:
      _truncate_jsonl(path, start_step)
    self._metrics, self._events = (open(path, 'a') for path in paths)
    self._writer = None
    if tensorboard:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(
            'TensorBoard logging needs tensorboardX (pip install tensorboardX)'
            ' or pass tensorboard=False.'
        ) from e
      self._writer = tensorboardX.SummaryWriter(
          self.log_dir, purge_step=start_step + 1 if start_step else None
      )

  def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends one step's scalar metrics."""
    self._metrics.write(_json_line({'step': step, 'time': time.time(),
                                    **metrics}))
    # On disk before the next step: a killed run keeps what it logged.
    self._metrics.flush()
    if self._writer is not None:
      for name, value in metrics.items():
        if math.isfinite(value):
          self._writer.add_scalar(f'train/{name}', float(value), step)
        else:
          self._writer.add_scalar(f'nonfinite/{name}', 1.0, step)

  def log_event(self, event: 'Event') -> None:
    """Appends one event."""
    record = {'time': time.time(), **event.to_json()}
    self._events.write(_json_line(record))
    self._events.flush()
    if self._writer is not None:
      self._writer.add_text(f'events/{event.kind}', str(event), event.step)

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


@dataclasses.dataclass(frozen=True)
class Event:
  """Something :func:`fit` did or saw at a loop step.

  The subclasses are the kinds :func:`fit` emits; each is passed to the
  ``callback`` of its step and, except :class:`Saved`, written to
  ``events.jsonl`` and counted in the :class:`EventLog` under its ``kind``.

  Attributes:
    step: the loop step (batches drawn) it belongs to.
  """

  kind: ClassVar[str] = 'event'
  step: int

  def to_json(self) -> dict[str, Any]:
    return {'kind': self.kind, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class SkippedStep(Event):
  """The guard rejected the step (``reason``: ``nonfinite`` or ``spike``)."""

  kind: ClassVar[str] = 'skipped_step'
  reason: str
  loss: float
  grad_norm: Optional[float]

  def __str__(self) -> str:
    return f'step {self.step}: skipped ({self.reason}, loss {self.loss:.4g})'


@dataclasses.dataclass(frozen=True)
class Rollback(Event):
  """Step ``step`` diverged; training went back to checkpoint ``to_step``.

  The loop continues at ``resume_step``: the batches drawn at steps
  ``to_step + 1`` to ``resume_step`` (batch indices ``to_step`` to
  ``resume_step - 1``) never count; :attr:`dropped_steps` is that window.
  """

  kind: ClassVar[str] = 'rollback'
  to_step: int
  resume_step: int
  reason: str
  skipped_batches: int = 0
  worst_leaves: tuple[tuple[str, float], ...] = ()
  nonfinite_params: tuple[str, ...] = ()

  @property
  def dropped_steps(self) -> range:
    return range(self.to_step + 1, self.resume_step + 1)

  def __str__(self) -> str:
    # Worded as the recovery's own warning: batch indices, then steps.
    return (
        f'step {self.step}: {self.reason} -> rolled back to step'
        f' {self.to_step}, skipping batches {self.to_step}..'
        f'{self.resume_step - 1} (steps {self.to_step + 1}-{self.resume_step})'
    )


@dataclasses.dataclass(frozen=True)
class Diverged(Event):
  """The guard reported ``diverged`` and no recovery is configured."""

  kind: ClassVar[str] = 'diverged'
  reason: str

  def __str__(self) -> str:
    return f'step {self.step}: diverged ({self.reason})'


@dataclasses.dataclass(frozen=True)
class GaveUp(Event):
  """Recovery gave up (:class:`optax_guard.TrainingDiverged`); ``reason``
  says why. A restart raises it again instead of resuming."""

  kind: ClassVar[str] = 'gave_up'
  reason: str

  def __str__(self) -> str:
    return f'step {self.step}: recovery gave up ({self.reason})'


@dataclasses.dataclass(frozen=True)
class Saved(Event):
  """A checkpoint of ``step`` was written (``healthy``: a rollback target)."""

  kind: ClassVar[str] = 'saved'
  healthy: bool

  def __str__(self) -> str:
    health = 'healthy' if self.healthy else 'not healthy'
    return f'step {self.step}: saved ({health})'


@dataclasses.dataclass(frozen=True)
class Preempted(Event):
  """A signal asked to stop; the state of ``step`` is saved."""

  kind: ClassVar[str] = 'preempted'
  signal: str

  def __str__(self) -> str:
    return f'step {self.step}: {self.signal}, saving and stopping'


@dataclasses.dataclass(frozen=True)
class Resumed(Event):
  """The run continued from the checkpoint of ``step``.

  Attributes:
    counts: the event counts restored with it (``{kind: count}``).
  """

  kind: ClassVar[str] = 'resumed'
  counts: dict[str, int]

  def __str__(self) -> str:
    return f'resumed from the checkpoint of step {self.step}'


class EventLog:
  """Counts of events and the most recent ones, small enough to checkpoint.

  Args:
    keep: how many recent events to keep.
  """

  def __init__(self, keep: int = 100):
    self.counts: collections.Counter[str] = collections.Counter()
    self.recent: collections.deque[dict[str, Any]] = collections.deque(
        maxlen=keep
    )

  def add(self, event: Event) -> Event:
    self.counts[event.kind] += 1
    self.recent.append(event.to_json())
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


class _Progress:
  """A tqdm bar on a terminal; elsewhere a plain line every ``every`` seconds.

  Output to a file or a pipe gets no carriage-return redraws, only lines
  such as ``step 120/600 (20%)  loss 2.31  skips 3  rollbacks 0  42 s``.
  """

  def __init__(self, total: int, initial: int, every: float):
    self._total = total
    self._every = every
    self._started = self._shown = time.monotonic()
    self._bar = None
    if sys.stderr.isatty():
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, unit='step',
                       dynamic_ncols=True)

  def update(self, step: int, loss: float, counts: Mapping[str, int]) -> None:
    skips, rollbacks = counts['skipped_step'], counts['rollback']
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f'{loss:.4g}', skips=skips,
                            rollbacks=rollbacks, refresh=False)
      return
    now = time.monotonic()
    if now - self._shown >= self._every or step == self._total:
      self._shown = now
      print(
          f'step {step}/{self._total} ({100 * step // max(self._total, 1)}%)'
          f'  loss {loss:.4g}  skips {skips}  rollbacks {rollbacks}'
          f'  {now - self._started:.0f} s',
          file=sys.stderr, flush=True,
      )

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class _Loop:
  """The state :func:`fit` threads through its steps, and its side effects.

  Holds the event log, the recovery watch, the logger and the checkpointer,
  so that recording an event, saving and the save after an error each take
  one call.
  """

  def __init__(self, checkpointer, watch, data, logger):
    self.checkpointer = checkpointer
    self.watch = watch
    self.data = data
    self.logger = logger
    self.events = EventLog()
    self.step_events: list[Event] = []
    # The newest completed state: the one fit saves when a step raises after
    # the train step ran (its input buffers were donated to that step).
    self.completed: Optional[TrainState] = None

  def record(self, event: Event) -> None:
    """Passes ``event`` to the callback; logs and counts it unless a save."""
    self.step_events.append(event)
    if isinstance(event, Saved):
      return  # Saves go to the callback only: the logs hold what happened.
    self.events.add(event)
    if self.logger is not None:
      self.logger.log_event(event)

  def take_events(self) -> tuple[Event, ...]:
    events, self.step_events = tuple(self.step_events), []
    return events

  def save(self, state: TrainState, *, healthy: bool, force: bool,
           metrics: Optional[Mapping[str, float]] = None) -> bool:
    if self.checkpointer is None:
      return False
    saved = self.checkpointer.save(
        state, data_iter=self.data, healthy=healthy, force=force,
        events={'log': self.events.state_dict(),
                'recovery': self.watch.state_dict()},
        metrics=metrics,
    )
    if saved:
      self.record(Saved(state.step, healthy))
    return saved

  def save_after_error(self, state: TrainState, error: BaseException) -> None:
    """Saves the last completed step before ``error`` leaves :func:`fit`."""
    what = type(error).__name__
    if self.checkpointer is None:
      _log.warning('%s at step %d; no checkpointer, nothing saved.', what,
                   state.step)
      return
    directory = self.checkpointer.directory
    if isinstance(error, checkpoint_lib.CheckpointSaveError):
      # The directory itself failed: another save would fail the same way.
      _log.error('Saving step %s to %s failed; nothing more saved.',
                 error.step, directory)
      return
    try:
      saved = self.save(state, healthy=self.watch.healthy, force=True)
      self.checkpointer.wait_until_finished()
    except Exception as save_error:  # pylint: disable=broad-except
      # E.g. the failed step had already consumed its donated buffers.
      _log.error('%s at step %d; saving step %d to %s failed too: %s', what,
                 state.step + 1, state.step, directory, save_error)
      return
    _log.warning(
        '%s after step %d; %s step %d in %s (%s); re-raising.', what,
        state.step, 'saved' if saved else 'already on disk:', state.step,
        directory, 'healthy' if self.watch.healthy else 'not healthy',
    )


def _resume(checkpointer, state, data, loop) -> TrainState:
  """Restores the newest valid checkpoint (or saves the initial state)."""
  state, saved = checkpointer.restore_or_init(state, data_iter=data)
  if saved:
    loop.events.load_state_dict(saved['log'])
    loop.watch.load_state_dict(saved['recovery'])
    loop.watch.raise_if_gave_up()
    loop.step_events.append(Resumed(state.step, dict(loop.events.counts)))
  elif checkpointer.latest_step() is None:
    loop.save(state, healthy=True, force=True)
  return state


def _skip_event(step: int, scalars: Mapping[str, Any]) -> SkippedStep:
  return SkippedStep(
      step, reason='nonfinite' if scalars.get('nonfinite') else 'spike',
      loss=scalars['loss'], grad_norm=scalars.get('grad_norm'),
  )


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
    progress_every: float = 10.0,
    handle_preemption: bool | PreemptionHandler = True,
    exit_on_preemption: bool = True,
    eval_fn: Optional[Callable[[TrainState], Mapping[str, Any]]] = None,
    eval_every: int = 100,
    callback: Optional[
        Callable[[TrainState, dict[str, Any], tuple[Event, ...]], None]
    ] = None,
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

  On any exception out of the loop (the data iterator or the step raising,
  ``KeyboardInterrupt``, :class:`TrainingDiverged`), the last completed
  step is saved (``healthy`` as the recovery watch judges it) and a warning
  names the step and the directory before the exception propagates.

  With ``recovery``: a divergence rolls back to the last good checkpoint,
  skipping the batches drawn since (see :class:`optax_guard.Recovery`).

  On SIGTERM or SIGINT (``handle_preemption``) the current step finishes,
  the state is saved, and the process exits with status 0
  (``exit_on_preemption``; otherwise :func:`fit` returns with
  ``preempted=True``). Under ``jax.distributed`` a signal to any one process
  stops every process after the same step (see :class:`PreemptionHandler`).

  Logs (``log_dir``): ``metrics.jsonl`` and ``events.jsonl`` are strict JSON
  lines, a non-finite number written as the string ``"nan"``, ``"inf"`` or
  ``"-inf"``; a run that starts at step ``s`` (fresh or resumed) first cuts
  both back to the records of steps ``<= s``, so every step appears once.
  TensorBoard gets finite scalars under ``train/<name>`` and a ``1`` under
  ``nonfinite/<name>`` for each non-finite one (see :class:`RunLogger`).

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
    progress: show progress on stderr: a tqdm bar on a terminal, otherwise a
      plain line every ``progress_every`` seconds (and at the end).
    progress_every: seconds between two plain progress lines.
    handle_preemption: catch SIGTERM / SIGINT (see above); or a
      :class:`PreemptionHandler` to use, e.g. with another
      ``sync_interval_steps``.
    exit_on_preemption: raise ``SystemExit(0)`` after the preemption save.
    eval_fn: called as ``eval_fn(state)`` every ``eval_every`` steps and at
      ``num_steps``; its scalars join the step's metrics (logged, passed to
      ``callback``) and, when the step is saved, the checkpoint's metrics
      (so that ``Checkpointer(best_metric=...)`` keeps the best one).
    eval_every: steps between two ``eval_fn`` calls (with the
      checkpointer's ``save_interval_steps`` a multiple of it, every
      regularly saved step is evaluated).
    callback: called as ``callback(state, metrics, events)`` after every
      step, with the scalar metrics as Python numbers and the step's
      :class:`Event` records (:class:`SkippedStep`, :class:`Rollback`,
      :class:`Saved`, :class:`Preempted`, a first :class:`Resumed`, ...).
      ``state`` is the state the loop continues from (after a rollback, the
      restored one). Its arrays are donated to the next step: read them,
      don't keep them.

  Returns:
    A :class:`FitResult`.

  Raises:
    TrainingDiverged: when ``recovery`` gives up.
    ValueError: for bad arguments (``recovery`` without ``checkpointer``, a
      ``lr_backoff`` with no injected learning rate, ...).
  """
  if not isinstance(num_steps, int) or num_steps < 0:
    raise ValueError(f'num_steps must be an int >= 0, got {num_steps!r}.')
  if not isinstance(eval_every, int) or eval_every < 1:
    raise ValueError(f'eval_every must be an int >= 1, got {eval_every!r}.')
  if recovery is not None and checkpointer is None:
    raise ValueError('recovery needs a checkpointer to roll back to.')
  if recovery is not None and recovery.lr_backoff is not None:
    recovery_lib.scale_hyperparam(state.opt_state, 1.0, recovery.lr_hyperparam)
  watch = recovery_lib.Recovery(
      recovery or recovery_lib.RecoveryPolicy(), checkpointer
  )
  loop = _Loop(checkpointer, watch, data, logger=None)
  if checkpointer is not None:
    state = _resume(checkpointer, state, data, loop)
  # Restored arrays are committed to their devices; committing fresh ones too
  # means the step compiles once, not again after a resume or rollback.
  state = state._replace(
      params=_committed(state.params), opt_state=_committed(state.opt_state),
      rng=_committed(state.rng),
  )
  if log_dir:
    loop.logger = RunLogger(log_dir, tensorboard=tensorboard,
                            start_step=state.step)
    for event in loop.step_events:
      if isinstance(event, Resumed):
        loop.logger.log_event(event)
  preemption: Optional[PreemptionHandler]
  if isinstance(handle_preemption, PreemptionHandler):
    preemption = handle_preemption
  else:
    preemption = PreemptionHandler() if handle_preemption else None
  bar = _Progress(num_steps, state.step, progress_every) if progress else None
  preempted = False
  try:
    if preemption is not None:
      preemption.__enter__()
    try:
      while state.step < num_steps:
        state, stop = _run_step(
            train_step, state, loop, num_steps=num_steps, recovery=recovery,
            preemption=preemption, eval_fn=eval_fn, eval_every=eval_every,
            callback=callback, bar=bar,
        )
        preempted = stop == 'preempted'
        if stop is not None:
          break
    except BaseException as error:
      if isinstance(error, recovery_lib.TrainingDiverged):
        loop.record(GaveUp(error.report.step, error.report.reason))
      loop.save_after_error(loop.completed or state, error)
      raise
    if not preempted:
      loop.save(state, healthy=watch.healthy, force=True)
    if checkpointer is not None:
      checkpointer.wait_until_finished()
  finally:
    if preemption is not None:
      preemption.__exit__(None, None, None)
    if bar is not None:
      bar.close()
    if loop.logger is not None:
      loop.logger.close()
  if preempted and exit_on_preemption and preemption is not None:
    _log.warning('Saved step %d after %s; exiting.', state.step,
                 preemption.signal_name)
    raise SystemExit(0)
  return FitResult(state, loop.events, watch, preempted)


def _run_step(train_step, state, loop, *, num_steps, recovery, preemption,
              eval_fn, eval_every, callback, bar):
  """One loop step: train, log, watch, maybe roll back, maybe save.

  Returns:
    ``(state, stop)``: the state to continue from and why to stop now
    (``'preempted'``, ``'data ran out'``) or ``None``.
  """
  loop.completed = None
  try:
    batch = next(loop.data)
  except StopIteration:
    _log.warning('The data ran out at step %d of %d.', state.step, num_steps)
    return state, 'data ran out'
  params, opt_state, metrics = train_step(state.params, state.opt_state, batch)
  state = state._replace(step=state.step + 1, params=params,
                         opt_state=opt_state)
  loop.completed = state
  scalars = _host_scalars(metrics)
  evaluated = {}
  if eval_fn is not None and (
      state.step % eval_every == 0 or state.step == num_steps
  ):
    evaluated = _host_scalars(eval_fn(state))
    scalars.update(evaluated)
  if loop.logger is not None:
    loop.logger.log_metrics(state.step, scalars)
  if scalars.get('skipped'):
    loop.record(_skip_event(state.step, scalars))
  watch = loop.watch
  reason = watch.observe(state.step, scalars)
  rolled_back = reason is not None and recovery is not None
  if rolled_back:
    diverged_step = state.step
    state = watch.rollback(state, reason, data_iter=loop.data,
                           metrics=scalars)
    loop.completed = state
    done = watch.rollbacks[-1]
    loop.record(Rollback(
        diverged_step, to_step=done['to_step'], resume_step=state.step,
        reason=reason, skipped_batches=state.step - done['to_step'],
        worst_leaves=tuple(map(tuple, done.get('worst_leaves', ()))),
        nonfinite_params=tuple(done.get('nonfinite_params', ())),
    ))
  elif reason is not None:
    loop.record(Diverged(state.step, reason))
  stopping = preemption is not None and preemption.reached(state.step)
  if stopping:
    loop.record(Preempted(state.step, preemption.signal_name))
  checkpointer = loop.checkpointer
  if rolled_back or stopping or checkpointer is not None and (
      checkpointer.should_save(state.step)
  ):
    # A rolled-back state is the last good one: healthy by definition.
    loop.save(state, healthy=rolled_back or watch.healthy,
              force=rolled_back or stopping,
              metrics=None if rolled_back else evaluated)
  if callback is not None:
    callback(state, scalars, loop.take_events())
    # The callback may itself send the signal (a simulated preemption).
    if not stopping and preemption is not None and preemption.reached(
        state.step):
      loop.record(Preempted(state.step, preemption.signal_name))
      loop.save(state, healthy=watch.healthy, force=True)
      stopping = True
  loop.step_events.clear()
  if bar is not None:
    bar.update(state.step, scalars['loss'], loop.events.counts)
  return state, 'preempted' if stopping else None
