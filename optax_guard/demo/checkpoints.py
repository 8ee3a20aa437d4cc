"""The guarded run's checkpoints, on Orbax's ``CheckpointManager``.

A checkpoint holds the train state (params and optimizer state), the data
iterator's state and a JSON record of the run's counters. Checkpoints are
numbered by iteration (steps executed, counting those a rollback discarded),
which only grows, so a rollback never overwrites one. Saves are asynchronous;
Orbax writes each into a temporary directory and renames it when complete, so
a kill mid-save leaves no checkpoint that looks finished. A finished one that
fails to load (a damaged file) is skipped with a warning.
"""

import dataclasses
import os
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy


class Restored(NamedTuple):
  state: Any
  data_state: dict[str, Any]
  meta: dict[str, Any]


@dataclasses.dataclass
class CheckpointInfo:
  """What ``optax-guard inspect`` shows of one checkpoint."""

  iteration: int
  valid: bool
  meta: Optional[dict[str, Any]]
  guard: Optional[dict[str, Any]]
  error: Optional[str] = None
  last_good: bool = False


@dataclasses.dataclass
class _LatestAndLastGood:
  """Keeps the newest ``n`` checkpoints and the newest good one."""

  n: int

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any):
    del context
    keep = [i >= len(checkpoints) - self.n for i in range(len(checkpoints))]
    for i in reversed(range(len(checkpoints))):
      if (checkpoints[i].metrics or {}).get('good'):
        keep[i] = True
        break
    return keep


class Checkpoints:
  """Saves, lists and restores the guarded run's checkpoints."""

  def __init__(self, directory: os.PathLike, *, keep: int = 3,
               read_only: bool = False):
    self.directory = os.fspath(directory)
    self.manager = ocp.CheckpointManager(
        os.path.abspath(self.directory),
        item_names=('state', 'data', 'meta'),
        options=ocp.CheckpointManagerOptions(
            create=not read_only,
            read_only=read_only,
            preservation_policy=preservation_policy.AnyPreservationPolicy(
                [_LatestAndLastGood(keep)]
            ),
        ),
    )

  def save(self, iteration: int, *, state: Any, data_state: dict[str, Any],
           meta: dict[str, Any], guard: dict[str, Any]) -> None:
    self.manager.save(
        iteration,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave({'progress': meta, 'guard': guard}),
        ),
        metrics={'good': float(meta['good'])},
    )

  def _read_meta(self, iteration: int) -> dict[str, Any]:
    return self.manager.restore(
        iteration, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )['meta']

  def restore(self, iteration: int, load: Callable[[Restored], None],
              target: Any) -> Optional[int]:
    """Loads checkpoint ``iteration`` into ``load``; ``None`` if it fails."""
    try:
      restored = self.manager.restore(
          iteration,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target),
              data=ocp.args.JsonRestore(),
              meta=ocp.args.JsonRestore(),
          ),
      )
    except Exception as error:  # pylint: disable=broad-except
      warnings.warn(
          f'checkpoint {iteration} in {self.directory} cannot be restored'
          f' ({type(error).__name__}: {error}); skipping it.'
      )
      return None
    load(Restored(restored['state'], restored['data'],
                  restored['meta']['progress']))
    return iteration

  def restore_latest(self, load: Callable[[Restored], None],
                     target: Any) -> Optional[int]:
    """Loads the newest checkpoint that restores; ``None`` if none does."""
    for iteration in sorted(self.manager.all_steps(), reverse=True):
      if self.restore(iteration, load, target) is not None:
        return iteration
    return None

  def last_good(self) -> Optional[int]:
    """The newest checkpoint saved with no skipped step since the one
    before."""
    self.manager.wait_until_finished()
    for iteration in sorted(self.manager.all_steps(), reverse=True):
      try:
        if self._read_meta(iteration)['progress']['good']:
          return iteration
      except Exception:  # pylint: disable=broad-except
        continue
    return None

  def list(self) -> list[CheckpointInfo]:
    infos = []
    for iteration in sorted(self.manager.all_steps()):
      try:
        meta = self._read_meta(iteration)
        self.manager.item_metadata(iteration)['state']
        infos.append(CheckpointInfo(
            iteration, True, meta['progress'], meta['guard']
        ))
      except Exception as error:  # pylint: disable=broad-except
        infos.append(CheckpointInfo(
            iteration, False, None, None, f'{type(error).__name__}: {error}'
        ))
    return infos

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def inspect(directory: os.PathLike) -> list[CheckpointInfo]:
  """Every checkpoint in ``directory``, oldest first, without writing.

  Raises:
    ValueError: if ``directory`` is missing or holds no checkpoints.
  """
  path = os.fspath(directory)
  if not os.path.isdir(path):
    raise ValueError(f'{path} does not exist or is not a directory.')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    checkpoints = Checkpoints(path, read_only=True)
    infos = checkpoints.list()
  if not infos:
    raise ValueError(
        f'{path} holds no optax-guard checkpoints (expected numbered Orbax'
        ' step directories, e.g. the checkpoints/ of a demo run).'
    )
  good = [i for i in infos if i.valid and i.meta.get('good')]
  if good:
    good[-1].last_good = True
  return infos
