"""``optax-guard inspect``: what is in an :class:`optax_guard.Checkpointer`
directory, read without changing anything.

A step directory holds the Orbax items ``state``, ``data_iterator``,
``events`` and ``integrity`` (see :mod:`optax_guard.checkpoint`), plus
Orbax's ``metrics`` with the ``healthy`` flag. A checkpoint is valid when
its arrays load without a structure to restore into, match the fingerprints
saved with them and hold finite parameters.
"""

import dataclasses
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from optax_guard.host import checkpoint as checkpoint_lib

_JSON_ITEMS = ('data_iterator', 'events', 'integrity')


@dataclasses.dataclass
class CheckpointInfo:
  """One row of ``optax-guard inspect``.

  Attributes:
    step: the checkpoint's step.
    valid: whether a resume may use it.
    healthy: whether it was saved while training was healthy.
    last_good: whether it is the newest valid healthy one (the rollback
      target).
    events: the guard-event record saved with it (``None`` if unreadable).
    data_state: the data iterator's saved state.
    problem: why it is not valid.
  """

  step: int
  valid: bool
  healthy: bool = False
  last_good: bool = False
  events: Optional[dict[str, Any]] = None
  data_state: Optional[Any] = None
  problem: Optional[str] = None

  @property
  def skipped_steps(self) -> Optional[int]:
    counts = (self.events or {}).get('log', {}).get('counts')
    return None if counts is None else counts.get('skipped_step', 0)

  @property
  def rollbacks(self) -> Optional[int]:
    recovery = (self.events or {}).get('recovery')
    return None if recovery is None else len(recovery.get('rollbacks', []))


class _Damaged(Exception):
  """The arrays loaded but are not what was saved."""


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0] if lines else ""}'


def _read_manager(directory: epath.Path) -> ocp.CheckpointManager:
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add('state', ocp.args.StandardRestore)
  for item in _JSON_ITEMS:
    registry.add(item, ocp.args.JsonRestore)
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, lightweight_initialize=True
      ),
      handler_registry=registry,
  )


def _check_arrays(manager: ocp.CheckpointManager, step: int, integrity):
  """Raises :class:`_Damaged` if the arrays are not what was saved."""
  arrays = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )['state']
  expected = (integrity or {}).get('fingerprints')
  if expected is not None:
    # Without the original structure the leaf paths differ, so compare the
    # fingerprints as a multiset: one flipped bit changes one of them.
    actual = checkpoint_lib.fingerprint(arrays)
    if sorted(actual.values()) != sorted(expected.values()):
      raise _Damaged('array fingerprints do not match')
  for leaf in jax.tree.leaves(arrays.get('params', {})):
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.inexact) and not np.isfinite(leaf).all():
      raise _Damaged('non-finite parameter values')


def _describe_step(manager: ocp.CheckpointManager, step: int) -> CheckpointInfo:
  info = CheckpointInfo(step, valid=False)
  try:
    info.healthy = bool((manager.metrics(step) or {}).get('healthy'))
    saved = manager.restore(
        step,
        args=ocp.args.Composite(
            **{item: ocp.args.JsonRestore() for item in _JSON_ITEMS}
        ),
    )
    info.events = saved['events']
    info.data_state = (saved['data_iterator'] or {}).get('value')
    _check_arrays(manager, step, saved['integrity'])
  except _Damaged as error:
    info.problem = str(error)
  except Exception as error:  # pylint: disable=broad-except
    info.problem = f'unreadable ({_first_line(error)})'
  else:
    info.valid = True
  return info


def describe(directory: os.PathLike) -> list[CheckpointInfo]:
  """Every checkpoint in ``directory`` by step, unfinished saves included.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import optax_guard as og
    >>> from optax_guard.demo import checkpoints
    >>> directory = tempfile.mkdtemp()
    >>> state = og.TrainState(5, {'w': jnp.ones(2)}, ())
    >>> with og.Checkpointer(directory) as ckpt:
    ...   ckpt.save(state, force=True)
    True
    >>> [(i.step, i.valid, i.last_good) for i in checkpoints.describe(directory)]
    [(5, True, True)]

  Raises:
    ValueError: if ``directory`` is missing or holds no checkpoints.
  """
  path = epath.Path(directory).absolute()  # Orbax reads absolute paths only.
  if not path.is_dir():
    raise ValueError(f'{directory} does not exist or is not a directory.')
  unfinished = {
      ocp.path.step.step_from_checkpoint_name(name): name
      for name in ocp.path.step.tmp_checkpoints(path)
  }
  # Orbax logs a warning for every read-only manager; nothing is wrong here.
  logging.getLogger('absl').setLevel(logging.ERROR)
  with _read_manager(path) as manager:
    infos = [_describe_step(manager, step) for step in manager.all_steps()]
  infos += [
      CheckpointInfo(
          step, valid=False,
          problem=f'unfinished save ({name}): skipped and removed on resume',
      )
      for step, name in unfinished.items()
  ]
  if not infos:
    raise ValueError(
        f'{directory} holds no optax_guard checkpoints (numbered Orbax step'
        ' directories written by og.Checkpointer, e.g. the checkpoints/ of a'
        ' demo run).'
    )
  infos.sort(key=lambda info: info.step)
  good = [info for info in infos if info.valid and info.healthy]
  if good:
    good[-1].last_good = True
  return infos

