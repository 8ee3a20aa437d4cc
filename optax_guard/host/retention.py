"""Which steps retention may delete: composed Orbax preservation policies.

A step is kept while any policy keeps it (Orbax ``AnyPreservationPolicy``):
the ``max_to_keep`` newest (``LatestN``), the two newest confirmed rollback
targets (:class:`NewestWhere`, the predicate set by
:class:`optax_guard.Recovery`), the newest saved as healthy (``BestN`` on
the ``healthy`` metric) and the best by ``best_metric`` (``BestN``).
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
class NewestWhere:
  """Orbax preservation: keep the ``n`` newest steps where ``predicate`` holds.

  ``predicate`` is set after construction (:meth:`Checkpointer.preserve_newest`)
  and read at each clean-up, so that it can follow training (a checkpoint
  confirmed by the steps after it). Two by default: the rollback target and
  the one before it, so that a damaged target (the save right after a
  rollback is a copy of the previous target) still leaves one to restore.
  """

  predicate: Optional[Callable[[int], bool]] = None
  n: int = 2

  def should_preserve(self, checkpoints, *, context):
    del context  # Unused; part of Orbax's PreservationPolicy protocol.
    keep = [False] * len(checkpoints)
    if self.predicate is None:
      return keep
    newest_first = sorted(range(len(checkpoints)),
                          key=lambda i: checkpoints[i].step, reverse=True)
    kept = [i for i in newest_first if self.predicate(checkpoints[i].step)]
    for i in kept[:self.n]:
      keep[i] = True
    return keep


def manager_options(
    save_interval_steps: int,
    max_to_keep: Optional[int],
    async_save: bool,
    keep_last_good: bool,
    best_rank: Optional[Callable[[Any], Any]],
    read_only: bool,
    newest_where: NewestWhere,
) -> ocp.CheckpointManagerOptions:
  """Orbax options: the interval, and the preservation of kept steps."""
  preservation = ocp.checkpoint_managers.preservation_policy
  policies = [preservation.LatestN(max_to_keep), newest_where]
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
      cleanup_tmp_directories=not read_only,
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
