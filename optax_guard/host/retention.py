"""Which steps retention may delete: composed Orbax preservation policies.

A step is kept while any policy keeps it (Orbax ``AnyPreservationPolicy``):
the ``max_to_keep`` newest (``LatestN``), the steps the loop's recovery
named as its rollback targets (:class:`KeptSteps`, set through
:meth:`optax_guard.Checkpointer.keep_steps`), the newest saved as healthy
(``BestN`` on the ``healthy`` metric) and the best by ``best_metric``
(``BestN``). Retention only reads what it was told: it calls nothing back.
"""

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import orbax.checkpoint as ocp


def healthy_rank(metrics: Optional[Mapping[str, Any]]) -> float:
  """Orbax's ``best_fn``: healthy checkpoints rank above the others."""
  return float(bool(metrics and metrics.get('healthy')))


def metric_rank(metrics: Optional[Mapping[str, Any]], *, name: str,
                 sign: float) -> tuple[bool, float]:
  """Orbax ``BestN`` key: steps without a finite ``name`` rank lowest."""
  value = (metrics or {}).get(name)
  if value is None or not math.isfinite(value):
    return (False, 0.0)
  return (True, sign * value)


@dataclasses.dataclass
class KeptSteps:
  """Orbax preservation: keep the steps in ``steps``, however old.

  ``steps`` is replaced as training goes on
  (:meth:`Checkpointer.keep_steps`; :class:`optax_guard.Recovery` names its
  two newest rollback targets there) and read at each clean-up after a
  save. The assignment of a new set is atomic, so a clean-up in Orbax's
  background thread sees the old set or the new one.
  """

  steps: frozenset[int] = frozenset()

  def should_preserve(self, checkpoints, *, context):
    del context  # Unused; part of Orbax's PreservationPolicy protocol.
    kept = self.steps
    return [checkpoint.step in kept for checkpoint in checkpoints]


def manager_options(
    save_interval_steps: int,
    max_to_keep: Optional[int],
    async_save: bool,
    keep_last_good: bool,
    best_rank: Optional[Callable[[Any], Any]],
    read_only: bool,
    kept_steps: KeptSteps,
) -> ocp.CheckpointManagerOptions:
  """Orbax options: the interval, and the preservation of kept steps."""
  preservation = ocp.checkpoint_managers.preservation_policy
  policies = [preservation.LatestN(max_to_keep), kept_steps]
  # BestN sorts stably by step and keeps the last: the newest of equals.
  if keep_last_good:
    policies.append(preservation.BestN(
        get_metric_fn=healthy_rank, n=1, keep_checkpoints_without_metrics=False
    ))
  if best_rank is not None:
    policies.append(preservation.BestN(
        get_metric_fn=best_rank, n=1, keep_checkpoints_without_metrics=False
    ))
  decisions = ocp.checkpoint_managers.save_decision_policy
  return ocp.CheckpointManagerOptions(
      # Orbax's default also saves the first step it sees; here only the
      # interval (and JAX's multi-host preemption sync point) decide.
      save_decision_policy=decisions.AnySavePolicy([
          decisions.FixedIntervalPolicy(save_interval_steps),
          decisions.PreemptionCheckpointingPolicy(),
      ]),
      enable_async_checkpointing=async_save,
      preservation_policy=preservation.AnyPreservationPolicy(policies),
      best_fn=healthy_rank,  # makes Orbax write and load the metrics item.
      best_mode='max',
      # Checkpointer moves unfinished saves aside before Orbax opens; Orbax's
      # own clean-up would delete what it finds, and in a background thread
      # that runs after the constructor returned.
      cleanup_tmp_directories=False,
      read_only=read_only,
  )


def finite_metrics(metrics: Optional[Mapping[str, Any]]) -> dict[str, Any]:
  """Metrics as JSON numbers; a non-finite value is stored as ``None``."""
  record = {}
  for name, value in (metrics or {}).items():
    if not isinstance(name, str) or name == 'healthy':
      raise ValueError(
          f"metric names must be strings other than 'healthy', got {name!r}."
      )
    value = float(value)
    record[name] = value if math.isfinite(value) else None
  return record
