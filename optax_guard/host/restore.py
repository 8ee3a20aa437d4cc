"""Reading a step back: newest first, checked before use, damage set aside.

:class:`Restoring` holds :class:`optax_guard.Checkpointer`'s ``restore*``
methods. A step is read, compared with the target (a different tree is the
user's change: ``ValueError``), checked (:mod:`optax_guard.host.integrity`)
and only then handed over; a damaged one is moved aside and the next tried.
Under ``jax.distributed`` every process agrees on each step's verdict.
"""

from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from optax_guard.host import integrity
from optax_guard.host import layout
from optax_guard.host import retention
from optax_guard.host import state as state_lib
from optax_guard.host.integrity import CorruptCheckpointError
from optax_guard.host.integrity import Damage
from optax_guard.host.integrity import fingerprint
from optax_guard.host.state import TrainState


class Restoring:
  """The restore half of :class:`optax_guard.Checkpointer` (a mixin).

  It reads the attributes the Checkpointer sets: ``_manager``,
  ``_directory``, ``_verify``, ``_cast_dtypes``, ``_from_orbax``,
  ``_best_metric`` and ``_best_rank``, and calls its ``_warn`` and ``_reject``. The queries of
  what is on disk live here too: they are the read side.
  """

  _manager: ocp.CheckpointManager
  _directory: epath.Path
  _verify: bool
  _cast_dtypes: bool
  _from_orbax: dict[str, str]
  _best_metric: Optional[str]
  _best_rank: Any

  # -- Queries ----------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Steps of the finished checkpoints on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest finished checkpoint's step, or ``None``."""
    return self._manager.latest_step()

  def metrics(self, step: int) -> dict[str, Any]:
    """What :meth:`save` recorded for ``step``: ``healthy`` and the metrics
    (``{}`` when unreadable or missing)."""
    try:
      return dict(self._manager.metrics(step) or {})
    except Exception:  # pylint: disable=broad-except
      return {}

  def is_healthy(self, step: int) -> bool:
    """Whether ``step`` was saved with ``healthy=True``."""
    # An unreadable record cannot vouch for the checkpoint.
    return bool(retention.healthy_rank(self.metrics(step)))

  def last_good_step(self) -> Optional[int]:
    """The newest checkpoint saved with ``healthy=True``, or ``None``."""
    good = [s for s in self.all_steps() if self.is_healthy(s)]
    return good[-1] if good else None

  def best_step(self) -> Optional[int]:
    """The step with the best finite ``best_metric`` (the newest of equals),
    or ``None`` (no ``best_metric``, or no step recorded it)."""
    ranked = self._best_first()
    return ranked[0] if ranked else None

  def _best_first(self) -> list[int]:
    if self._best_rank is None:
      return []
    ranks = {step: self._best_rank(self.metrics(step))
             for step in self.all_steps()}
    scored = [step for step, (has_value, _) in ranks.items() if has_value]
    # Stable sort of the newest first: of equal values, the newest wins.
    return sorted(sorted(scored, reverse=True), key=lambda step: ranks[step],
                  reverse=True)


  def restore(
      self, step: int, target: TrainState, *, data_iter: Any = None
  ) -> tuple[TrainState, dict[str, Any]]:
    """Restores ``step`` onto the structure and shardings of ``target``.

    Args:
      step: the step to restore.
      target: a state built the same way as the saved one (e.g. ``params``
        and ``tx.init(params)``), placed on the current mesh: the arrays are
        restored with its shapes, dtypes and shardings and its exact tree
        structure (NamedTuple states included). Only its structure is read.
      data_iter: an iterator whose ``set_state`` receives the saved state.

    Returns:
      ``(state, events)``.

    Raises:
      CorruptCheckpointError: if the checkpoint cannot be used.
      ValueError: if the checkpoint holds a different tree (each difference
        named) or another layout (see ``from_orbax``).
    """
    self._manager.wait_until_finished()
    restored, reason = self._read_agreed(step, target)
    if reason is not None:
      raise CorruptCheckpointError(step, reason)
    return self._set_data_state(step, restored, data_iter)

  def restore_or_init(
      self, init: TrainState, *, data_iter: Any = None
  ) -> tuple[TrainState, dict[str, Any]]:
    """Resumes from the newest valid checkpoint, or returns ``init``.

    A damaged checkpoint is skipped with a :class:`CorruptCheckpointWarning`
    naming its step and the reason, and moved into
    ``<directory>/corrupted/``; the next older one is tried.

    Args:
      init: the fresh state, also the restore target (see :meth:`restore`).
      data_iter: an iterator with ``set_state``, restored in place.

    Returns:
      ``(state, events)``: the restored state and its events dict, or
      ``(init, {})`` when no usable checkpoint exists.

    Raises:
      ValueError: if a checkpoint holds a different tree or layout (before
        anything is moved).
    """
    restored = self._restore_first(
        sorted(self.all_steps(), reverse=True), init, data_iter
    )
    return restored if restored is not None else (init, {})

  def restore_last_good(
      self, target: TrainState, *, data_iter: Any = None
  ) -> Optional[tuple[TrainState, dict[str, Any]]]:
    """Restores the newest valid checkpoint saved with ``healthy=True``.

    Unusable ones are skipped as in :meth:`restore_or_init`. The data
    iterator is left alone unless given, so that a rollback can skip the
    batches drawn since.

    Args:
      target: the restore target (see :meth:`restore`).
      data_iter: optionally, an iterator to restore too.

    Returns:
      ``(state, events)``, or ``None`` when no healthy checkpoint is usable.
    """
    self._manager.wait_until_finished()
    good = [s for s in self.all_steps() if self.is_healthy(s)]
    return self._restore_first(sorted(good, reverse=True), target, data_iter)

  def restore_best(
      self, target: TrainState, *, data_iter: Any = None
  ) -> Optional[tuple[TrainState, dict[str, Any]]]:
    """Restores the checkpoint with the best ``best_metric``.

    A damaged one is skipped (as in :meth:`restore_or_init`) for the next
    best.

    Args:
      target: the restore target (see :meth:`restore`).
      data_iter: optionally, an iterator to restore too.

    Returns:
      ``(state, events)``, or ``None`` when every step that recorded the
      metric is damaged.

    Raises:
      ValueError: when the Checkpointer has no ``best_metric``, or no step
        recorded it (no ``eval_fn`` gave it).
    """
    if self._best_rank is None:
      raise ValueError(
          'restore_best needs best_metric=... at construction (e.g.'
          " best_metric='eval_loss', best_mode='min')."
      )
    self._manager.wait_until_finished()
    ranked = self._best_first()
    if not ranked:
      raise ValueError(
          f'No checkpoint in {self._directory} recorded {self._best_metric!r}'
          ' (best_metric), so there is no best step to restore. og.fit records'
          ' it from eval_fn: pass eval_fn=lambda state: {'
          f'{self._best_metric!r}: ...}}; a hand-written loop passes'
          f' metrics={{{self._best_metric!r}: ...}} to save().')
    return self._restore_first(ranked, target, data_iter)

  def restore_first_of(
      self, steps: list[int], target: TrainState, *, data_iter: Any = None
  ) -> Optional[tuple[TrainState, dict[str, Any]]]:
    """Restores the first usable step of ``steps``, in the order given.

    A damaged one is skipped (as in :meth:`restore_or_init`: warned about
    and moved aside) for the next; :class:`optax_guard.Recovery` walks its
    rollback targets, newest first, this way.

    Args:
      steps: the steps to try, in order.
      target: the restore target (see :meth:`restore`).
      data_iter: optionally, an iterator to restore too.

    Returns:
      ``(state, events)``, or ``None`` when none of ``steps`` is usable.
    """
    return self._restore_first(steps, target, data_iter)

  def _restore_first(self, steps, target, data_iter):
    """The first of ``steps`` that restores; damaged ones are moved aside."""
    self._manager.wait_until_finished()
    for step in steps:
      restored, reason = self._read_agreed(step, target)
      if reason is None:
        return self._set_data_state(step, restored, data_iter)
      self._reject(step, reason)
    return None

  def _read_agreed(self, step, target):
    """``(restored, None)`` or ``(None, reason)``, alike on every process."""
    # Before the read: a damaged file makes Orbax abandon the step's other
    # reads, whose errors can surface before Orbax's own error reaches us.
    integrity.quiet_abandoned_reads()
    try:
      restored, reason = self._read(step, target), None
    except Damage as e:
      restored, reason = None, e.reason
    if jax.process_count() > 1:
      # A read that failed on one process alone (its cache, a flaky mount)
      # must not let the processes resume from different steps.
      failed = multihost_utils.process_allgather(np.int32(reason is not None))
      if np.any(failed) and reason is None:
        restored, reason = None, 'unusable on another process'
    return restored, reason

  def _set_data_state(self, step, restored, data_iter):
    """Hands the saved iterator state to ``data_iter``; ``(state, events)``."""
    state, events, data_state = restored
    if data_iter is not None:
      if data_state is None or data_state.get('encoding') == 'none':
        self._warn(step, 'holds no data-iterator state; iterator left as is',
                   category=UserWarning)
      else:
        data_iter.set_state(layout.decode_data_state(data_state))
    return state, events

  def _read(self, step, target):
    """``(state, events, data_state)`` of ``step``, checked; no effects."""
    items = layout.items_on_disk(self._directory, step)
    if layout.STATE not in items:
      others = sorted(items - layout.OG_ITEMS)
      if not others:
        raise Damage(f'no {layout.STATE!r} item (found {sorted(items)})')
      if not self._from_orbax:
        raise ValueError(
            f'Checkpoint step {step} in {self._directory} was written by plain'
            f' Orbax (items {others}), not by og.Checkpointer; nothing was'
            ' moved. Say where its arrays are, e.g. og.Checkpointer(...,'
            " from_orbax={'params': 'default/params', 'opt_state':"
            " 'default/opt_state'}) for one StandardSave item of a dict."
        )
      arrays = layout.read_plain_orbax(
          self._directory, step, self._from_orbax, target, items,
          self._cast_dtypes)
      saved = {layout.EVENTS: {}, layout.DATA: None}
    else:
      arrays, saved = self._restore_og_items(step, target)
    integrity.check_finite_params(arrays['params'])
    state = state_lib.from_arrays(step, arrays, target)
    return state, dict(saved[layout.EVENTS] or {}), saved[layout.DATA]

  def _restore_og_items(self, step, target):
    """og's layout: check the tree, read, verify, cast."""
    tree = state_lib.state_tree(target)
    try:
      metadata = self._manager.item_metadata(step)[layout.STATE]
      saved = ocp.tree.to_flat_dict(metadata)
    except Exception as e:  # pylint: disable=broad-except
      raise Damage(f'unreadable metadata ({integrity.first_line(e)})') from e
    if not saved:
      raise Damage('no array metadata')
    casts = state_lib.check_tree(step, self._directory, saved, tree,
                                 self._cast_dtypes)
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(**{
              layout.STATE: ocp.args.StandardRestore(state_lib.abstract_target(tree, casts)),
              layout.DATA: ocp.args.JsonRestore(),
              layout.EVENTS: ocp.args.JsonRestore(),
              layout.INTEGRITY: ocp.args.JsonRestore(),
          }),
      )
    except Exception as e:  # pylint: disable=broad-except
      # Any failure to read a checkpoint whose tree matched means its
      # files are damaged: truncated, missing or garbled.
      raise Damage(f'cannot be read ({integrity.first_line(e)})') from e
    arrays = restored[layout.STATE]
    state_lib.check_restored_leaves(arrays, tree, casts)
    record = restored[layout.INTEGRITY] or {}
    expected = record.get('fingerprints')
    if self._verify and expected is not None:
      actual = fingerprint(arrays)  # in the saved dtypes, before any cast
      bad = [path for path in expected if actual.get(path) != expected[path]]
      if bad or set(actual) != set(expected):
        raise Damage(f'fingerprint mismatch in {bad or "the leaf set"}')
    self._check_json_items(step, record, restored)
    return state_lib.cast_like(arrays, tree), restored

  def _check_json_items(self, step, record, restored) -> None:
    """The metrics, events and iterator state match the integrity record.

    Steps saved before the record held them (no ``json`` key) pass.
    """
    if not self._verify or 'json' not in record:
      return
    actual = integrity.json_digests(self.metrics(step), restored[layout.EVENTS],
                           restored[layout.DATA])
    for item, digest in record['json'].items():
      if actual.get(item) != digest:
        raise Damage(f'{item} differ from the integrity record')
