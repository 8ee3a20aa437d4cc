"""An optional training loop wiring the pieces together, preemption included.

:func:`fit` runs a train step (:func:`optax_guard.make_train_step`) over a
data iterator with a :class:`optax_guard.Checkpointer` (resume, periodic
async saves, a save on preemption), a :class:`optax_guard.Recovery`
(rollback to the last good checkpoint), logging (JSONL and TensorBoard event
files) and a progress bar. Every piece is usable on its own; this is the loop
for users who don't want to write one.
"""

import logging
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp

from optax_guard.host import attribution
from optax_guard.host import checkpoint as checkpoint_lib
from optax_guard.host import recovery as recovery_lib
from optax_guard.host import steps
# The preemption handler and the run log live in their own modules; their
# public names stay importable from here.
from optax_guard.host.preemption import PreemptionHandler
from optax_guard.host.runlog import BadBatch
from optax_guard.host.runlog import Diverged
from optax_guard.host.runlog import DroppedBadBatch
from optax_guard.host.runlog import Event
from optax_guard.host.runlog import EventLog
from optax_guard.host.runlog import GaveUp
from optax_guard.host.runlog import NondeterministicFault
from optax_guard.host.runlog import Preempted
from optax_guard.host.runlog import Resumed
from optax_guard.host.runlog import Rollback
from optax_guard.host.runlog import RunLogger
from optax_guard.host.runlog import Saved
from optax_guard.host.runlog import SkippedStep
from optax_guard.host.runlog import Progress
from optax_guard.host.runlog import TransientFault

__all__ = [
    'BadBatch', 'Diverged', 'DroppedBadBatch', 'Event', 'EventLog',
    'FitResult', 'GaveUp', 'NondeterministicFault', 'Preempted',
    'PreemptionHandler', 'Resumed', 'Rollback', 'RunLogger', 'Saved',
    'SkippedStep', 'TransientFault', 'fit',
]

_log = logging.getLogger('optax_guard')

TrainState = checkpoint_lib.TrainState


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


def _committed(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.device_put(x, x.sharding)
      if isinstance(x, jax.Array) and not x.committed else x,
      tree,
  )


class _Loop:
  """The state :func:`fit` threads through its steps, and its side effects.

  Holds the event log, the recovery watch, the logger and the checkpointer,
  so that recording an event, saving and the save after an error each take
  one call.
  """

  def __init__(self, checkpointer, watch, data, logger, rerun=False):
    self.checkpointer = checkpointer
    # With RecoveryPolicy(rerun=True): the record of bad batches.
    self.bad_batches = attribution.BadBatches(
        None if checkpointer is None else checkpointer.directory
    ) if rerun else None
    self.watch = watch
    self.data = data
    self.logger = logger
    self.events = EventLog()
    self.step_events: list[Event] = []
    # The newest completed state: the one fit saves when a step raises after
    # the train step ran (its input buffers were donated to that step).
    self.completed: Optional[TrainState] = None
    # Saves handed to Orbax, announced once committed (announce_committed).
    self.in_flight: list[Saved] = []

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
      self.in_flight.append(Saved(state.step, healthy))
      self.announce_committed()
    return saved

  def announce_committed(self) -> None:
    """Records the :class:`Saved` events of the saves committed since.

    An async save is announced once it is on disk (its step directory has
    its final name), at the first step that finds it so: a kill after the
    announcement resumes from that step or a newer one.
    """
    still = []
    for event in self.in_flight:
      path = self.checkpointer.directory / str(event.step)
      if path.is_dir() and ocp.path.step.is_path_finalized(path):
        self.record(event)
      else:
        still.append(event)
    self.in_flight = still

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


def _check_arguments(train_step, state, *, num_steps, eval_every,
                     checkpointer, recovery) -> None:
  if not isinstance(num_steps, int) or num_steps < 0:
    raise ValueError(f'num_steps must be an int >= 0, got {num_steps!r}.')
  if not isinstance(eval_every, int) or eval_every < 1:
    raise ValueError(f'eval_every must be an int >= 1, got {eval_every!r}.')
  if recovery is not None and checkpointer is None:
    raise ValueError('recovery needs a checkpointer to roll back to.')
  steps.check(train_step, state)
  if recovery is not None and recovery.lr_backoff is not None:
    recovery_lib.scale_hyperparam(state.opt_state, 1.0, recovery.lr_hyperparam)
  if recovery is not None and recovery.rerun and not attribution.has_guard(
      state.opt_state):
    raise ValueError(
        'RecoveryPolicy(rerun=True) re-runs the steps a guard skips, but the'
        ' optimizer state holds no guard: build the optimizer with og.guard'
        ' (or og.skip_nonfinite / og.skip_spikes), or drop rerun=True.')


def _start(state: TrainState, loop: '_Loop', *, log_dir,
           tensorboard: bool) -> TrainState:
  """Resumes (with a checkpointer), commits the arrays, opens the logs."""
  if loop.checkpointer is not None:
    state = _resume(loop.checkpointer, state, loop.data, loop)
  # Restored arrays are committed to their devices; committing fresh ones too
  # means the step compiles once, not again after a resume or rollback.
  state = state._replace(
      params=_committed(state.params), opt_state=_committed(state.opt_state),
      rng=_committed(state.rng), model_state=_committed(state.model_state),
  )
  if log_dir:
    loop.logger = RunLogger(log_dir, tensorboard=tensorboard,
                            start_step=state.step)
    for event in loop.step_events:
      if isinstance(event, Resumed):
        loop.logger.log_event(event)
  return state


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
  batch) -> (params, opt_state, metrics)`` (with ``state.model_state``,
  ``train_step(params, opt_state, model_state, batch) -> (params,
  opt_state, model_state, metrics)``, as built by
  :func:`optax_guard.make_train_step` with ``has_state``; an NNX model goes
  through :func:`optax_guard.nnx_fit_step`); ``state.step`` counts batches
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
  With ``RecoveryPolicy(rerun=True)`` a skipped step runs again on the same
  inputs to tell a flaky machine from a bad batch (see
  :mod:`optax_guard.host.attribution`).

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
      :class:`Saved`, :class:`Preempted`, a first :class:`Resumed`, the
      re-run verdicts such as :class:`TransientFault`, ...).
      ``state`` is the state the loop continues from (after a rollback, the
      restored one). Its arrays are donated to the next step: read them,
      don't keep them.

  Returns:
    A :class:`FitResult`.

  Raises:
    TrainingDiverged: when ``recovery`` gives up.
    ValueError: for bad arguments (``recovery`` without ``checkpointer``, a
      ``lr_backoff`` with no injected learning rate, ...).
    TypeError: for a ``train_step`` whose arguments do not fit ``state``'s
      form (raised before anything is restored, donated or saved), or an
      ``eval_fn`` that returns anything but a mapping of scalars.
  """
  _check_arguments(train_step, state, num_steps=num_steps,
                   eval_every=eval_every, checkpointer=checkpointer,
                   recovery=recovery)
  watch = recovery_lib.Recovery(
      recovery or recovery_lib.RecoveryPolicy(), checkpointer
  )
  loop = _Loop(checkpointer, watch, data, logger=None,
               rerun=recovery is not None and recovery.rerun)
  state = _start(state, loop, log_dir=log_dir, tensorboard=tensorboard)
  preemption: Optional[PreemptionHandler]
  if isinstance(handle_preemption, PreemptionHandler):
    preemption = handle_preemption
  else:
    preemption = PreemptionHandler() if handle_preemption else None
  bar = Progress(num_steps, state.step, progress_every) if progress else None
  try:
    if preemption is not None:
      preemption.__enter__()
    state, preempted = _run_steps(
        train_step, state, loop, num_steps=num_steps, recovery=recovery,
        preemption=preemption, eval_fn=eval_fn, eval_every=eval_every,
        callback=callback, bar=bar,
    )
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


def _run_steps(train_step, state, loop, **options):
  """Runs steps to ``num_steps``; ``(state, preempted)``.

  On any exception the last completed step is saved before it propagates;
  recovery giving up is recorded as a :class:`GaveUp` event first.
  """
  try:
    while state.step < options['num_steps']:
      state, stop = _run_step(train_step, state, loop, **options)
      if stop is not None:
        return state, stop == 'preempted'
  except BaseException as error:
    if isinstance(error, recovery_lib.TrainingDiverged):
      loop.record(GaveUp(error.report.step, error.report.reason))
    loop.save_after_error(loop.completed or state, error)
    raise
  return state, False


def _run_step(train_step, state, loop, *, num_steps, recovery, preemption,
              eval_fn, eval_every, callback, bar):
  """One loop step: train, log, watch, maybe roll back, maybe save.

  Returns:
    ``(state, stop)``: the state to continue from and why to stop now
    (``'preempted'``, ``'data ran out'``) or ``None``.
  """
  loop.completed = None
  try:
    state, batch = attribution.draw(state, loop, num_steps)
  except StopIteration:
    _log.warning('The data ran out at step %d of %d.', state.step, num_steps)
    return state, 'data ran out'
  if batch is None:
    return state, None  # Recorded bad batches were dropped up to the end.
  saved = None
  if loop.bad_batches is not None:
    saved = attribution.snapshot(state)
  state, metrics = steps.run(train_step, state, batch)
  loop.completed = state
  scalars = steps.scalars(metrics)
  if saved is not None and scalars.get('skipped'):
    state, scalars = attribution.attribute(
        train_step, state, batch, saved, metrics, scalars, loop)
    loop.completed = state
  evaluated = {}
  if eval_fn is not None and (
      state.step % eval_every == 0 or state.step == num_steps
  ):
    evaluated = steps.eval_scalars(eval_fn(state))
    scalars.update(evaluated)
  if loop.logger is not None:
    loop.logger.log_metrics(state.step, scalars)
  if scalars.get('skipped'):
    loop.record(_skip_event(state.step, scalars))
  watch = loop.watch
  reason = watch.observe(state.step, scalars)
  rolled_back = reason is not None and recovery is not None
  if rolled_back:
    state = _roll_back(state, loop, reason, scalars)
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
    loop.announce_committed()
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


def _roll_back(state: TrainState, loop: _Loop, reason: str,
               scalars: Mapping[str, Any]) -> TrainState:
  """Rolls back through the recovery watch and records the event."""
  diverged_step = state.step
  state = loop.watch.rollback(state, reason, data_iter=loop.data,
                              metrics=scalars)
  loop.completed = state
  done = loop.watch.rollbacks[-1]
  loop.record(Rollback(
      diverged_step, to_step=done['to_step'], resume_step=state.step,
      reason=reason, skipped_batches=state.step - done['to_step'],
      worst_leaves=tuple(map(tuple, done.get('worst_leaves', ()))),
      nonfinite_params=tuple(done.get('nonfinite_params', ())),
  ))
  return state
