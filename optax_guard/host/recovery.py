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
import optax

from optax_guard.transforms import diagnostics as _diagnostics
from optax_guard.transforms import guard as _guard
from optax_guard.transforms import states as _states
from optax_guard.host import checkpoint as checkpoint_lib

_log = logging.getLogger('optax_guard')

_INJECT_STATES = (
    optax.InjectHyperparamsState,
    optax.InjectStatefulHyperparamsState,
)


@dataclasses.dataclass(frozen=True)
class RecoveryPolicy:
  """When to roll back, and how.

  Attributes:
    max_rollbacks: rollbacks allowed in one run; the next divergence raises
      :class:`TrainingDiverged`.
    loss_factor: also roll back when the loss stays above ``loss_factor``
      times its exponential moving average (``None``: only on the guard's
      ``diverged`` flag).
    loss_patience: how many steps in a row the loss must stay that high.
    loss_ema_decay: decay of the loss EMA (updated with accepted, finite,
      non-alarming losses only, so a blow-up cannot drag it up).
    loss_warmup_steps: accepted steps before the loss check is armed.
    lr_backoff: multiply the learning rate by this at each rollback (``None``
      keeps it). The optimizer must be built with
      :func:`optax.inject_hyperparams` and a constant ``lr_hyperparam``; see
      :func:`scale_hyperparam`.
    lr_hyperparam: the name of the hyperparameter ``lr_backoff`` scales.
    skip_extra_batches: batches to skip after a rollback beyond those drawn
      since the restored checkpoint (PaLM skipped 200 to 500).
  """

  max_rollbacks: int = 3
  loss_factor: Optional[float] = None
  loss_patience: int = 10
  loss_ema_decay: float = 0.99
  loss_warmup_steps: int = 20
  lr_backoff: Optional[float] = None
  lr_hyperparam: str = 'learning_rate'
  skip_extra_batches: int = 0

  def __post_init__(self):
    def count(name, minimum):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or (
          value < minimum
      ):
        raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}.')

    count('max_rollbacks', 0)
    count('loss_patience', 1)
    count('loss_warmup_steps', 0)
    count('skip_extra_batches', 0)
    if self.loss_factor is not None and not self.loss_factor > 1:
      raise ValueError(
          f'loss_factor must be None or > 1, got {self.loss_factor!r}.'
      )
    if not 0 < self.loss_ema_decay < 1:
      raise ValueError(
          f'loss_ema_decay must be in (0, 1), got {self.loss_ema_decay!r}.'
      )
    if self.lr_backoff is not None and not 0 < self.lr_backoff <= 1:
      raise ValueError(
          f'lr_backoff must be None or in (0, 1], got {self.lr_backoff!r}.'
      )


@dataclasses.dataclass
class DivergenceReport:
  """What :class:`TrainingDiverged` reports.

  Attributes:
    step: the loop step of the final divergence.
    reason: why that step counted as diverged.
    rollbacks: every rollback done before, as dicts with ``step``,
      ``to_step``, ``reason``, ``skipped_batches``, ``worst_leaves``.
    worst_leaves: ``(path, gradient norm)`` of the leaves with the largest
      gradient norms at the final divergence (non-finite first), from the
      guard's ``leaf_norms``.
    metrics: that step's scalar metrics.
  """

  step: int
  reason: str
  rollbacks: list[dict[str, Any]]
  worst_leaves: list[tuple[str, float]]
  metrics: dict[str, Any]

  def __str__(self) -> str:
    lines = [f'Training diverged at step {self.step}: {self.reason}.']
    for r in self.rollbacks:
      lines.append(
          f'  rollback at step {r["step"]} to step {r["to_step"]}'
          f' ({r["reason"]}); skipped {r["skipped_batches"]} batches'
      )
    if self.worst_leaves:
      lines.append('  largest gradient norms at the final step:')
      lines.extend(f'    {path}: {norm:.4g}' for path, norm in self.worst_leaves)
    return '\n'.join(lines)


class TrainingDiverged(RuntimeError):
  """Raised after ``max_rollbacks`` rollbacks did not cure a divergence."""

  def __init__(self, report: DivergenceReport):
    super().__init__(str(report))
    self.report = report


def _worst_leaves(state: Any, k: int = 5) -> list[tuple[str, float]]:
  """The ``k`` leaves with the largest last gradient norm, non-finite first
  (:attr:`optax_guard.transforms.diagnostics.Diagnosis.worst`); empty
  without a guard."""
  if not _states.find_states(state.opt_state, _guard.GuardState):
    return []
  return list(_diagnostics.diagnose(state.opt_state, state.params).worst[:k])


def scale_hyperparam(
    opt_state: Any, factor: float, name: str = 'learning_rate'
) -> Any:
  """Multiplies the injected hyperparameter ``name`` by ``factor``.

  Works on every :func:`optax.inject_hyperparams` state anywhere in
  ``opt_state`` (inside :func:`optax_guard.guard`, :func:`optax.chain`, ...).
  A scheduled hyperparameter is recomputed from its schedule at every step,
  so scaling it would have no effect: for a schedule, inject a separate
  constant factor and back that off instead, e.g.
  ``optax.chain(optax.adam(schedule),
  optax.inject_hyperparams(optax.scale)(step_size=1.0))`` with
  ``name='step_size'``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> tx = og.guard(optax.inject_hyperparams(optax.adam)(learning_rate=0.1))
    >>> state = og.scale_hyperparam(tx.init({'w': jnp.ones(2)}), 0.5)
    >>> round(float(state.inner_state.hyperparams['learning_rate']), 6)
    0.05

  Args:
    opt_state: the optimizer state.
    factor: the multiplier.
    name: the hyperparameter's name in ``hyperparams``.

  Returns:
    The state with the hyperparameter scaled (nothing else changed).

  Raises:
    ValueError: if no injected, unscheduled hyperparameter ``name`` exists.
  """
  found = []

  def scale(node):
    if not isinstance(node, _INJECT_STATES) or name not in node.hyperparams:
      return node
    if name in getattr(node, 'hyperparams_states', {}):
      raise ValueError(
          f'Hyperparameter {name!r} follows a schedule, which overwrites it'
          ' every step: back off a separately injected constant instead (see'
          ' optax_guard.scale_hyperparam).'
      )
    found.append(node)
    value = node.hyperparams[name]
    scaled = jnp.asarray(value * factor, dtype=jnp.asarray(value).dtype)
    return node._replace(hyperparams={**node.hyperparams, name: scaled})

  scaled_state = jax.tree.map(
      scale, opt_state, is_leaf=lambda x: isinstance(x, _INJECT_STATES)
  )
  if not found:
    raise ValueError(
        f'No hyperparameter {name!r} injected in the optimizer state: build'
        f' the optimizer with optax.inject_hyperparams (e.g.'
        f' optax.inject_hyperparams(optax.adam)({name}=1e-3)) to back it off.'
    )
  return scaled_state


def _scalar(value: Any) -> Any:
  value = jax.device_get(value)
  return value.item() if hasattr(value, 'item') else value


class Recovery:
  """Watches training and rolls back to the last good checkpoint.

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
        checkpointer.save(state, data_iter=data, healthy=recovery.healthy)

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
    self._ema_count = 0
    self._loss_streak = 0
    self._skip_streak = 0

  @property
  def healthy(self) -> bool:
    """No skipped step and no high loss in a row right now."""
    return self._loss_streak == 0 and self._skip_streak == 0

  @property
  def loss_ema(self) -> Optional[float]:
    """The moving average of accepted losses (``None`` before any)."""
    return self._ema

  def observe(self, step: int, metrics: Mapping[str, Any]) -> Optional[str]:
    """Takes one step's metrics; returns why to roll back, or ``None``.

    Args:
      step: the loop step the metrics belong to.
      metrics: the train step's metrics: ``loss`` and the guard's
        ``skipped``, ``consecutive_skips``, ``diverged`` (missing guard keys
        count as healthy).

    Returns:
      The reason for a rollback, or ``None``.
    """
    loss = float(_scalar(metrics['loss']))
    skipped = bool(_scalar(metrics.get('skipped', False)))
    self._skip_streak = int(_scalar(metrics.get('consecutive_skips', 0)))
    if bool(_scalar(metrics.get('diverged', False))):
      return (
          f'guard diverged at step {step} after {self._skip_streak}'
          ' consecutive skipped steps'
      )
    policy = self.policy
    if policy.loss_factor is None:
      return None
    armed = self._ema_count >= policy.loss_warmup_steps
    high = not math.isfinite(loss) or (
        armed and loss > policy.loss_factor * self._ema
    )
    if high:
      self._loss_streak += 1
    else:
      self._loss_streak = 0
      if not skipped:
        self._ema = loss if self._ema is None else (
            policy.loss_ema_decay * self._ema
            + (1 - policy.loss_ema_decay) * loss
        )
        self._ema_count += 1
    if self._loss_streak >= policy.loss_patience:
      return (
          f'loss {loss:.4g} stayed above {policy.loss_factor:g}x its moving'
          f' average {self._ema:.4g} for {self._loss_streak} steps'
      )
    return None

  def rollback(
      self,
      state: checkpoint_lib.TrainState,
      reason: str,
      *,
      data_iter: Optional[Iterator[Any]] = None,
      metrics: Optional[Mapping[str, Any]] = None,
  ) -> checkpoint_lib.TrainState:
    """Restores the last good checkpoint and skips the batches since.

    The returned state has the restored arrays (learning rate backed off if
    the policy says so) and ``step`` still counting batches drawn: the
    batches from the restored step to ``state.step`` are not replayed.

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
    worst = _worst_leaves(state)
    scalars = {
        k: _scalar(v) for k, v in (metrics or {}).items()
        if jnp.ndim(v) == 0
    }

    def give_up(why: str):
      report = DivergenceReport(
          step=state.step, reason=why, rollbacks=list(self.rollbacks),
          worst_leaves=worst, metrics=scalars,
      )
      _log.error('%s', report)
      return TrainingDiverged(report)

    if len(self.rollbacks) >= self.policy.max_rollbacks:
      raise give_up(
          f'{reason} (after {len(self.rollbacks)} rollbacks, the maximum)'
      )
    restored = None
    if self.checkpointer is not None:
      restored = self.checkpointer.restore_last_good(state)
    if restored is None:
      raise give_up(f'{reason}; no healthy checkpoint to roll back to')
    good, _ = restored
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
    }
    self.rollbacks.append(record)
    self._loss_streak = 0
    self._skip_streak = 0
    _log.warning(
        'Rollback %d/%d at step %d to step %d: %s; skipping batches %d..%d.',
        len(self.rollbacks), self.policy.max_rollbacks, state.step, good.step,
        reason, good.step, step - 1,
    )
    return checkpoint_lib.TrainState(
        step=step, params=good.params, opt_state=opt_state, rng=good.rng
    )

  def state_dict(self) -> dict[str, Any]:
    """The watch state and rollback history, as JSON-serializable data."""
    return {
        'ema': self._ema,
        'ema_count': self._ema_count,
        'loss_streak': self._loss_streak,
        'skip_streak': self._skip_streak,
        'rollbacks': list(self.rollbacks),
    }

  def load_state_dict(self, saved: Mapping[str, Any]) -> None:
    """Restores what :meth:`state_dict` returned (e.g. from a checkpoint)."""
    self._ema = saved['ema']
    self._ema_count = int(saved['ema_count'])
    self._loss_streak = int(saved['loss_streak'])
    self._skip_streak = int(saved['skip_streak'])
    self.rollbacks = [dict(r) for r in saved['rollbacks']]
