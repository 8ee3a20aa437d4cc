"""The items of a step on disk, and the migration from plain Orbax.

One checkpoint is one Orbax step directory; the layout is plain Orbax, so
Orbax alone reads it::

  <directory>/
    <step>/                  an Orbax step directory (no prefix, e.g. ``120``)
      state/                 StandardSave of {'params', 'opt_state', 'rng'?,
                             'model_state'?}
      data_iterator/         JsonSave: {'encoding', 'value'} of the iterator
      events/                JsonSave: the caller's events dict
      integrity/             JsonSave: {'fingerprints': {keypath: uint32},
                             'json': {item: sha256}} (metrics, events, data)
      metrics/               Orbax's metrics: {'healthy': bool, user metrics}
    corrupted/<step>/        steps moved aside (never deleted)
    .writer.lock             the one-writer lock (``filelock``)
    .writer.json             who holds it: {'host', 'pid', 'since', 'released'?}

  # Reading an og checkpoint with plain Orbax:
  with ocp.CheckpointManager(directory) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_tree)))
    params = restored['state']['params']

The items:

* ``state``: params, optimizer state (guard states included) and RNG key,
  written with ``StandardSave`` (async by default, sharded arrays as they are);
* ``data_iterator``: the state of any iterator with ``get_state()`` /
  ``set_state()`` (grain's iterators, e.g. :func:`optax_guard.batches`);
* ``events``: a small JSON dict of guard events (whatever the caller passes;
  :func:`optax_guard.fit` stores its event log and recovery state there);
* ``integrity``: a fingerprint of every array and a SHA-256 digest of the
  metrics, events and iterator state, checked on restore, so that a flipped
  bit is caught even where the storage layer would not notice;
* Orbax's own ``metrics`` item: ``{'healthy': bool}`` plus the metrics given
  to :meth:`Checkpointer.save`; it keeps the newest healthy ("last good")
  checkpoint and the best one by ``best_metric`` alive past ``max_to_keep``.

Migration from plain Orbax: a step written by a ``CheckpointManager`` with
other item names (one ``StandardSave`` item is called ``default``) is read
with ``from_orbax``, which says where the params (and optionally the
optimizer state and RNG key) live, as ``'item'`` or ``'item/key/...'``::

  # Saved with manager.save(step, args=ocp.args.StandardSave(
  #     {'params': params, 'opt_state': opt_state})):
  og.Checkpointer(directory, from_orbax={
      'params': 'default/params', 'opt_state': 'default/opt_state'})

Unmapped fields come from the restore target (e.g. a fresh
``tx.init(params)``); new steps are written in og's layout next to the old.
"""

import base64
import json
from typing import Any, Mapping

import orbax.checkpoint as ocp
from etils import epath

from optax_guard.host.integrity import Damage
from optax_guard.host.integrity import first_line
from optax_guard.host.state import abstract_target
from optax_guard.host.state import cast_like
from optax_guard.host.state import check_tree

STATE = 'state'
DATA = 'data_iterator'
EVENTS = 'events'
INTEGRITY = 'integrity'
OG_ITEMS = frozenset({STATE, DATA, EVENTS, INTEGRITY, 'metrics'})
FIELDS = ('params', 'opt_state', 'rng', 'model_state')


def encode_data_state(data_iter: Any) -> dict[str, Any]:
  if data_iter is None:
    return {'encoding': 'none', 'value': None}
  if not callable(getattr(data_iter, 'get_state', None)):
    raise TypeError(
        f'{type(data_iter).__name__} has no get_state(): a checkpoint needs a'
        ' restorable iterator (a grain iterator, e.g. optax_guard.batches).'
    )
  state = data_iter.get_state()
  if isinstance(state, bytes):  # grain's DataLoader iterators return bytes.
    return {'encoding': 'base64', 'value': base64.b64encode(state).decode()}
  return {'encoding': 'json', 'value': state}


def decode_data_state(saved: Mapping[str, Any]) -> Any:
  if saved['encoding'] == 'base64':
    return base64.b64decode(saved['value'])
  return saved['value']


def check_json(name: str, value: Any) -> None:
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f'{name} must be JSON-serializable for the checkpoint, got {e}.'
    ) from e


def handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Orbax's handlers for the items of an og step."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add(STATE, ocp.args.StandardSave)
  registry.add(STATE, ocp.args.StandardRestore)
  for item in (DATA, EVENTS, INTEGRITY):
    registry.add(item, ocp.args.JsonSave)
    registry.add(item, ocp.args.JsonRestore)
  return registry


def items_on_disk(directory: epath.Path, step: int) -> set[str]:
  """The item directories of ``step``."""
  try:
    return {p.name for p in (directory / str(step)).iterdir() if p.is_dir()}
  except Exception as e:  # pylint: disable=broad-except
    raise Damage(f'unreadable step directory ({first_line(e)})') from e


def read_plain_orbax(directory: epath.Path, step: int,
                     from_orbax: Mapping[str, str], target: Any,
                     items: set[str], cast_dtypes: bool) -> dict[str, Any]:
  """A plain Orbax step: check, then read each ``from_orbax`` location."""
  locations = {field: [k for k in loc.split('/') if k]
               for field, loc in from_orbax.items()}
  missing = sorted({item for item, *_ in locations.values()} - items)
  if missing:
    raise ValueError(
        f'Checkpoint step {step} in {directory} has no item'
        f' {missing} named in from_orbax; its items are {sorted(items)}.'
    )
  targets = {field: getattr(target, field) for field in locations}
  with ocp.PyTreeCheckpointer() as reader:
    saved = {}
    for field, location in locations.items():
      metadata = _orbax_metadata(directory, reader, step, field, location)
      for key, leaf in ocp.tree.to_flat_dict(metadata).items():
        saved[(field, *key)] = leaf
    abstract = abstract_target(targets, check_tree(step, directory, saved, targets, cast_dtypes))
    arrays = {}
    for field, (item, *keys) in locations.items():
      wanted = abstract[field]
      for key in reversed(keys):  # the subtree, where it was saved
        wanted = {key: wanted}
      try:
        restored = reader.restore(
            directory / str(step) / item,
            args=ocp.args.PyTreeRestore(
                item=wanted,
                restore_args=ocp.checkpoint_utils.construct_restore_args(
                    wanted),
                partial_restore=True,
            ),
        )
      except Exception as e:  # pylint: disable=broad-except
        raise Damage(f'cannot be read ({first_line(e)})') from e
      for key in keys:
        restored = restored[key]
      arrays[field] = restored
  return cast_like(arrays, targets)


def _orbax_metadata(directory, reader, step, field, location):
  """The saved leaf metadata at ``location``: ``[item, key, ...]``."""
  item, *keys = location
  try:
    tree = reader.metadata(
        directory / str(step) / item).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except
    raise Damage(
        f'unreadable metadata of {item!r} ({first_line(e)})') from e
  for depth, key in enumerate(keys):
    if not isinstance(tree, Mapping) or key not in tree:
      raise ValueError(
          f'Checkpoint step {step} in {directory}: from_orbax'
          f' {field!r} names {"/".join(location[:depth + 2])}, which is not'
          ' saved (keys there:'
          f' {sorted(tree) if isinstance(tree, Mapping) else tree}).'
      )
    tree = tree[key]
  return tree
