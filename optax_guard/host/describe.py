"""A read-only survey of a checkpoint directory (``optax-guard inspect``).

:func:`describe` opens no writer (no lock, no clean-up) and lists every step
with whether it is valid, healthy and the rollback target, unfinished saves
and steps moved to ``corrupted/`` included. See
:meth:`optax_guard.Checkpointer.describe`.
"""

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from optax_guard.host.integrity import QUARANTINE_DIR
from optax_guard.host.integrity import all_finite
from optax_guard.host.integrity import fingerprint
from optax_guard.host.integrity import first_line
from optax_guard.host.integrity import map_leaves
from optax_guard.host.integrity import quiet_abandoned_reads
from optax_guard.host.layout import DATA
from optax_guard.host.layout import EVENTS
from optax_guard.host.layout import INTEGRITY
from optax_guard.host.layout import STATE
from optax_guard.host.retention import healthy_rank

_JSON_ITEMS = (DATA, EVENTS, INTEGRITY)
# What Orbax logs when a manager opens read-only: true, and asked for.
_READ_ONLY_NOTICES = ('CheckpointManagerOptions.read_only=True, setting ',
                      'Given directory is read only=')


class _ReadOnlyNotices(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_READ_ONLY_NOTICES)


@contextlib.contextmanager
def quiet_read_only() -> Iterator[None]:
  """Silences Orbax's notices that a read-only manager is read-only.

  Only those three messages of the ``absl`` logger, only inside the block;
  every other message passes.

  Examples:
    >>> import tempfile
    >>> import optax_guard as og
    >>> from optax_guard.host.describe import quiet_read_only
    >>> with quiet_read_only():  # No "read_only=True, setting ..." lines.
    ...   og.Checkpointer(tempfile.mkdtemp(), read_only=True).close()
  """
  absl_logger = logging.getLogger('absl')
  notices = _ReadOnlyNotices()
  absl_logger.addFilter(notices)
  try:
    yield
  finally:
    absl_logger.removeFilter(notices)


def _size(where: epath.Path) -> int:
  if not where.is_dir():
    return where.stat().length
  return sum(_size(child) for child in where.iterdir())


def _record(step: int, where: epath.Path, **fields) -> dict[str, Any]:
  return {'step': step, 'valid': False, 'healthy': False, 'last_good': False,
          'data': None, 'events': None, 'bytes': _size(where),
          'problem': None, **fields}


def _check(manager: ocp.CheckpointManager, path: epath.Path,
           step: int) -> dict[str, Any]:
  """The record of one finished step: read, fingerprinted, finite?"""
  found = _record(step, path / str(step))
  quiet_abandoned_reads()  # A damaged file cuts Orbax's other reads short.
  try:
    found['healthy'] = bool(healthy_rank(manager.metrics(step)))
    saved = manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.JsonRestore() for item in _JSON_ITEMS}))
    found['data'] = (saved[DATA] or {}).get('value')
    found['events'] = saved[EVENTS]
    arrays = manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore()}))[STATE]
  except Exception as e:  # pylint: disable=broad-except
    return {**found, 'problem': f'unreadable ({first_line(e)})'}
  expected = (saved[INTEGRITY] or {}).get('fingerprints')
  # Without the training code the leaf paths are unknown: a multiset.
  if expected is not None and sorted(
      fingerprint(arrays).values()) != sorted(expected.values()):
    return {**found, 'problem': 'fingerprint mismatch'}
  params = jax.tree.leaves(arrays.get('params', {}))
  if not all(map_leaves(all_finite, params)):
    return {**found, 'problem': 'non-finite parameter values'}
  return {**found, 'valid': True}


def _finished_steps(path: epath.Path) -> list[dict[str, Any]]:
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add(STATE, ocp.args.StandardRestore)
  for item in _JSON_ITEMS:
    registry.add(item, ocp.args.JsonRestore)
  options = ocp.CheckpointManagerOptions(
      read_only=True, create=False, lightweight_initialize=True,
      save_interval_steps=0,  # What read_only sets, with a warning.
  )
  with quiet_read_only(), ocp.CheckpointManager(
      path, options=options, handler_registry=registry) as manager:
    return [_check(manager, path, step) for step in manager.all_steps()]


def describe(directory: epath.PathLike) -> list[dict[str, Any]]:
  """One record per step in ``directory``, sorted by step; see
  :meth:`optax_guard.Checkpointer.describe`."""
  path = epath.Path(directory).absolute()
  if not path.is_dir():
    raise ValueError(f'{directory} does not exist or is not a directory.')
  records = _finished_steps(path)
  for name in ocp.path.step.tmp_checkpoints(path):
    records.append(_record(
        ocp.path.step.step_from_checkpoint_name(name), path / name,
        problem='unfinished save: moved to corrupted/ when a writer opens'))
  quarantine = path / QUARANTINE_DIR
  for moved in sorted(quarantine.iterdir()) if quarantine.is_dir() else ():
    records.append(_record(
        int(moved.name.split('-')[0]), moved,
        problem=f'quarantined in {QUARANTINE_DIR}/{moved.name}'))
  if not records:
    raise ValueError(
        f'{directory} holds no optax_guard checkpoints (numbered Orbax step'
        ' directories written by og.Checkpointer, e.g. the checkpoints/ of'
        ' a demo run).'
    )
  records.sort(key=lambda r: r['step'])
  good = [r for r in records if r['valid'] and r['healthy']]
  if good:
    good[-1]['last_good'] = True
  return records
