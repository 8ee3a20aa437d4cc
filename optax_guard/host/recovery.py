"""Automatic rollback on divergence: the PaLM recipe, automated.

When training diverges anyway (the guard skipped ``max_consecutive_skips``
steps in a row and raised ``diverged``, or the loss stays above a multiple of
its recent average), PaLM's authors restarted from a checkpoint from before
the spike and skipped the batches that led to it. :class:`Recovery` does that
on the host:

1. :meth:`Recovery.observe` watches each step's metrics and names the reason
   when a rollback is due (and says whether the run is healthy, which decides
   whether a checkpoint counts as "last good");
2. :meth:`Recovery.rollback` restores the newest healthy checkpoint's arrays
   but leaves the data iterator where it is, so the window of batches drawn
   since that checkpoint is skipped; optionally the learning rate is backed
   off; after ``max_rollbacks`` it raises :class:`TrainingDiverged` with a
   :class:`DivergenceReport`.

:func:`optax_guard.fit` drives it; a custom loop can too.

References:
  Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
  <https://arxiv.org/abs/2204.02311>`_, 2022, section 5.1.
"""

import dataclasses
import logging
import math
from typing import Any, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp

from optax_guard.transforms import diagnostics as _diagnostics
from optax_guard.transforms import guard as _guard
from optax_guard.transforms import states as _states
from optax_guard.host import checkpoint as checkpoint_lib
# The policy, the back-off and the report live in host/policy.py; their
# public names stay importable from here.
from optax_guard.host.policy import DivergenceReport
from optax_guard.host.policy import RecoveryPolicy
from optax_guard.host.policy import TrainingDiverged
from optax_guard.host.policy import scale_hyperparam
from optax_guard.host.runlog import _json_safe

__all__ = [
    'DivergenceReport', 'Recovery', 'RecoveryPolicy', 'TrainingDiverged',
    'scale_hyperparam',
]

_log = logging.getLogger('optax_guard')

def _report(state: Any, rollbacks: list[dict[str, Any]],
            metrics: Optional[Mapping[str, Any]]) -> DivergenceReport:
  """The report of a divergence at ``state`` (its ``reason`` set later)."""
  diagnosis = _diagnosis(state)
  return DivergenceReport(
      step=state.step, reason='', rollbacks=list(rollbacks),
      # The ``k = 5`` leaves with the largest last gradient norm.
      worst_leaves=[] if diagnosis is None else list(diagnosis.worst[:5]),
      metrics={k: _scalar(v) for k, v in (metrics or {}).items()
               if jnp.ndim(v) == 0},
      nonfinite_params=([] if diagnosis is None
                        else list(diagnosis.nonfinite_params)),
  )


def _diagnosis(state: Any) -> Optional[_diagnostics.Diagnosis]:
  """:func:`~optax_guard.transforms.diagnostics.diagnose` of ``state``, or
  ``None`` without a guard."""
  if not _states.find_states(state.opt_state, _guard.GuardState):
    return None
  return _diagnostics.diagnose(state.opt_state, state.params)


def _scalar(value: Any) -> Any:
  value = jax.device_get(value)
  return value.item() if hasattr(value, 'item') else value


# The healthy band is at least this fraction of the loss's moving average
# wide, so that an almost noiseless loss (full-batch training) is not out of
# band at its first tiny rise.
_BAND_FLOOR = 0.01

# How many healthy runs the confirmation record keeps (the newest ones); an
# older checkpoint is no rollback target anyway once newer ones are confirmed.
_MAX_RUNS = 256


class Recovery:
  """Watches training and rolls back to the newest confirmed checkpoint.

  A step is *healthy* when the guard did not skip it and its loss is finite
  and within ``healthy_loss_sigma`` standard deviations above the loss's
  moving average. A checkpoint is *confirmed* once ``confirm_steps`` healthy
  steps in a row followed it (its own step healthy too): only a confirmed
  checkpoint is a rollback target, so a state saved just before a divergence
  or during a slow ramp is never restored. A rollback restores the arrays of
  that checkpoint (the guard's statistics of that moment included, as they
  live in the optimizer state) and the loss statistics this watch had then,
  so that clean data afterwards looks as healthy as it did then.

  Examples:
    A custom loop (``step_fn`` from :func:`optax_guard.make_train_step`):

    .. code-block:: python

      recovery = Recovery(og.RecoveryPolicy(lr_backoff=0.5), checkpointer)
      for batch in data:
        params, opt_state, metrics = step_fn(state.params, state.opt_state,
                                             batch)
        state = state._replace(step=state.step + 1, params=params,
                               opt_state=opt_state)
        reason = recovery.observe(state.step, metrics)
        if reason:
          state = recovery.rollback(state, reason, data_iter=data)
        checkpointer.save(state, data_iter=data, healthy=recovery.healthy,
                          events={'recovery': recovery.state_dict()})

  Args:
    policy: when and how to roll back.
    checkpointer: where the last good checkpoint comes from (``None``:
      watch only; :meth:`rollback` then raises).
  """

  def __init__(
      self,
      policy: RecoveryPolicy = RecoveryPolicy(),
      checkpointer: Optional[checkpoint_lib.Checkpointer] = None,
  ):
    self.policy = policy
    self.checkpointer = checkpointer
    self.rollbacks: list[dict[str, Any]] = []
    self._ema: Optional[float] = None
    self._ema_var = 0.0
    self._ema_count = 0
    self._loss_streak = 0
    self._skip_streak = 0
    # Healthy runs as [first step, last step], oldest first.
    self._runs: list[list[int]] = []
    # Steps holding a restored confirmed state (saved right after a rollback).
    self._restored_steps: list[int] = []
    # The report of the divergence that ended the run (DivergenceReport as
    # a dict), or None while recovery has not given up.
    self.gave_up: Optional[dict[str, Any]] = None
    self._keep_targets()

  @property
  def healthy(self) -> bool:
    """No skipped step and no high loss in a row right now."""
    return self._loss_streak == 0 and self._skip_streak == 0

  @property
  def loss_ema(self) -> Optional[float]:
    """The moving average of accepted losses (``None`` before any)."""
    return self._ema

  def _in_band(self, loss: float) -> bool:
    """Whether a finite loss is within the healthy band."""
    if self._ema is None or self._ema_count < self.policy.loss_warmup_steps:
      return True
    width = self.policy.healthy_loss_sigma * math.sqrt(self._ema_var)
    return loss <= self._ema + max(width, _BAND_FLOOR * abs(self._ema))

  def _update_ema(self, loss: float) -> None:
    decay = self.policy.loss_ema_decay
    if self._ema is None:
      self._ema = loss
    else:
      delta = loss - self._ema
      self._ema += (1 - decay) * delta
      self._ema_var = decay * (self._ema_var + (1 - decay) * delta**2)
    self._ema_count += 1

  def _record_health(self, step: int, healthy: bool) -> None:
    if not healthy:
      return
    if self._runs and self._runs[-1][1] == step - 1:
      self._runs[-1][1] = step
      return
    # The previous run ended: keep it only if it confirms some step (a run
    # from step 1 on also confirms the initial state, step 0).
    if self._runs:
      start, end = self._runs[-1]
      if end - (0 if start == 1 else start) < self.policy.confirm_steps:
        self._runs.pop()
    self._runs.append([step, step])
    del self._runs[:-_MAX_RUNS]

  def _end_runs_at(self, last: int) -> None:
    """Cuts every healthy run back to end at step ``last`` at the latest."""
    for run in self._runs:
      run[1] = min(run[1], last)
    self._runs = [run for run in self._runs if run[0] <= run[1]]

  def is_confirmed(self, step: int) -> bool:
    """Whether a checkpoint of ``step`` would be a rollback target now.

    Examples:
      >>> import optax_guard as og
      >>> from optax_guard.host.recovery import Recovery
      >>> recovery = Recovery(og.RecoveryPolicy(confirm_steps=3))
      >>> for step in range(1, 8):
      ...   _ = recovery.observe(step, {'loss': 1.0 if step != 6 else float('nan')})
      >>> [s for s in range(8) if recovery.is_confirmed(s)]
      [0, 1, 2]

    Args:
      step: the loop step the checkpoint was saved at (``0``: the initial
        state, confirmed by the first ``confirm_steps`` steps).

    Returns:
      Whether ``confirm_steps`` healthy steps in a row followed ``step``
      (with ``step`` itself healthy), or ``step`` holds a state restored by
      a rollback.
    """
    if step in self._restored_steps:
      return True
    first = max(step, 1)
    return any(start <= first and end >= step + self.policy.confirm_steps
               for start, end in self._runs)

  def _keep_targets(self) -> None:
    """Tells the checkpointer which steps retention must keep: the two
    newest rollback targets (the save right after a rollback is a copy of
    the previous target; when it is damaged, the one before is restored)."""
    if self.checkpointer is None or self.policy.confirm_steps == 0:
      return
    confirmed = [step for step in reversed(self.checkpointer.all_steps())
                 if self.is_confirmed(step)]
    self.checkpointer.keep_steps(confirmed[:2])

  def observe(self, step: int, metrics: Mapping[str, Any]) -> Optional[str]:
    """Takes one step's metrics; returns why to roll back, or ``None``.

    Each call also names the current rollback targets to the checkpointer
    (:meth:`optax_guard.Checkpointer.keep_steps`), so that retention keeps
    them.

    Args:
      step: the loop step the metrics belong to.
      metrics: the train step's metrics: ``loss`` and the guard's
        ``skipped``, ``consecutive_skips``, ``diverged`` (missing guard keys
        count as healthy).

    Returns:
      The reason for a rollback, or ``None``.
    """
    reason = self._watch(step, metrics)
    self._keep_targets()
    return reason

  def _watch(self, step: int, metrics: Mapping[str, Any]) -> Optional[str]:
    """The health bookkeeping of :meth:`observe`."""
    loss = float(_scalar(metrics['loss']))
    skipped = bool(_scalar(metrics.get('skipped', False)))
    self._skip_streak = int(_scalar(metrics.get('consecutive_skips', 0)))
    finite = math.isfinite(loss)
    # A skipped step left the state as it was: no evidence against it, so
    # it continues a healthy run (isolated skips would otherwise leave no
    # checkpoint confirmed), unless its skip streak ends in a divergence.
    self._record_health(step, skipped or (finite and self._in_band(loss)))
    if bool(_scalar(metrics.get('diverged', False))):
      # The skips that ended here were the divergence, not a pause in a
      # healthy run: they confirm no checkpoint.
      self._end_runs_at(step - self._skip_streak)
      return (
          f'guard diverged at step {step} after {self._skip_streak}'
          ' consecutive skipped steps'
      )
    policy = self.policy
    bound = None
    if (policy.loss_factor is not None and self._ema is not None
        and self._ema_count >= policy.loss_warmup_steps):
      bound = policy.loss_factor * self._ema
    high = not finite or (bound is not None and loss > bound)
    self._loss_streak = self._loss_streak + 1 if high else 0
    average = math.nan if self._ema is None else self._ema
    if finite and not skipped:
      # High losses enter too: a permanent level shift is absorbed within
      # the patience (see RecoveryPolicy.loss_patience); a blow-up is not.
      self._update_ema(loss)
    if policy.loss_factor is not None and (
        self._loss_streak >= policy.loss_patience):
      return (
          f'loss {loss:.4g} stayed above {policy.loss_factor:g}x its moving'
          f' average {average:.4g} for {self._loss_streak} steps'
      )
    return None

  def _restore_target(self, state: checkpoint_lib.TrainState):
    """The newest usable confirmed checkpoint, else the newest healthy one."""
    checkpointer = self.checkpointer
    assert checkpointer is not None  # Recovery.rollback checked it.
    if self.policy.confirm_steps == 0:
      return checkpointer.restore_last_good(state)
    confirmed = [step for step in sorted(checkpointer.all_steps(),
                                         reverse=True)
                 if self.is_confirmed(step)]
    # A damaged target is moved aside with a warning; the next one is tried.
    restored = checkpointer.restore_first_of(confirmed, state)
    if restored is not None:
      return restored
    restored = checkpointer.restore_last_good(state)
    if restored is not None:
      _log.warning(
          'No confirmed checkpoint left in %s; rolling back to step %d, the'
          ' newest one saved as healthy.', checkpointer.directory,
          restored[0].step,
      )
    return restored

  def rollback(
      self,
      state: checkpoint_lib.TrainState,
      reason: str,
      *,
      data_iter: Optional[Iterator[Any]] = None,
      metrics: Optional[Mapping[str, Any]] = None,
  ) -> checkpoint_lib.TrainState:
    """Restores the newest confirmed checkpoint and skips the batches since.

    The returned state has the restored arrays (learning rate backed off if
    the policy says so) and ``step`` still counting batches drawn: the
    batches from the restored step to ``state.step`` are not replayed. The
    loss statistics saved with the checkpoint (``events['recovery']``, as
    :func:`optax_guard.fit` saves them) are restored too; the rollback
    history is kept.

    Args:
      state: the diverged state (its structure is the restore target).
      reason: why (from :meth:`observe`).
      data_iter: if given, ``skip_extra_batches`` more batches are drawn.
      metrics: the diverged step's metrics, for the report.

    Returns:
      The state to continue from.

    Raises:
      TrainingDiverged: after ``max_rollbacks`` rollbacks, or when no
        healthy checkpoint is usable.
    """
    report = _report(state, self.rollbacks, metrics)
    worst, nonfinite_params = report.worst_leaves, report.nonfinite_params

    def give_up(why: str):
      report.reason = why
      _log.error('%s', report)
      # Saved with the next checkpoint: a restart must not resume the
      # diverged state as if training had been healthy.
      self.gave_up = dataclasses.asdict(report)
      return TrainingDiverged(report)

    if len(self.rollbacks) >= self.policy.max_rollbacks:
      raise give_up(
          f'{reason} (after {len(self.rollbacks)} rollbacks, the maximum)'
      )
    restored = None
    if self.checkpointer is not None:
      restored = self._restore_target(state)
    if restored is None:
      raise give_up(f'{reason}; no healthy checkpoint to roll back to')
    good, events = restored
    opt_state = good.opt_state
    if self.policy.lr_backoff is not None:
      opt_state = scale_hyperparam(
          opt_state, self.policy.lr_backoff, self.policy.lr_hyperparam
      )
    step = state.step
    if data_iter is not None:
      for _ in range(self.policy.skip_extra_batches):
        next(data_iter)
        step += 1
    record = {
        'step': state.step,
        'to_step': good.step,
        'reason': reason,
        'skipped_batches': step - good.step,
        'worst_leaves': [[path, norm] for path, norm in worst[:3]],
        'nonfinite_params': nonfinite_params,
    }
    saved = events.get('recovery')
    if saved is not None:
      self._ema = saved['ema']
      self._ema_var = saved.get('ema_var', 0.0)
      self._ema_count = int(saved['ema_count'])
    self.rollbacks.append(record)
    self._restored_steps = (self._restored_steps + [step])[-_MAX_RUNS:]
    self._loss_streak = 0
    self._skip_streak = 0
    _log.warning(
        'Rollback %d/%d at step %d to step %d: %s; skipping batches %d..%d.',
        len(self.rollbacks), self.policy.max_rollbacks, state.step, good.step,
        reason, good.step, step - 1,
    )
    self._keep_targets()
    # Model state (BatchNorm statistics) comes from the same checkpoint.
    return good._replace(step=step, opt_state=opt_state)

  def state_dict(self) -> dict[str, Any]:
    """The watch state and rollback history, as JSON-serializable data."""
    return {
        'ema': self._ema,
        'ema_var': self._ema_var,
        'ema_count': self._ema_count,
        'loss_streak': self._loss_streak,
        'skip_streak': self._skip_streak,
        # Strict JSON, as the logs: a NaN gradient norm of the worst leaf
        # or a NaN loss is saved as "nan".
        'rollbacks': _json_safe(list(self.rollbacks)),
        'runs': [list(run) for run in self._runs],
        'restored_steps': list(self._restored_steps),
        'gave_up': _json_safe(self.gave_up),
    }

  def load_state_dict(self, saved: Mapping[str, Any]) -> None:
    """Restores what :meth:`state_dict` returned (e.g. from a checkpoint).

    State saved before confirmation existed (no ``runs``) confirms nothing
    until new healthy steps do.
    """
    self._ema = saved['ema']
    self._ema_var = float(saved.get('ema_var', 0.0))
    self._ema_count = int(saved['ema_count'])
    self._loss_streak = int(saved['loss_streak'])
    self._skip_streak = int(saved['skip_streak'])
    self.rollbacks = [dict(r) for r in saved['rollbacks']]
    self._runs = [list(run) for run in saved.get('runs', [])]
    self._restored_steps = list(saved.get('restored_steps', []))
    self.gave_up = saved.get('gave_up')
    self._keep_targets()

  def raise_if_gave_up(self) -> None:
    """Raises :class:`TrainingDiverged` again if the saved run gave up.

    A restart of a run that gave up finds the diverged state as its newest
    checkpoint; resuming it would go on from that state as if it were good.

    Raises:
      TrainingDiverged: with the saved report, when recovery gave up.
    """
    if self.gave_up is None:
      return
    saved = dict(self.gave_up)
    saved['reason'] = (
        f'{saved["reason"]}; recovery gave up at step {saved["step"]} before'
        ' this restart, so the run is not resumed (restore an earlier step'
        ' with Checkpointer.restore into a new directory, or start afresh)'
    )
    saved['worst_leaves'] = [(path, float(norm))
                             for path, norm in saved['worst_leaves']]
    raise TrainingDiverged(DivergenceReport(**saved))
