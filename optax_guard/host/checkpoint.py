"""Fault-tolerant checkpoints on Orbax: resume from the newest valid one.

:class:`Checkpointer` is a thin layer over
:class:`orbax.checkpoint.CheckpointManager`. One checkpoint is one Orbax step
directory; the layout is plain Orbax, so Orbax alone reads it::

  <directory>/
    <step>/                  an Orbax step directory (no prefix, e.g. ``120``)
      state/                 StandardSave of {'params', 'opt_state', 'rng'?}
      data_iterator/         JsonSave: {'encoding', 'value'} of the iterator
      events/                JsonSave: the caller's events dict
      integrity/             JsonSave: {'fingerprints': {keypath: uint32}}
      metrics/               Orbax's metrics: {'healthy': bool, user metrics}
    corrupted/<step>/        steps moved aside (never deleted)
    .writer.lock             the one-writer lock (``filelock``)
    .writer.json             who holds it: {'host', 'pid', 'since'}

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
* ``integrity``: a fingerprint of every array, checked on restore, so that a
  flipped bit is caught even where the storage layer would not notice;
* Orbax's own ``metrics`` item: ``{'healthy': bool}`` plus the metrics given
  to :meth:`Checkpointer.save`; it keeps the newest healthy ("last good")
  checkpoint and the best one by ``best_metric`` alive past ``max_to_keep``.

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
import base64
import concurrent.futures.thread  # pylint: disable=unused-import
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import threading
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from optax_guard.host import lock as lock_lib
from optax_guard.host.lock import CheckpointLockedError  # re-exported
from optax_guard.host.lock import HOLDER_FILE  # re-exported
from optax_guard.host.lock import LOCK_FILE  # re-exported

_log = logging.getLogger('optax_guard')

_STATE = 'state'
_DATA = 'data_iterator'
_EVENTS = 'events'
_INTEGRITY = 'integrity'
_OG_ITEMS = frozenset({_STATE, _DATA, _EVENTS, _INTEGRITY, 'metrics'})
_FIELDS = ('params', 'opt_state', 'rng')
QUARANTINE_DIR = 'corrupted'


class TrainState(NamedTuple):
  """What one checkpoint restores: the step and the arrays of training.

  Attributes:
    step: loop steps done so far (batches drawn from the data iterator).
    params: the parameters (any pytree of arrays, sharded or not).
    opt_state: the optimizer state, e.g. ``tx.init(params)``.
    rng: an optional PRNG key (typed or raw), saved and restored with the rest.
  """

  step: int
  params: Any
  opt_state: Any
  rng: Optional[jax.Array] = None


class CorruptCheckpointWarning(RuntimeWarning):
  """A checkpoint was skipped because it is unfinished, unreadable or wrong."""


class CorruptCheckpointError(RuntimeError):
  """The checkpoint asked for cannot be used; the message says why."""

  def __init__(self, step: int, reason: str):
    super().__init__(f'checkpoint step {step} is unusable: {reason}')
    self.step = step
    self.reason = reason


def _as_bits(x: jax.Array) -> jax.Array:
  """The bit pattern of ``x`` as uint32 values (one or more per element)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.iscomplexobj(x):
    x = jnp.stack([x.real, x.imag], axis=-1)
  itemsize = x.dtype.itemsize
  if itemsize >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  narrow = {1: jnp.uint8, 2: jnp.uint16}[itemsize]
  return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """Position-weighted wrapping sum of the bits: any flipped bit changes it.

  Integer sums are exact and associative, so the value does not depend on
  how the array is sharded: a checkpoint saved on 8 devices verifies on 4.
  """
  bits = _as_bits(jnp.asarray(x))
  index = jnp.zeros(bits.shape, jnp.uint32)
  for dim in range(bits.ndim):
    index = index * jnp.uint32(bits.shape[dim]) + jax.lax.broadcasted_iota(
        jnp.uint32, bits.shape, dim
    )
  # Odd weights are invertible mod 2**32: a change in one element always
  # changes the sum, and swapped elements usually do.
  return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


def _map_leaves(fn: Callable[[jax.Array], jax.Array], leaves: list[Any]):
  """``[fn(x) for x in leaves]`` on the host, one jitted call per device set.

  The leaves of one state may live on different devices (a scalar committed
  to one device next to arrays sharded over a mesh), which one jitted call
  cannot take; grouping keeps the number of calls (and compilations) small.
  """
  groups: dict[Any, list[int]] = {}
  for i, x in enumerate(leaves):
    sharding = getattr(x, 'sharding', None)
    devices = None if sharding is None else frozenset(sharding.device_set)
    groups.setdefault(devices, []).append(i)
  results: list[Any] = [None] * len(leaves)
  for indices in groups.values():
    outputs = _jitted_map(fn, [leaves[i] for i in indices])
    for i, value in zip(indices, jax.device_get(outputs)):
      results[i] = value
  return results


@functools.partial(jax.jit, static_argnums=0)
def _jitted_map(fn, leaves):
  return [fn(x) for x in leaves]


def _all_finite(x: jax.Array) -> jax.Array:
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.ones((), jnp.bool_)
  return jnp.all(jnp.isfinite(x))


def fingerprint(tree: Any) -> dict[str, int]:
  """Fingerprints of every array in ``tree``, by key path.

  The fingerprint is a position-weighted sum of the bit patterns modulo
  2**32: bitwise-equal arrays give equal values on any sharding, and a
  flipped bit always changes the value.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_guard.host.checkpoint import fingerprint
    >>> a = fingerprint({'w': jnp.arange(4.0)})
    >>> b = fingerprint({'w': jnp.arange(4.0).at[3].set(3.0001)})
    >>> list(a), a == b
    (["['w']"], False)

  Args:
    tree: a pytree of arrays.

  Returns:
    ``{jax.tree_util.keystr(path): int}``.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  values = _map_leaves(_leaf_fingerprint, [x for _, x in flat])
  return {
      jax.tree_util.keystr(path): int(v)
      for (path, _), v in zip(flat, values)
  }


def _encode_data_state(data_iter: Any) -> dict[str, Any]:
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


def _decode_data_state(saved: Mapping[str, Any]) -> Any:
  if saved['encoding'] == 'base64':
    return base64.b64decode(saved['value'])
  return saved['value']


def _healthy(metrics: Optional[Mapping[str, Any]]) -> float:
  """Orbax's ``best_fn``: healthy checkpoints rank above the others."""
  return float(bool(metrics and metrics.get('healthy')))


def _check_positive_int(name: str, value: Any, allow_none: bool = False):
  if allow_none and value is None:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    allowed = 'None or an int >= 1' if allow_none else 'an int >= 1'
    raise ValueError(f'{name} must be {allowed}, got {value!r}.')


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'.strip()


class _Unusable(Exception):
  """Internal: this step cannot be restored, for ``reason``."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


class CheckpointSaveError(RuntimeError):
  """Saving a step failed (unwritable directory, full disk, ...).

  Attributes:
    step: the step whose save failed (``None`` if unknown).
    directory: the checkpoint directory.
  """

  def __init__(self, step: Optional[int], directory: Any, error: Any):
    which = 'a checkpoint' if step is None else f'step {step}'
    super().__init__(
        f'Saving {which} to {directory} failed: {error}. Nothing of that'
        ' step was committed; the steps saved before are intact.')
    self.step = step
    self.directory = directory


def _metric_rank(metrics: Optional[Mapping[str, Any]], *, name: str,
                 sign: float) -> tuple[bool, float]:
  """Orbax ``BestN`` key: steps without a finite ``name`` rank lowest."""
  value = (metrics or {}).get(name)
  if value is None or not math.isfinite(value):
    return (False, 0.0)
  return (True, sign * value)


@dataclasses.dataclass
class _NewestWhere:
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


def _manager_options(
    save_interval_steps: int,
    max_to_keep: Optional[int],
    async_save: bool,
    keep_last_good: bool,
    best_rank: Optional[Callable[[Any], Any]],
    read_only: bool,
    newest_where: _NewestWhere,
) -> ocp.CheckpointManagerOptions:
  """Orbax options: the interval, and the preservation of kept steps."""
  preservation = ocp.checkpoint_managers.preservation_policy
  policies = [preservation.LatestN(max_to_keep), newest_where]
  # BestN sorts stably by step and keeps the last: the newest of equals.
  if keep_last_good:
    policies.append(preservation.BestN(
        get_metric_fn=_healthy, n=1, keep_checkpoints_without_metrics=False
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
      best_fn=_healthy,  # makes Orbax write and load the metrics item.
      best_mode='max',
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
  )


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
      or not set(from_orbax) <= set(_FIELDS)
      or not all(isinstance(v, str) and v.strip('/') for v in
                 from_orbax.values())):
    raise ValueError(
        "from_orbax must map 'params' (and optionally 'opt_state', 'rng') to"
        " an Orbax item name or 'item/key/...', e.g. {'params':"
        f" 'default/params'}}; got {from_orbax!r}."
    )


def _describe(shape: tuple[int, ...], dtype: np.dtype) -> str:
  return f'{np.dtype(dtype).name}{list(shape)}'


def _stored(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  """The shape and dtype Orbax stores: a typed PRNG key as its key data."""
  if jax.dtypes.issubdtype(getattr(leaf, 'dtype', None), jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return tuple(np.shape(leaf)), np.dtype(getattr(leaf, 'dtype', None)
                                         or np.asarray(leaf).dtype)


def _castable(saved: np.dtype, wanted: np.dtype) -> bool:
  return bool(jnp.issubdtype(saved, jnp.floating)
              and jnp.issubdtype(wanted, jnp.floating))


def _tree_differences(
    saved: Mapping[tuple[str, ...], Any],
    target: Mapping[tuple[str, ...], Any],
    cast_dtypes: bool,
    prefix: str = '',
) -> tuple[list[str], dict[tuple[str, ...], np.dtype]]:
  """Each difference of saved leaf metadata and target leaves, as text, and
  the leaves to restore in their saved dtype and cast (``cast_dtypes``)."""
  differences, casts = [], {}
  for key in sorted(set(saved) | set(target)):
    name = prefix + '/'.join(key)
    if key not in target:
      shape, dtype = tuple(saved[key].shape), saved[key].dtype
      differences.append(f'{name}: saved {_describe(shape, dtype)}, not in'
                         ' the target')
      continue
    wanted = _stored(target[key])
    if key not in saved:
      differences.append(f'{name}: not saved, target {_describe(*wanted)}')
      continue
    got = (tuple(saved[key].shape), np.dtype(saved[key].dtype))
    if got == wanted:
      continue
    castable = got[0] == wanted[0] and _castable(got[1], wanted[1])
    if castable and cast_dtypes:
      casts[key] = got[1]
      continue
    hint = ' (cast_dtypes=True would cast it)' if castable else ''
    differences.append(
        f'{name}: saved {_describe(*got)}, target {_describe(*wanted)}{hint}'
    )
  return differences, casts


def _abstract(tree: Any, casts: Mapping[tuple[str, ...], np.dtype]) -> Any:
  """The restore target: ``tree``'s shapes and shardings, saved dtypes."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  if not casts:
    return abstract
  flat = ocp.tree.to_flat_dict(abstract)
  for key, dtype in casts.items():
    leaf = flat[key]
    flat[key] = jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
  return ocp.tree.from_flat_dict(flat, target=abstract)


def _check_restored_leaves(restored: Any, tree: Any,
                           casts: Mapping[tuple[str, ...], np.dtype]) -> None:
  """Each restored leaf has the target's shape and the dtype asked for.

  Orbax reads a typed PRNG key back as raw key data when the step's
  ``array_metadatas`` are missing: damage, found before any cast.
  """
  wanted = ocp.tree.to_flat_dict(tree)
  for key, leaf in ocp.tree.to_flat_dict(restored).items():
    want = wanted.get(key)
    if want is not None and (tuple(np.shape(leaf)) == tuple(np.shape(want))
                             and leaf.dtype == casts.get(key, want.dtype)):
      continue
    saved = 'nothing' if want is None else _describe_leaf(want)
    raise _Unusable(
        f'{"/".join(map(str, key))} restored as {_describe_leaf(leaf)},'
        f' the target is {saved} (damaged array metadata)'
    )


def _describe_leaf(leaf: Any) -> str:
  return f'{leaf.dtype}{list(np.shape(leaf))}'


def _json_digests(metrics, events, data_state) -> dict[str, str]:
  """SHA-256 of each JSON item as canonical text, for the integrity record."""
  items = {'metrics': metrics, 'events': events, 'data_iterator': data_state}
  return {
      name: hashlib.sha256(
          json.dumps(value, sort_keys=True).encode()).hexdigest()
      for name, value in items.items()
  }


def _cast_like(restored: Any, tree: Any) -> Any:
  return jax.tree.map(
      lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype),
      restored, tree,
  )


def _finite_metrics(metrics: Optional[Mapping[str, Any]]) -> dict[str, Any]:
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


def _check_json(name: str, value: Any) -> None:
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f'{name} must be JSON-serializable for the checkpoint, got {e}.'
    ) from e


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


class Checkpointer:
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
    self._best_rank = None if best_metric is None else functools.partial(
        _metric_rank, name=best_metric, sign=1.0 if best_mode == 'max' else -1.0
    )
    self._newest_where = _NewestWhere()
    self._options = _manager_options(
        save_interval_steps, max_to_keep, async_save, keep_last_good,
        self._best_rank, read_only, self._newest_where,
    )
    self._registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    self._registry.add(_STATE, ocp.args.StandardSave)
    self._registry.add(_STATE, ocp.args.StandardRestore)
    for item in (_DATA, _EVENTS, _INTEGRITY):
      self._registry.add(item, ocp.args.JsonSave)
      self._registry.add(item, ocp.args.JsonRestore)
    self._pending_step: Optional[int] = None  # the async save in flight
    self._lock = None if read_only else lock_lib.WriterLock(
        self._directory, is_open_here=self._directory_open_here)
    try:
      self._warn_unfinished_saves()
      self._manager = self._open_manager()
    except BaseException:
      self._release_lock()
      raise
    _OPEN_CHECKPOINTERS.add(self)

  # -- Opening ----------------------------------------------------------------

  def _warn_unfinished_saves(self) -> None:
    """Names the saves a crash interrupted; Orbax removes them on opening."""
    if not self._directory.exists():
      return
    for name in ocp.path.step.tmp_checkpoints(self._directory):
      step = ocp.path.step.step_from_checkpoint_name(name)
      fate = 'left in place (read-only)' if self._read_only else 'removed'
      self._warn(step, f'unfinished save ({name}) ignored and {fate}')

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
          self._reject(step, f'unreadable metrics ({_first_line(e)})')
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

  def preserve_newest(self, predicate: Callable[[int], bool]) -> None:
    """Keeps the two newest steps where ``predicate(step)`` holds, however old.

    :class:`optax_guard.Recovery` registers its ``is_confirmed`` here, so that
    retention never deletes the checkpoint a rollback would restore, nor
    the one before it (the target may be damaged: a save during a rollback
    that fails leaves the previous target). The predicate is asked at every
    clean-up after a save.

    Args:
      predicate: takes a step, says whether it is to be kept.
    """
    self._newest_where.predicate = predicate

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
    return bool(_healthy(self.metrics(step)))

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
    record = {'healthy': bool(healthy), **_finite_metrics(metrics)}
    step = int(state.step)
    if step in self._manager.all_steps():
      return False
    if not force and not self._manager.should_save(step):
      return False
    tree = _state_tree(state)
    data_state = _encode_data_state(data_iter)
    events = dict(events or {})
    # Orbax would fail in its background thread, after the arrays are
    # written; failing here leaves nothing half-written.
    _check_json('events', events)
    _check_json('the data iterator state', data_state)
    integrity = {
        'fingerprints': fingerprint(tree) if self._verify else None,
        'json': _json_digests(record, events, data_state),
    }
    # The previous async save first, so that its failure names its step.
    self.wait_until_finished()
    if self._lock is not None:
      self._lock.check()  # Orbax deletes old steps after the save.
    self._check_writable(step)
    self._pending_step = step
    try:
      return self._manager.save(
          step,
          args=ocp.args.Composite(**{
              _STATE: ocp.args.StandardSave(tree),
              _DATA: ocp.args.JsonSave(data_state),
              _EVENTS: ocp.args.JsonSave(events),
              _INTEGRITY: ocp.args.JsonSave(integrity),
          }),
          metrics=record,
          force=True,
      )
    except Exception as e:  # pylint: disable=broad-except
      self._pending_step = None
      raise CheckpointSaveError(step, self._directory, e) from e

  def _check_writable(self, step: int) -> None:
    """Raises :class:`CheckpointSaveError` unless ``directory`` takes a
    new entry, alike on every process.

    Orbax creates the step directory in a background thread; when that
    fails, its other threads wait 300 s for the directory and the process
    cannot exit meanwhile. A directory made and removed here fails first.
    """
    error = None
    if '://' not in str(self._directory):
      probe = self._directory / (
          f'.og-write-probe-{jax.process_index()}-{os.getpid()}')
      try:
        probe.mkdir()
        probe.rmdir()
      except OSError as e:
        error = e
    failed = error is not None
    if jax.process_count() > 1:
      failed = bool(np.any(multihost_utils.process_allgather(
          np.int32(failed))))
    if failed:
      raise CheckpointSaveError(
          step, self._directory, error or 'not writable on another process')

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

  # -- Restoring --------------------------------------------------------------

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
      ``(state, events)``, or ``None`` when no step recorded the metric.

    Raises:
      ValueError: when the Checkpointer has no ``best_metric``.
    """
    if self._best_rank is None:
      raise ValueError(
          'restore_best needs best_metric=... at construction (e.g.'
          " best_metric='eval_loss', best_mode='min')."
      )
    self._manager.wait_until_finished()
    return self._restore_first(self._best_first(), target, data_iter)

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
    try:
      restored, reason = self._read(step, target), None
    except _Unusable as e:
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
        data_iter.set_state(_decode_data_state(data_state))
    return state, events

  def _read(self, step, target):
    """``(state, events, data_state)`` of ``step``, checked; no effects."""
    items = self._items_on_disk(step)
    if _STATE not in items:
      others = sorted(items - _OG_ITEMS)
      if not others:
        raise _Unusable(f'no {_STATE!r} item (found {sorted(items)})')
      if not self._from_orbax:
        raise ValueError(
            f'Checkpoint step {step} in {self._directory} was written by plain'
            f' Orbax (items {others}), not by og.Checkpointer; nothing was'
            ' moved. Say where its arrays are, e.g. og.Checkpointer(...,'
            " from_orbax={'params': 'default/params', 'opt_state':"
            " 'default/opt_state'}) for one StandardSave item of a dict."
        )
      arrays = self._restore_orbax_items(step, target, items)
      saved = {_EVENTS: {}, _DATA: None}
    else:
      arrays, saved = self._restore_og_items(step, target)
    flat_params = jax.tree_util.tree_flatten_with_path(arrays['params'])[0]
    finite = _map_leaves(_all_finite, [leaf for _, leaf in flat_params])
    for (path, _), ok in zip(flat_params, finite):
      if not ok:
        raise _Unusable(
            f'non-finite parameter values in params{jax.tree_util.keystr(path)}'
        )
    state = TrainState(
        step=step,
        params=arrays['params'],
        opt_state=arrays.get('opt_state', target.opt_state),
        rng=arrays.get('rng', target.rng),
    )
    return state, dict(saved[_EVENTS] or {}), saved[_DATA]

  def _items_on_disk(self, step: int) -> set[str]:
    try:
      return {p.name for p in (self._directory / str(step)).iterdir()
              if p.is_dir()}
    except Exception as e:  # pylint: disable=broad-except
      raise _Unusable(f'unreadable step directory ({_first_line(e)})') from e

  def _restore_og_items(self, step, target):
    """og's layout: check the tree, read, verify, cast."""
    tree = _state_tree(target)
    try:
      metadata = self._manager.item_metadata(step)[_STATE]
      saved = ocp.tree.to_flat_dict(metadata)
    except Exception as e:  # pylint: disable=broad-except
      raise _Unusable(f'unreadable metadata ({_first_line(e)})') from e
    if not saved:
      raise _Unusable('no array metadata')
    casts = self._check_tree(step, saved, tree)
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(**{
              _STATE: ocp.args.StandardRestore(_abstract(tree, casts)),
              _DATA: ocp.args.JsonRestore(),
              _EVENTS: ocp.args.JsonRestore(),
              _INTEGRITY: ocp.args.JsonRestore(),
          }),
      )
    except Exception as e:  # pylint: disable=broad-except
      # Any failure to read a checkpoint whose tree matched means its
      # files are damaged: truncated, missing or garbled.
      raise _Unusable(f'cannot be read ({_first_line(e)})') from e
    arrays = restored[_STATE]
    _check_restored_leaves(arrays, tree, casts)
    record = restored[_INTEGRITY] or {}
    expected = record.get('fingerprints')
    if self._verify and expected is not None:
      actual = fingerprint(arrays)  # in the saved dtypes, before any cast
      bad = [path for path in expected if actual.get(path) != expected[path]]
      if bad or set(actual) != set(expected):
        raise _Unusable(f'fingerprint mismatch in {bad or "the leaf set"}')
    self._check_json_items(step, record, restored)
    return _cast_like(arrays, tree), restored

  def _check_json_items(self, step, record, restored) -> None:
    """The metrics, events and iterator state match the integrity record.

    Steps saved before the record held them (no ``json`` key) pass.
    """
    if not self._verify or 'json' not in record:
      return
    actual = _json_digests(self.metrics(step), restored[_EVENTS],
                           restored[_DATA])
    for item, digest in record['json'].items():
      if actual.get(item) != digest:
        raise _Unusable(f'{item} differ from the integrity record')

  def _restore_orbax_items(self, step, target, items):
    """A plain Orbax step: check, then read each ``from_orbax`` location."""
    locations = {field: [k for k in loc.split('/') if k]
                 for field, loc in self._from_orbax.items()}
    missing = sorted({item for item, *_ in locations.values()} - items)
    if missing:
      raise ValueError(
          f'Checkpoint step {step} in {self._directory} has no item'
          f' {missing} named in from_orbax; its items are {sorted(items)}.'
      )
    targets = {field: getattr(target, field) for field in locations}
    with ocp.PyTreeCheckpointer() as reader:
      saved = {}
      for field, location in locations.items():
        metadata = self._orbax_metadata(reader, step, field, location)
        for key, leaf in ocp.tree.to_flat_dict(metadata).items():
          saved[(field, *key)] = leaf
      abstract = _abstract(targets, self._check_tree(step, saved, targets))
      arrays = {}
      for field, (item, *keys) in locations.items():
        wanted = abstract[field]
        for key in reversed(keys):  # the subtree, where it was saved
          wanted = {key: wanted}
        try:
          restored = reader.restore(
              self._directory / str(step) / item,
              args=ocp.args.PyTreeRestore(
                  item=wanted,
                  restore_args=ocp.checkpoint_utils.construct_restore_args(
                      wanted),
                  partial_restore=True,
              ),
          )
        except Exception as e:  # pylint: disable=broad-except
          raise _Unusable(f'cannot be read ({_first_line(e)})') from e
        for key in keys:
          restored = restored[key]
        arrays[field] = restored
    return _cast_like(arrays, targets)

  def _orbax_metadata(self, reader, step, field, location):
    """The saved leaf metadata at ``location``: ``[item, key, ...]``."""
    item, *keys = location
    try:
      tree = reader.metadata(
          self._directory / str(step) / item).item_metadata.tree
    except Exception as e:  # pylint: disable=broad-except
      raise _Unusable(
          f'unreadable metadata of {item!r} ({_first_line(e)})') from e
    for depth, key in enumerate(keys):
      if not isinstance(tree, Mapping) or key not in tree:
        raise ValueError(
            f'Checkpoint step {step} in {self._directory}: from_orbax'
            f' {field!r} names {"/".join(location[:depth + 2])}, which is not'
            ' saved (keys there:'
            f' {sorted(tree) if isinstance(tree, Mapping) else tree}).'
        )
      tree = tree[key]
    return tree

  def _check_tree(self, step: int, saved: Mapping[Any, Any], tree: Any):
    """Raises ValueError naming each difference; returns the dtype casts."""
    differences, casts = _tree_differences(
        saved, ocp.tree.to_flat_dict(tree), self._cast_dtypes
    )
    if differences:
      shown = '\n  '.join(differences[:20])
      more = len(differences) - 20
      raise ValueError(
          f'Checkpoint step {step} in {self._directory} holds a different'
          f' tree than the restore target; nothing was moved.'
          f' {len(differences)} difference(s):\n  {shown}'
          + (f'\n  ... and {more} more' if more > 0 else '') +
          '\nBuild the target as the saved state was built (same model,'
          ' dtypes and optimizer, e.g. tx.init(params)), or start in a new'
          ' directory.'
      )
    return casts

  # -- Rejecting --------------------------------------------------------------

  def _warn(
      self,
      step: int,
      reason: str,
      category: type[Warning] = CorruptCheckpointWarning,
  ) -> None:
    message = f'Checkpoint step {step} in {self._directory}: {reason}.'
    _log.warning(message)
    warnings.warn(message, category, stacklevel=3)

  def _reject(self, step: int, reason: str) -> None:
    """Warns and moves ``step`` out of Orbax's view, deleting nothing."""
    if self._read_only:
      self._warn(step, f'{reason}; skipped (read-only: left in place)')
      return
    path = self._directory / str(step)
    destination = self._directory / QUARANTINE_DIR / str(step)
    suffix = 1
    while destination.exists():
      destination = self._directory / QUARANTINE_DIR / f'{step}-{suffix}'
      suffix += 1
    self._warn(
        step, f'{reason}; skipped and moved to {destination} (nothing deleted)'
    )
    multihost = jax.process_count() > 1
    if multihost:  # Every process has named the same destination.
      ocp.multihost.sync_global_processes(f'og_quarantine_{step}_named')
    if jax.process_index() == 0 and path.exists():
      destination.parent.mkdir(parents=True, exist_ok=True)
      path.rename(destination)
    if multihost:  # No process lists the steps again before the move.
      ocp.multihost.sync_global_processes(f'og_quarantine_{step}_moved')
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
    path = epath.Path(directory).absolute()
    if not path.is_dir():
      raise ValueError(f'{directory} does not exist or is not a directory.')

    def size(where):
      if not where.is_dir():
        return where.stat().length
      return sum(size(child) for child in where.iterdir())

    def record(step, where, **fields):
      return {'step': step, 'valid': False, 'healthy': False,
              'last_good': False, 'data': None, 'events': None,
              'bytes': size(where),
              'problem': None, **fields}

    def check(manager, step):
      found = record(step, path / str(step))
      try:
        found['healthy'] = bool(_healthy(manager.metrics(step)))
        saved = manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.JsonRestore() for item in json_items}))
        found['data'] = (saved[_DATA] or {}).get('value')
        found['events'] = saved[_EVENTS]
        arrays = manager.restore(step, args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore()}))[_STATE]
      except Exception as e:  # pylint: disable=broad-except
        return {**found, 'problem': f'unreadable ({_first_line(e)})'}
      expected = (saved[_INTEGRITY] or {}).get('fingerprints')
      if expected is not None and sorted(
          fingerprint(arrays).values()) != sorted(expected.values()):
        return {**found, 'problem': 'fingerprint mismatch'}
      params = jax.tree.leaves(arrays.get('params', {}))
      if not all(_map_leaves(_all_finite, params)):
        return {**found, 'problem': 'non-finite parameter values'}
      return {**found, 'valid': True}

    json_items = (_DATA, _EVENTS, _INTEGRITY)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_STATE, ocp.args.StandardRestore)
    for item in json_items:
      registry.add(item, ocp.args.JsonRestore)
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, lightweight_initialize=True,
        save_interval_steps=0,  # What read_only sets, with a warning.
    )
    # Orbax warns that the directory is read-only: so it is meant to be.
    absl_logger = logging.getLogger('absl')
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
      with ocp.CheckpointManager(path, options=options,
                                 handler_registry=registry) as manager:
        records = [check(manager, step) for step in manager.all_steps()]
    finally:
      absl_logger.setLevel(level)
    for name in ocp.path.step.tmp_checkpoints(path):
      records.append(record(
          ocp.path.step.step_from_checkpoint_name(name), path / name,
          problem='unfinished save: removed when a writer opens'))
    quarantine = path / QUARANTINE_DIR
    for moved in sorted(quarantine.iterdir()) if quarantine.is_dir() else ():
      records.append(record(
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

def _stored_shape(leaf: Any) -> tuple[int, ...]:
  """The shape Orbax stores: a typed PRNG key is stored as its key data."""
  if jax.dtypes.issubdtype(getattr(leaf, 'dtype', None), jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return tuple(np.shape(leaf))


def _state_tree(state: TrainState) -> dict[str, Any]:
  tree = {'params': state.params, 'opt_state': state.opt_state}
  if state.rng is not None:
    tree['rng'] = state.rng
  return tree
