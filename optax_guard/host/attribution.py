"""Why did a step fail? Attribution of a skipped step by running it again.

With ``RecoveryPolicy(rerun=True)``, :func:`optax_guard.fit` runs every step
the guard skips a second time on the same inputs and compares (the idea of
Megatron-LM's rerun state machine, for a JAX loop):

* the re-run is clean: a **transient** fault (the machine, not the data);
  the re-run's result is applied, so the batch is not lost;
* the re-run repeats every metric bit for bit: a **bad batch**; its position
  and content hash go to ``bad_batches.jsonl`` beside the checkpoints, and a
  restart that draws it again drops it without a train step;
* the re-run fails differently: **nondeterministic**.

The one question this module answers besides the verdict: what does the
re-run start from? The step donates its inputs, so they are gone once it
returned. On a skipped step the guard holds the params and its inner
optimizer state bit for bit (its promise, tested in ``tests/test_guard.py``),
but not its own counters and statistics (skip counts, the spike window, the
last step's telemetry), nor an optimizer state outside the guard (a chain's
other members), nor a model state a custom step does not hold. So before
every step :func:`snapshot` copies exactly those (small) parts, and
:func:`rerun_inputs` puts them back around the held params and inner state.
A step that is not skipped runs once; the copy is its only cost.
"""

import hashlib
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from optax_guard.host import steps
from optax_guard.host.runlog import (
  BadBatch,
  DroppedBadBatch,
  NondeterministicFault,
  TransientFault,
  _json_line,
  read_jsonl,
)
from optax_guard.host.state import TrainState
from optax_guard.transforms import guard as _guard
from optax_guard.transforms import states as _states

_log = logging.getLogger('optax_guard')

BAD_BATCHES = 'bad_batches.jsonl'

TRANSIENT = 'transient'
BAD_BATCH = 'bad_batch'
NONDETERMINISTIC = 'nondeterministic'


def _is_guard(node: Any) -> bool:
  return isinstance(node, _guard.GuardState)


def has_guard(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds a guard state (anything to re-run on)."""
  return bool(_states.find_states(opt_state, _guard.GuardState))


def _copy(tree: Any) -> Any:
  """``tree`` with fresh buffers for its arrays (the step donates the old)."""
  leaves, treedef = jax.tree.flatten(tree)
  arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
  # One device_put for all of them, each to its own sharding (a global
  # array's too); may_alias=False forces a copy.
  copies = jax.device_put([leaves[i] for i in arrays],
                          [leaves[i].sharding for i in arrays],
                          may_alias=False)
  for i, copy in zip(arrays, copies):
    leaves[i] = copy
  return jax.tree.unflatten(treedef, leaves)


class Snapshot(NamedTuple):
  """What a skipped step does not hold, copied before the step runs.

  Attributes:
    opt_state: the optimizer state with each guard's ``inner_state`` left
      out (``None``): the guard's counters, statistics and telemetry, and
      every state outside a guard.
    model_state: the model state (``None`` without one).
  """

  opt_state: Any
  model_state: Any


def snapshot(state: TrainState) -> Snapshot:
  """Copies the parts of ``state`` a skipped step may change.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> from optax_guard.host import attribution
    >>> tx = og.guard(optax.adam(0.1))
    >>> params = {'w': jnp.ones(3)}
    >>> saved = attribution.snapshot(og.TrainState(0, params, tx.init(params)))
    >>> saved.opt_state.inner_state is None  # held by the guard, not copied
    True

  Args:
    state: the state about to be passed to the train step.

  Returns:
    A :class:`Snapshot` in fresh buffers.
  """
  outer = jax.tree.map(
      lambda node: node._replace(inner_state=None) if _is_guard(node)
      else node, state.opt_state, is_leaf=_is_guard)
  return Snapshot(_copy(outer), _copy(state.model_state))


def rerun_inputs(saved: Snapshot, skipped: TrainState) -> TrainState:
  """The inputs of the step that returned ``skipped``, rebuilt.

  Params and each guard's inner state come from ``skipped`` (held bit for
  bit by the guard), the rest from ``saved``; the step goes back by one.

  Args:
    saved: the :func:`snapshot` taken before the step.
    skipped: the state the skipped step returned.

  Returns:
    The state to run the same step on again.
  """

  def merge(before: Any, after: Any) -> Any:
    if _is_guard(before):
      return before._replace(inner_state=after.inner_state)
    return before

  opt_state = jax.tree.map(merge, saved.opt_state, skipped.opt_state,
                           is_leaf=_is_guard)
  return skipped._replace(step=skipped.step - 1, opt_state=opt_state,
                          model_state=saved.model_state)


def _same_bits(a: Any, b: Any) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and (
      a.tobytes() == b.tobytes())


def classify(first: Mapping[str, Any], second: Mapping[str, Any]) -> str:
  """The verdict on a skipped step from its two runs' metrics.

  Examples:
    >>> import numpy as np
    >>> from optax_guard.host import attribution
    >>> nan = {'loss': np.float32('nan'), 'skipped': np.bool_(True)}
    >>> clean = {'loss': np.float32(0.5), 'skipped': np.bool_(False)}
    >>> [attribution.classify(nan, m) for m in (clean, nan)]
    ['transient', 'bad_batch']

  Args:
    first: every metric of the first (skipped) run, fetched to the host.
    second: every metric of the re-run.

  Returns:
    :data:`TRANSIENT` when the re-run was not skipped; :data:`BAD_BATCH`
    when it repeats every metric bit for bit (NaN payloads included);
    :data:`NONDETERMINISTIC` otherwise.
  """
  if not bool(np.asarray(second.get('skipped', False))):
    return TRANSIENT
  if first.keys() == second.keys() and all(
      _same_bits(first[name], second[name]) for name in first):
    return BAD_BATCH
  return NONDETERMINISTIC


def _local_parts(leaf: Any) -> list[tuple[str, np.ndarray]]:
  """The parts of ``leaf`` this process holds, in a fixed order."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    shards = sorted(leaf.addressable_shards,
                    key=lambda s: (str(s.index), s.device.id))
    return [(str(s.index), np.asarray(s.data)) for s in shards]
  return [('', np.asarray(leaf))]


def batch_digest(batch: Any) -> str:
  """SHA-256 of a batch's content, the same on every process.

  Each process hashes the parts it holds (a global array's addressable
  shards, or its own numpy arrays); under ``jax.distributed`` the digests
  are gathered and hashed again in process order, so every process returns
  the same identity, however the rows are spread. Every process must call
  it at the same point.

  Examples:
    >>> import numpy as np
    >>> from optax_guard.host.attribution import batch_digest
    >>> a = {'x': np.arange(4.0)}
    >>> batch_digest(a) == batch_digest({'x': np.arange(4.0)})
    True
    >>> batch_digest(a) == batch_digest({'x': np.arange(1.0, 5.0)})
    False

  Args:
    batch: a pytree of arrays.

  Returns:
    The hex digest.
  """
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
    digest.update(jax.tree_util.keystr(path).encode())
    for index, data in _local_parts(leaf):
      digest.update(f'{index}|{data.dtype}|{data.shape}|'.encode())
      digest.update(np.ascontiguousarray(data).tobytes())
  if jax.process_count() == 1:
    return digest.hexdigest()
  local = np.frombuffer(digest.digest(), np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(local))
  return hashlib.sha256(gathered.tobytes()).hexdigest()


class BadBatches:
  """The record of bad batches, ``bad_batches.jsonl`` in ``directory``.

  One strict JSON line per :class:`~optax_guard.host.runlog.BadBatch`
  event, appended (and flushed to disk) by process 0; every process reads
  the file when it opens and keeps the same records as it classifies. A
  torn last line (a kill mid-write) is ignored.

  Args:
    directory: the checkpoint directory (``None``: kept in memory only).
  """

  def __init__(self, directory: str | os.PathLike | None):
    self.path = (None if directory is None
                 else pathlib.Path(directory) / BAD_BATCHES)
    self.by_index: dict[int, dict[str, Any]] = {}
    for record in read(self.path) if self.path is not None else ():
      self.by_index[int(record['index'])] = record

  def add(self, event: BadBatch) -> None:
    """Records ``event``'s batch (written to the file by process 0)."""
    record = event.to_json()
    self.by_index[event.index] = record
    if self.path is None or jax.process_index() != 0:
      return
    with open(self.path, 'a') as f:
      f.write(_json_line(record))
      f.flush()
      os.fsync(f.fileno())

  def get(self, index: int) -> dict[str, Any] | None:
    """The record of the batch at position ``index``, if it is bad."""
    return self.by_index.get(index)


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a ``bad_batches.jsonl`` (none if it does not exist)."""
  return read_jsonl(path)


# The two loop steps of og.fit's with rerun=True. ``loop`` is fit's loop
# state: its ``data``, ``bad_batches``, ``completed`` and ``record``.


def draw(state: TrainState, loop: Any,
         num_steps: int) -> tuple[TrainState, Any]:
  """The next batch to train on; recorded bad batches are dropped.

  A batch recorded in ``bad_batches.jsonl`` at this position, with the same
  content hash, is drawn and dropped without a train step (its step counts
  it as drawn, as always); another content there is trained on, with a
  warning.

  Returns:
    ``(state, batch)``: ``state`` with its step moved past dropped batches;
    ``batch`` is ``None`` when dropping reached ``num_steps``.
  """
  while state.step < num_steps:
    batch = next(loop.data)
    record = None if loop.bad_batches is None else loop.bad_batches.get(
        state.step)
    if record is None:
      return state, batch
    digest = batch_digest(batch)
    if digest != record['digest']:
      _log.warning(
          'Batch %d was recorded as bad (step %d) but its content differs'
          ' now (hash %s, recorded %s): training on it.', state.step,
          record['step'], digest[:12], record['digest'][:12])
      return state, batch
    state = state._replace(step=state.step + 1)
    loop.completed = state
    loop.record(DroppedBadBatch(state.step, index=state.step - 1,
                                digest=digest))
  return state, None


def _first_and_second(first: Mapping[str, Any],
                      second: Mapping[str, Any]) -> dict[str, Any]:
  return {
      'first': {'loss': first['loss'], 'grad_norm': first.get('grad_norm')},
      'second': {'loss': second['loss'],
                 'grad_norm': second.get('grad_norm')},
  }


def attribute(train_step, state: TrainState, batch: Any, saved: Snapshot,
              metrics: Mapping[str, Any], scalars: dict[str, Any], loop: Any):
  """Runs a skipped step again on its inputs and records the verdict.

  Every process takes the same decision: the metrics compared are the
  guard's global ones, and the batch's hash is agreed.

  Returns:
    ``(state, scalars)`` to continue with: the re-run's.
  """
  first = jax.device_get(dict(metrics))
  state, metrics = steps.run(train_step,
                             rerun_inputs(saved, state), batch)
  second = steps.scalars(metrics)
  verdict = classify(first, jax.device_get(dict(metrics)))
  reason = 'nonfinite' if scalars.get('nonfinite') else 'spike'
  values = _first_and_second(scalars, second)
  if verdict == TRANSIENT:
    loop.record(TransientFault(state.step, reason=reason, **values))
  elif verdict == NONDETERMINISTIC:
    reason = 'nonfinite' if second.get('nonfinite') else 'spike'
    loop.record(NondeterministicFault(state.step, reason=reason, **values))
  else:
    assert loop.bad_batches is not None  # Only set up with rerun=True.
    get_state = getattr(loop.data, 'get_state', None)
    event = BadBatch(
        state.step, reason=reason, index=state.step - 1,
        digest=batch_digest(batch),
        data_state=None if get_state is None else get_state(),
        loss=second['loss'], grad_norm=second.get('grad_norm'))
    loop.bad_batches.add(event)
    loop.record(event)
  return state, second
