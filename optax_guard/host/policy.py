"""What recovery does: when to roll back, how to back off, what giving up says.

:class:`RecoveryPolicy` holds the rules :class:`optax_guard.Recovery`
applies, :func:`scale_hyperparam` the learning-rate back-off, and
:class:`TrainingDiverged` with its :class:`DivergenceReport` what the run
ends with when recovery gives up. No state and no files here.
"""

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from optax_guard.transforms import arguments as _arguments
from optax_guard.transforms import diagnostics as _diagnostics

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
      times its exponential moving average for ``loss_patience`` steps
      (``None``: only on the guard's ``diverged`` flag). It catches a
      learning rate too high, whose loss grows for tens of steps before it
      overflows, and which the spike rule alone follows as a series of level
      shifts. Armed by default since issue 12, measured with zero
      rollbacks on the clean runs and on the poisoned-row ramp and the
      level shifts of ``tests/test_slow_faults.py``, and on the fault-free
      parts of the demo, the examples and the fault campaign (their tests);
      on a learning rate 10x too high it rolls back once.
    loss_patience: how many steps in a row the loss must stay that high.
      Every accepted finite loss enters the average, high ones too, so a
      permanent level shift, however large, keeps the loss above
      ``loss_factor`` times the average for at most ``ln(1 - 1 /
      loss_factor) / ln(loss_ema_decay)`` accepted steps (41 at the
      defaults), plus the steps the guard skips before it accepts the shift
      (``shift_after``, 16 at most with the default spike options): the
      default 64 is above both, so a shift is never rolled back (measured:
      at most 44 for targets 20 standard deviations noisier). A blow-up
      growing faster than about 2% per step outruns the average and stays
      above it.
    loss_ema_decay: decay of the loss EMA (updated with every accepted,
      finite loss; skipped and non-finite ones stay out).
    loss_warmup_steps: accepted steps before the loss check is armed.
    lr_backoff: multiply the learning rate by this at each rollback (``None``
      keeps it). The optimizer must be built with
      :func:`optax.inject_hyperparams` and a constant ``lr_hyperparam``; see
      :func:`scale_hyperparam`.
    lr_hyperparam: the name of the hyperparameter ``lr_backoff`` scales.
    skip_extra_batches: batches to skip after a rollback beyond those drawn
      since the restored checkpoint (PaLM skipped 200 to 500).
    confirm_steps: a checkpoint becomes a rollback target only once this
      many healthy steps in a row followed it (its own step included when it
      has one): a save made just before a divergence, or during a slow
      ramp, is never restored. ``0`` trusts the ``healthy`` flag given at
      save time. The checkpointer handed to :class:`Recovery` keeps the
      newest confirmed checkpoint past its ``max_to_keep``; when none is on
      disk (each was removed before it was confirmed: keep ``max_to_keep *
      save_interval_steps`` above ``confirm_steps``), the newest one saved as
      healthy is restored, with a warning.
    healthy_loss_sigma: a step is healthy when the guard skipped it (the
      state did not change; but the skips of a streak that ends in
      ``diverged`` are not) or its loss is finite and at most
      ``healthy_loss_sigma`` standard deviations above the loss's moving
      average (once ``loss_warmup_steps`` losses are in; mean and variance
      are exponential moving averages with ``loss_ema_decay``; the band is
      at least 1% of the mean wide).
    rerun: attribute each step the guard skips (non-finite or spike) by
      running it again on the same inputs (params, optimizer and model
      state, batch): a clean re-run is a transient fault and its result is
      applied (:class:`~optax_guard.host.runlog.TransientFault`); a re-run
      that repeats every metric bit for bit blames the batch
      (:class:`~optax_guard.host.runlog.BadBatch`, recorded in
      ``bad_batches.jsonl`` beside the checkpoints and dropped when a
      restart draws it again); another failure is a
      :class:`~optax_guard.host.runlog.NondeterministicFault`. A step that
      is not skipped runs once; each step copies the small part of the
      state the guard does not hold (its own counters and statistics, the
      model state) so that the re-run starts from the first run's inputs
      (see ``docs/guides/attribution.md``).
  """

  max_rollbacks: int = 3
  loss_factor: Optional[float] = 3.0
  loss_patience: int = 64
  loss_ema_decay: float = 0.99
  loss_warmup_steps: int = 20
  lr_backoff: Optional[float] = None
  lr_hyperparam: str = 'learning_rate'
  skip_extra_batches: int = 0
  confirm_steps: int = 10
  healthy_loss_sigma: float = 3.0
  rerun: bool = False

  def __post_init__(self):
    # TypeError for a wrong type (bool is no count), ValueError out of range.
    for name, minimum in (('max_rollbacks', 0), ('loss_patience', 1),
                          ('loss_warmup_steps', 0), ('skip_extra_batches', 0),
                          ('confirm_steps', 0)):
      _arguments.count(name, getattr(self, name), minimum)
    _arguments.real('healthy_loss_sigma', self.healthy_loss_sigma, low=0)
    _arguments.flag('rerun', self.rerun)
    _arguments.real('loss_factor', self.loss_factor, low=1, allow_none=True)
    _arguments.real('loss_ema_decay', self.loss_ema_decay, low=0, high=1)
    _arguments.real('lr_backoff', self.lr_backoff, low=0, high=1,
                    high_open=False, allow_none=True)
    if not isinstance(self.lr_hyperparam, str) or not self.lr_hyperparam:
      raise TypeError(
          'lr_hyperparam must be the name of an inject_hyperparams'
          f' hyperparameter (a non-empty str), got {self.lr_hyperparam!r}.')


@dataclasses.dataclass
class DivergenceReport:
  """What :class:`TrainingDiverged` reports.

  Attributes:
    step: the loop step of the final divergence.
    reason: why that step counted as diverged.
    rollbacks: every rollback done before, as dicts with ``step``,
      ``to_step``, ``reason``, ``skipped_batches``, ``worst_leaves``,
      ``nonfinite_params``.
    worst_leaves: ``(path, gradient norm)`` of the leaves with the largest
      gradient norms at the final divergence (non-finite first), from the
      guard's ``leaf_norms``.
    metrics: that step's scalar metrics.
    nonfinite_params: the parameter leaves that held a NaN or an Inf at the
      final divergence (:attr:`Diagnosis.nonfinite_params
      <optax_guard.transforms.diagnostics.Diagnosis.nonfinite_params>`).
  """

  step: int
  reason: str
  rollbacks: list[dict[str, Any]]
  worst_leaves: list[tuple[str, float]]
  metrics: dict[str, Any]
  nonfinite_params: list[str] = dataclasses.field(default_factory=list)

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
    if self.nonfinite_params:
      hint = _diagnostics.NONFINITE_PARAMS_HINT
      lines.append(f'  non-finite parameters ({hint}):'
                   f' {", ".join(self.nonfinite_params)}')
    return '\n'.join(lines)


class TrainingDiverged(RuntimeError):
  """Raised after ``max_rollbacks`` rollbacks did not cure a divergence."""

  def __init__(self, report: DivergenceReport):
    super().__init__(str(report))
    self.report = report


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
    ValueError: if ``factor`` is not finite and > 0, or no injected,
      unscheduled hyperparameter ``name`` exists.
  """
  if not 0 < float(factor) < math.inf:
    raise ValueError(
        f'factor must be a finite number > 0, got {factor!r}: a NaN, infinite,'
        ' zero or negative factor would make every later update non-finite or'
        ' reverse it.'
    )
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
