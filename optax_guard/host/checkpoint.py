"""Fault-tolerant checkpoints on Orbax: resume from the newest valid one.

:class:`Checkpointer` is a thin layer over
:class:`orbax.checkpoint.CheckpointManager`. One checkpoint holds, as Orbax
items of one step directory:

* ``state``: params, optimizer state (guard states included) and RNG key,
  written with ``StandardSave`` (async by default, sharded arrays as they are);
* ``data_iterator``: the state of any iterator with ``get_state()`` /
  ``set_state()`` (grain's iterators, :class:`optax_guard.ShuffledBatches`);
* ``events``: a small JSON dict of guard events (whatever the caller passes;
  :func:`optax_guard.fit` stores its event log and recovery state there);
* ``integrity``: a fingerprint of every array, checked on restore, so that a
  flipped bit is caught even where the storage layer would not notice;
* Orbax's own ``metrics`` item: ``{'healthy': bool}``, which keeps the newest
  healthy ("last good") checkpoint alive past ``max_to_keep``.

Restoring tries the newest checkpoint first. One that cannot be read, fails its
fingerprint or holds non-finite parameters is reported with a
:class:`CorruptCheckpointWarning` naming the step and the reason, moved aside
into ``<directory>/corrupted/`` (never deleted), and the next older one is
tried. A state whose structure differs from the target (a changed model or
optimizer) is a user error, not corruption: it raises ``ValueError``.
"""

import base64
import functools
import logging
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_log = logging.getLogger('optax_guard')

_STATE = 'state'
_DATA = 'data_iterator'
_EVENTS = 'events'
_INTEGRITY = 'integrity'
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
        ' restorable iterator (grain, or optax_guard.ShuffledBatches).'
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
    >>> with og.Checkpointer(tempfile.mkdtemp(), save_interval_steps=10) as ckpt:
    ...   state, events = ckpt.restore_or_init(init)  # nothing saved yet
    ...   saved = ckpt.save(state._replace(step=10), events={'note': 'hi'})
    ...   ckpt.wait_until_finished()
    ...   restored, events = ckpt.restore_or_init(init)
    >>> saved, restored.step, events
    (True, 10, {'note': 'hi'})

  Args:
    directory: where the step directories live (local path or any path Orbax
      supports, e.g. ``gs://``); a relative path is taken from the current
      working directory.
    save_interval_steps: :meth:`save` writes only on multiples of this
      (unless ``force``).
    max_to_keep: how many of the newest checkpoints to keep (``None``: all).
      The newest healthy one is kept as well, however old.
    async_save: write in a background thread (Orbax ``AsyncCheckpointer``);
      the arrays are copied to host memory before :meth:`save` returns.
    keep_last_good: keep the newest checkpoint saved with ``healthy=True``
      even when ``max_to_keep`` newer ones exist (needed for rollback).
    verify: fingerprint every array on save and check it on restore.
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
  ):
    _check_positive_int('save_interval_steps', save_interval_steps)
    _check_positive_int('max_to_keep', max_to_keep, allow_none=True)
    # Orbax refuses relative paths (its OCDBT store needs absolute ones).
    self._directory = epath.Path(directory).absolute()
    self._verify = verify
    policies = [ocp.checkpoint_managers.preservation_policy.LatestN(max_to_keep)]
    if keep_last_good:
      # Orbax sorts stably by step, so the best "healthy" rank is the newest
      # healthy checkpoint.
      policies.append(
          ocp.checkpoint_managers.preservation_policy.BestN(
              get_metric_fn=_healthy, n=1, keep_checkpoints_without_metrics=False
          )
      )
    decisions = ocp.checkpoint_managers.save_decision_policy
    self._options = ocp.CheckpointManagerOptions(
        # Orbax's default also saves the first step it sees; here only the
        # interval (and JAX's multi-host preemption sync point) decide.
        save_decision_policy=decisions.AnySavePolicy([
            decisions.FixedIntervalPolicy(save_interval_steps),
            decisions.PreemptionCheckpointingPolicy(),
        ]),
        enable_async_checkpointing=async_save,
        preservation_policy=(
            ocp.checkpoint_managers.preservation_policy.AnyPreservationPolicy(
                policies
            )
        ),
        best_fn=_healthy,  # makes Orbax write and load the metrics item.
        best_mode='max',
        cleanup_tmp_directories=True,
    )
    self._registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    self._registry.add(_STATE, ocp.args.StandardSave)
    self._registry.add(_STATE, ocp.args.StandardRestore)
    for item in (_DATA, _EVENTS, _INTEGRITY):
      self._registry.add(item, ocp.args.JsonSave)
      self._registry.add(item, ocp.args.JsonRestore)
    self._warn_unfinished_saves()
    self._manager = self._open_manager()

  # -- Opening ----------------------------------------------------------------

  def _warn_unfinished_saves(self) -> None:
    """Names the saves a crash interrupted; Orbax removes them on opening."""
    if not self._directory.exists():
      return
    for name in ocp.path.step.tmp_checkpoints(self._directory):
      step = ocp.path.step.step_from_checkpoint_name(name)
      self._warn(step, f'unfinished save ({name}) ignored and removed')

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

  def all_steps(self) -> list[int]:
    """Steps of the finished checkpoints on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest finished checkpoint's step, or ``None``."""
    return self._manager.latest_step()

  def is_healthy(self, step: int) -> bool:
    """Whether ``step`` was saved with ``healthy=True``."""
    try:
      return bool(_healthy(self._manager.metrics(step)))
    except Exception:  # pylint: disable=broad-except
      return False  # An unreadable record cannot vouch for the checkpoint.

  def last_good_step(self) -> Optional[int]:
    """The newest checkpoint saved with ``healthy=True``, or ``None``."""
    good = [s for s in self.all_steps() if self.is_healthy(s)]
    return good[-1] if good else None

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

    Returns:
      Whether a checkpoint was written (``False`` off the interval or when
      this step is already saved).
    """
    step = int(state.step)
    if step in self._manager.all_steps():
      return False
    if not force and not self._manager.should_save(step):
      return False
    tree = _state_tree(state)
    integrity = {'fingerprints': fingerprint(tree) if self._verify else None}
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(tree),
            _DATA: ocp.args.JsonSave(_encode_data_state(data_iter)),
            _EVENTS: ocp.args.JsonSave(dict(events or {})),
            _INTEGRITY: ocp.args.JsonSave(integrity),
        }),
        metrics={'healthy': bool(healthy)},
        force=True,
    )

  def wait_until_finished(self) -> None:
    """Blocks until the pending async save, if any, is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.close()

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
      ValueError: if the checkpoint holds a differently structured state.
    """
    self._manager.wait_until_finished()
    try:
      return self._restore(step, target, data_iter)
    except _Unusable as e:
      raise CorruptCheckpointError(step, e.reason) from None

  def restore_or_init(
      self, init: TrainState, *, data_iter: Any = None
  ) -> tuple[TrainState, dict[str, Any]]:
    """Resumes from the newest valid checkpoint, or returns ``init``.

    A checkpoint that cannot be used is skipped with a
    :class:`CorruptCheckpointWarning` naming its step and the reason, and
    moved into ``<directory>/corrupted/``; the next older one is tried.

    Args:
      init: the fresh state, also the restore target (see :meth:`restore`).
      data_iter: an iterator with ``set_state``, restored in place.

    Returns:
      ``(state, events)``: the restored state and its events dict, or
      ``(init, {})`` when no usable checkpoint exists.

    Raises:
      ValueError: if a checkpoint holds a differently structured state.
    """
    restored = self._restore_newest(self.all_steps(), init, data_iter)
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
    return self._restore_newest(good, target, data_iter)

  def _restore_newest(self, steps, target, data_iter):
    self._manager.wait_until_finished()
    for step in sorted(steps, reverse=True):
      try:
        return self._restore(step, target, data_iter)
      except _Unusable as e:
        self._reject(step, e.reason)
    return None

  def _restore(self, step, target, data_iter):
    tree = _state_tree(target)
    self._check_structure(step, tree)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(**{
              _STATE: ocp.args.StandardRestore(abstract),
              _DATA: ocp.args.JsonRestore(),
              _EVENTS: ocp.args.JsonRestore(),
              _INTEGRITY: ocp.args.JsonRestore(),
          }),
      )
    except Exception as e:  # pylint: disable=broad-except
      # Any failure to read a checkpoint whose structure matched means its
      # files are damaged: truncated, missing or garbled.
      raise _Unusable(f'cannot be read ({_first_line(e)})') from e
    arrays = restored[_STATE]
    integrity = restored[_INTEGRITY] or {}
    expected = integrity.get('fingerprints')
    if self._verify and expected is not None:
      actual = fingerprint(arrays)
      bad = [path for path in expected if actual.get(path) != expected[path]]
      if bad or set(actual) != set(expected):
        raise _Unusable(f'fingerprint mismatch in {bad or "the leaf set"}')
    flat_params = jax.tree_util.tree_flatten_with_path(arrays['params'])[0]
    finite = _map_leaves(_all_finite, [leaf for _, leaf in flat_params])
    for (path, _), ok in zip(flat_params, finite):
      if not ok:
        raise _Unusable(
            f'non-finite parameter values in params{jax.tree_util.keystr(path)}'
        )
    if data_iter is not None:
      saved = restored[_DATA]
      if saved is None or saved.get('encoding') == 'none':
        self._warn(step, 'holds no data-iterator state; iterator left as is',
                   category=UserWarning)
      else:
        data_iter.set_state(_decode_data_state(saved))
    state = TrainState(
        step=step,
        params=arrays['params'],
        opt_state=arrays['opt_state'],
        rng=arrays.get('rng'),
    )
    return state, dict(restored[_EVENTS] or {})

  def _check_structure(self, step: int, tree: Any) -> None:
    """Raises ValueError if the saved state is not shaped like ``tree``."""
    try:
      metadata = self._manager.item_metadata(step)[_STATE]
      saved = ocp.tree.to_flat_dict(metadata)
    except Exception as e:  # pylint: disable=broad-except
      raise _Unusable(f'unreadable metadata ({_first_line(e)})') from e
    if not saved:
      raise _Unusable('no array metadata')
    wanted = {
        key: _stored_shape(leaf)
        for key, leaf in ocp.tree.to_flat_dict(tree).items()
    }
    missing = sorted('/'.join(k) for k in set(wanted) - set(saved))
    extra = sorted('/'.join(k) for k in set(saved) - set(wanted))
    shapes = sorted(
        f'{"/".join(k)}: saved {tuple(saved[k].shape)}, target {wanted[k]}'
        for k in set(saved) & set(wanted)
        if tuple(saved[k].shape) != wanted[k]
    )
    if missing or extra or shapes:
      raise ValueError(
          f'Checkpoint step {step} in {self._directory} holds a different'
          f' state than the restore target (missing: {missing}, unexpected:'
          f' {extra}, shape changes: {shapes}). Build the target exactly as'
          ' the saved state was built (same model, same optimizer, e.g.'
          ' tx.init(params)), or start in a new directory.'
      )

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
    path = self._directory / str(step)
    destination = self._directory / QUARANTINE_DIR / str(step)
    suffix = 1
    while destination.exists():
      destination = self._directory / QUARANTINE_DIR / f'{step}-{suffix}'
      suffix += 1
    self._warn(
        step, f'{reason}; skipped and moved to {destination} (nothing deleted)'
    )
    if jax.process_index() == 0 and path.exists():
      destination.parent.mkdir(parents=True, exist_ok=True)
      path.rename(destination)
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

