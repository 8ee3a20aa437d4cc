"""Fault-tolerant checkpoints on Orbax: resume from the newest valid one.

:class:`Checkpointer` is a thin layer over
:class:`orbax.checkpoint.CheckpointManager`. One checkpoint is one Orbax step
directory in plain Orbax's layout (see :mod:`optax_guard.host.layout`), so
Orbax alone reads it. The decisions live in small modules:
:mod:`~optax_guard.host.state` (what a state is, how it is compared),
:mod:`~optax_guard.host.integrity` (what is damage, moving a step aside),
:mod:`~optax_guard.host.layout` (items, migration from plain Orbax),
:mod:`~optax_guard.host.lock` (who may write),
:mod:`~optax_guard.host.retention` (what may be deleted) and
:mod:`~optax_guard.host.restore` (reading a step back).

Restoring tries the newest checkpoint first. The saved tree is compared with
the target before anything is read: a different tree (a changed model,
optimizer, shape or dtype) or a step of another layout is the user's change
and raises ``ValueError`` naming each difference; nothing is moved. Only a
step whose tree matches but which cannot be read, fails its fingerprint or
holds non-finite parameters is damaged: it is reported with a
:class:`CorruptCheckpointWarning` naming the step and the reason, moved aside
into ``<directory>/corrupted/`` (never deleted), and the next older one is
tried. ``cast_dtypes=True`` restores a floating-point leaf saved in another
floating dtype (e.g. float32 into bfloat16) by casting after the check.

Migration from plain Orbax: see ``from_orbax`` and :mod:`optax_guard.host.layout`.

One writer per directory: the constructor takes an exclusive file lock
(``filelock``; the kernel drops it when the process dies, even by SIGKILL),
and a second writer, in this process or another, gets
:class:`CheckpointLockedError` naming the holder at once; the lock is
checked again before every save, so deleting its file lets no second writer
in (see :mod:`optax_guard.host.lock`). ``read_only=True``
takes no lock, never writes, moves nothing (evaluation, inspection). Under
``jax.distributed``, process 0 holds the lock for the run and every process
gets the same answer. Remote paths (``gs://``) are not locked.
"""

import atexit
# Imported for its side effect: concurrent.futures registers its exit hook,
# which _close_open_checkpointers must precede (see there).
import concurrent.futures.thread  # pylint: disable=unused-import
import contextlib
import functools
import logging
import threading
from typing import Any, Iterable, Mapping, Optional

import orbax.checkpoint as ocp
from etils import epath

from optax_guard.host import describe as describe_lib
from optax_guard.host import integrity
from optax_guard.host import layout
from optax_guard.host import lock as lock_lib
from optax_guard.host import restore as restore_lib
from optax_guard.host import retention
from optax_guard.host import state as state_lib
from optax_guard.host.integrity import QUARANTINE_DIR
from optax_guard.host.integrity import CorruptCheckpointError
from optax_guard.host.integrity import CorruptCheckpointWarning
from optax_guard.host.integrity import fingerprint
from optax_guard.host.lock import HOLDER_FILE
from optax_guard.host.lock import LOCK_FILE
from optax_guard.host.lock import CheckpointLockedError
from optax_guard.host.lock import CheckpointSaveError
from optax_guard.host.state import TrainState

# The public names of the checkpoint layer, importable from here as before.
__all__ = [
    'HOLDER_FILE', 'LOCK_FILE', 'QUARANTINE_DIR', 'CheckpointLockedError',
    'CheckpointSaveError', 'Checkpointer', 'CorruptCheckpointError',
    'CorruptCheckpointWarning', 'TrainState', 'fingerprint',
]

_log = logging.getLogger('optax_guard')


def _check_positive_int(name: str, value: Any, allow_none: bool = False):
  if allow_none and value is None:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    allowed = 'None or an int >= 1' if allow_none else 'an int >= 1'
    raise ValueError(f'{name} must be {allowed}, got {value!r}.')


def _check_arguments(best_metric, best_mode, from_orbax) -> None:
  if best_metric is not None and (
      not isinstance(best_metric, str) or best_metric in ('', 'healthy')
  ):
    raise ValueError(
        "best_metric must be None or a metric name passed to save(...,"
        f" metrics=...), other than 'healthy'; got {best_metric!r}."
    )
  if best_mode not in ('min', 'max'):
    raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
  if from_orbax is None:
    return
  if (not isinstance(from_orbax, Mapping) or 'params' not in from_orbax
      or not set(from_orbax) <= set(layout.FIELDS)
      or not all(isinstance(v, str) and v.strip('/') for v in
                 from_orbax.values())):
    raise ValueError(
        "from_orbax must map 'params' (and optionally 'opt_state', 'rng',"
        " 'model_state') to"
        " an Orbax item name or 'item/key/...', e.g. {'params':"
        f" 'default/params'}}; got {from_orbax!r}."
    )


# Every Checkpointer not yet closed, held here so that the interpreter's exit
# closes it (see _close_open_checkpointers); close() lets it go.
_OPEN_CHECKPOINTERS: set['Checkpointer'] = set()


def _close_open_checkpointers() -> None:
  """Closes the checkpointers still open as the interpreter exits.

  At exit Python first shuts down its thread pools and joins the threads,
  and only then runs :mod:`atexit` handlers. Orbax's background save needs
  those pools: the pending save of a checkpointer nobody closed (dropped
  with its last reference, or alive at exit) failed ("cannot schedule new
  futures after interpreter shutdown") and the threads waiting for it never
  returned, so about one exit in six hung. A hook of
  ``threading._register_atexit`` (what :mod:`concurrent.futures` uses) runs
  before the pools shut down: the save finishes first.
  """
  for checkpointer in list(_OPEN_CHECKPOINTERS):
    try:
      checkpointer.close()
    except Exception:  # pylint: disable=broad-except
      _log.exception('Closing the checkpointer of %s at exit failed.',
                     checkpointer.directory)


# Hooks run last registered first; concurrent.futures registered its own
# when its thread module was imported above, so this one runs before it.
getattr(threading, '_register_atexit', atexit.register)(
    _close_open_checkpointers)


class Checkpointer(restore_lib.Restoring):
  """Saves and restores training state with Orbax, surviving bad checkpoints.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> tx = og.guard(optax.adam(1e-3))
    >>> params = {'w': jnp.ones(3)}
    >>> init = og.TrainState(step=0, params=params, opt_state=tx.init(params))
    >>> directory = tempfile.mkdtemp()
    >>> with og.Checkpointer(directory, save_interval_steps=10,
    ...                      best_metric='eval_loss') as ckpt:
    ...   state, events = ckpt.restore_or_init(init)  # nothing saved yet
    ...   for step, loss in [(10, 0.5), (20, 0.25), (30, 0.75)]:
    ...     _ = ckpt.save(state._replace(step=step), events={'note': 'hi'},
    ...                   metrics={'eval_loss': loss})
    ...   restored, events = ckpt.restore_or_init(init)
    ...   best, _ = ckpt.restore_best(init)
    >>> restored.step, events, best.step
    (30, {'note': 'hi'}, 20)

  Args:
    directory: where the step directories live (local path or any path Orbax
      supports, e.g. ``gs://``); a relative path is taken from the current
      working directory.
    save_interval_steps: :meth:`save` writes only on multiples of this
      (unless ``force``).
    max_to_keep: how many of the newest checkpoints to keep (``None``: all).
      The newest healthy one and the best one are kept as well, however old.
    async_save: write in a background thread (Orbax ``AsyncCheckpointer``);
      the arrays are copied to host memory before :meth:`save` returns.
    keep_last_good: keep the newest checkpoint saved with ``healthy=True``
      even when ``max_to_keep`` newer ones exist (needed for rollback).
    verify: fingerprint every array on save and check it on restore.
    best_metric: a name in the ``metrics`` given to :meth:`save` (e.g. a
      held-out loss): the step with the best finite value is kept past
      ``max_to_keep`` and restored by :meth:`restore_best` (``None``: none).
    best_mode: ``'min'`` or ``'max'``: which value of ``best_metric`` is best.
    cast_dtypes: restore a floating-point leaf saved in another floating
      dtype by casting it to the target's (e.g. float32 into bfloat16), after
      its fingerprint is checked. ``False``: such a change is a ValueError.
    from_orbax: where a step written by plain Orbax keeps the state: a map of
      ``'params'`` (required), ``'opt_state'``, ``'rng'`` to ``'item'`` or
      ``'item/key/...'`` (see the module docstring). ``None``: such a step
      raises a ValueError that names its items.
    read_only: take no lock, write and move nothing (evaluation, inspection,
      while a training run holds the directory).

  Raises:
    CheckpointLockedError: when another writer holds ``directory``.
  """

  def __init__(
      self,
      directory: epath.PathLike,
      *,
      save_interval_steps: int = 1000,
      max_to_keep: Optional[int] = 3,
      async_save: bool = True,
      keep_last_good: bool = True,
      verify: bool = True,
      best_metric: Optional[str] = None,
      best_mode: str = 'min',
      cast_dtypes: bool = False,
      from_orbax: Optional[Mapping[str, str]] = None,
      read_only: bool = False,
  ):
    _check_positive_int('save_interval_steps', save_interval_steps)
    _check_positive_int('max_to_keep', max_to_keep, allow_none=True)
    _check_arguments(best_metric, best_mode, from_orbax)
    # Orbax refuses relative paths (its OCDBT store needs absolute ones).
    self._directory = epath.Path(directory).absolute()
    self._verify = verify
    self._cast_dtypes = cast_dtypes
    self._from_orbax = dict(from_orbax or {})
    self._read_only = read_only
    self._best_metric = best_metric
    self._best_rank = None if best_metric is None else functools.partial(
        retention.metric_rank, name=best_metric, sign=1.0 if best_mode == 'max' else -1.0
    )
    self._kept_steps = retention.KeptSteps()
    self._registry = layout.handler_registry()
    self._pending_step: Optional[int] = None  # the async save in flight
    self._lock = None if read_only else lock_lib.WriterLock(
        self._directory, is_open_here=self._directory_open_here)
    # Orbax logs three warnings that a read-only manager is read-only.
    quiet = (describe_lib.quiet_read_only() if read_only
             else contextlib.nullcontext())
    try:
      with quiet:
        self._options = retention.manager_options(
            save_interval_steps, max_to_keep, async_save, keep_last_good,
            self._best_rank, read_only, self._kept_steps,
        )
        self._set_unfinished_saves_aside()
        self._manager = self._open_manager()
    except BaseException:
      self._release_lock()
      raise
    _OPEN_CHECKPOINTERS.add(self)

  # -- Opening ----------------------------------------------------------------

  def _set_unfinished_saves_aside(self) -> None:
    """Moves the saves a crash interrupted into ``corrupted/`` with a
    warning, before Orbax (which would delete them) opens the directory."""
    if not self._directory.exists():
      return
    for name in ocp.path.step.tmp_checkpoints(self._directory):
      step = ocp.path.step.step_from_checkpoint_name(name)
      integrity.move_aside(self._directory, step, f'unfinished save ({name})',
                           read_only=self._read_only, name=name)

  def _open_manager(self) -> ocp.CheckpointManager:
    try:
      return ocp.CheckpointManager(
          self._directory, options=self._options,
          handler_registry=self._registry,
      )
    except Exception:  # pylint: disable=broad-except
      # Orbax reads every step's metrics on opening and fails on a garbled
      # one: list the steps without reading, move the bad ones aside, retry.
      pass
    light = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(
            lightweight_initialize=True, read_only=True
        ),
        handler_registry=self._registry,
    )
    with light:
      for step in light.all_steps():
        try:
          light.metrics(step)
        except Exception as e:  # pylint: disable=broad-except
          self._reject(step, f'unreadable metrics ({integrity.first_line(e)})')
    return ocp.CheckpointManager(
        self._directory, options=self._options, handler_registry=self._registry
    )

  # -- Queries ----------------------------------------------------------------

  @property
  def directory(self) -> epath.Path:
    """The checkpoint directory."""
    return self._directory

  @property
  def manager(self) -> ocp.CheckpointManager:
    """The underlying Orbax ``CheckpointManager``."""
    return self._manager

  def keep_steps(self, steps: Iterable[int]) -> None:
    """Keeps ``steps`` at every clean-up after a save, whatever ``max_to_keep``.

    Each call replaces the set. :class:`optax_guard.Recovery` names its two
    newest rollback targets here whenever they change, so that retention
    never deletes the checkpoint a rollback would restore, nor the one
    before it (the target may be damaged: a save during a rollback that
    fails leaves the previous target). The checkpointer only reads the set;
    it calls nothing back.

    Args:
      steps: the steps to keep.
    """
    self._kept_steps.steps = frozenset(int(step) for step in steps)

  def should_save(self, step: int) -> bool:
    """Whether :meth:`save` would write at ``step`` without ``force``."""
    return self._manager.should_save(step)

  # -- Saving -----------------------------------------------------------------

  def save(
      self,
      state: TrainState,
      *,
      data_iter: Any = None,
      events: Optional[Mapping[str, Any]] = None,
      healthy: bool = True,
      force: bool = False,
      metrics: Optional[Mapping[str, float]] = None,
  ) -> bool:
    """Saves ``state`` (async by default) if the interval says so.

    Args:
      state: the step and arrays to save.
      data_iter: an iterator with ``get_state()``; its state is saved with
        the arrays so that a resume draws the same batches.
      events: a small JSON-serializable dict saved with the checkpoint.
      healthy: whether training was healthy when this was written; the
        newest healthy checkpoint is kept for :meth:`restore_last_good`.
      force: save even off the interval.
      metrics: numbers recorded with the step (Orbax's metrics item), e.g.
        ``{'eval_loss': 0.31}``; ``best_metric`` ranks by one of them. A
        non-finite value is stored as ``None`` and never ranks best.

    Returns:
      Whether a checkpoint was written (``False`` off the interval or when
      this step is already saved).

    Raises:
      ValueError: when opened with ``read_only=True``.
      TypeError: when ``events`` or the iterator state is not JSON (nothing
        is written).
    """
    if self._read_only:
      raise ValueError(
          f'This Checkpointer of {self._directory} was opened with'
          ' read_only=True and cannot save; open one without it to train.'
      )
    record = {'healthy': bool(healthy), **retention.finite_metrics(metrics)}
    step = int(state.step)
    if step in self._manager.all_steps():
      return False
    if not force and not self._manager.should_save(step):
      return False
    tree = state_lib.state_tree(state)
    data_state = layout.encode_data_state(data_iter)
    events = dict(events or {})
    # Orbax would fail in its background thread, after the arrays are
    # written; failing here leaves nothing half-written.
    layout.check_json('events', events)
    layout.check_json('the data iterator state', data_state)
    digests = {
        'fingerprints': fingerprint(tree) if self._verify else None,
        'json': integrity.json_digests(record, events, data_state),
    }
    # The previous async save first, so that its failure names its step.
    self.wait_until_finished()
    if self._lock is not None:
      self._lock.check()  # Orbax deletes old steps after the save.
    lock_lib.check_writable(self._directory, step)
    self._pending_step = step
    try:
      return self._manager.save(
          step,
          args=ocp.args.Composite(**{
              layout.STATE: ocp.args.StandardSave(tree),
              layout.DATA: ocp.args.JsonSave(data_state),
              layout.EVENTS: ocp.args.JsonSave(events),
              layout.INTEGRITY: ocp.args.JsonSave(digests),
          }),
          metrics=record,
          force=True,
      )
    except Exception as e:  # pylint: disable=broad-except
      self._pending_step = None
      raise CheckpointSaveError(step, self._directory, e) from e

  def wait_until_finished(self) -> None:
    """Blocks until the pending async save, if any, is on disk.

    Raises:
      CheckpointSaveError: when that save failed (naming its step).
    """
    step, self._pending_step = self._pending_step, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(step, self._directory, e) from e

  def close(self) -> None:
    """Waits for pending saves, releases Orbax's resources and the lock.

    A checkpointer holds its directory (and its pending save) until this
    is called, or until the interpreter exits, which closes every
    checkpointer left open before Python stops the threads Orbax saves with.
    """
    if self not in _OPEN_CHECKPOINTERS:
      return  # Closed already.
    _OPEN_CHECKPOINTERS.discard(self)
    try:
      self._manager.close()
    finally:
      self._release_lock()

  def _release_lock(self) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None

  def _directory_open_here(self) -> bool:
    """Whether another writer of this process holds this directory."""
    return any(other._directory == self._directory and not other._read_only
               for other in _OPEN_CHECKPOINTERS if other is not self)

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()



  # -- Rejecting --------------------------------------------------------------

  def _warn(self, step: int, reason: str,
            category: type[Warning] = CorruptCheckpointWarning) -> None:
    integrity.warn(self._directory, step, reason, category)

  def _reject(self, step: int, reason: str) -> None:
    """Warns and moves ``step`` out of Orbax's view, deleting nothing."""
    integrity.move_aside(self._directory, step, reason,
                         read_only=self._read_only)
    if hasattr(self, '_manager'):
      self._manager.reload()


  # -- Describing (read-only) -------------------------------------------------

  @staticmethod
  def describe(directory: epath.PathLike) -> list[dict[str, Any]]:
    """One record per step in ``directory``, read without changing anything.

    Opens no writer (no lock, no clean-up): unfinished saves and steps moved
    to ``corrupted/`` are listed too. A step is ``valid`` when its arrays
    load, match the fingerprints saved with them (compared as a multiset:
    without the training code the leaf paths are unknown) and hold finite
    parameters.

    Examples:
      >>> import tempfile
      >>> import jax.numpy as jnp
      >>> import optax_guard as og
      >>> directory = tempfile.mkdtemp()
      >>> with og.Checkpointer(directory) as ckpt:
      ...   ckpt.save(og.TrainState(5, {'w': jnp.ones(2)}, ()), force=True)
      True
      >>> [(r['step'], r['valid'], r['last_good'])
      ...  for r in og.Checkpointer.describe(directory)]
      [(5, True, True)]

    Args:
      directory: a checkpoint directory.

    Returns:
      Records sorted by step, with keys ``step``, ``valid``, ``healthy``,
      ``last_good`` (the newest valid healthy step: the rollback target),
      ``data`` (the data iterator's saved state), ``events`` (what was saved
      with it, e.g. :func:`optax_guard.fit`'s event counts), ``bytes`` (on
      disk) and ``problem`` (why it is not valid, or ``None``).

    Raises:
      ValueError: if ``directory`` is missing or holds no checkpoints.
    """
    return describe_lib.describe(directory)
