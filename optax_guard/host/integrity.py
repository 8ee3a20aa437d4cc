"""What counts as damage, and what happens to a damaged step.

A step is damaged when its tree matches the restore target but its files
cannot be read, its arrays differ from the fingerprints saved with them, its
metrics, events or data-iterator state differ from the digests saved with
them, or its parameters are not finite. A damaged step is reported with a
:class:`CorruptCheckpointWarning` naming the step and the reason, and moved
aside into ``<directory>/corrupted/`` (never deleted); a user's change (a
different model or layout) is never damage (see
:mod:`optax_guard.host.state`).
"""

import functools
import hashlib
import json
import logging
import os
import re
import sys
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

_log = logging.getLogger('optax_guard')

QUARANTINE_DIR = 'corrupted'


class CorruptCheckpointWarning(RuntimeWarning):
  """A checkpoint was skipped because it is unfinished, unreadable or wrong."""


class CorruptCheckpointError(RuntimeError):
  """The checkpoint asked for cannot be used; the message says why."""

  def __init__(self, step: int, reason: str):
    super().__init__(f'checkpoint step {step} is unusable: {reason}')
    self.step = step
    self.reason = reason


class Damage(Exception):
  """Internal: this step cannot be restored, for ``reason``."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _is_abandoned_read(unraisable: Any) -> bool:
  """A result delivered into Orbax's closed loop, or one of Orbax's read
  coroutines closed unawaited (it raises its read's error as it closes)."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
    return True
  code = getattr(unraisable.object, 'cr_code', None)
  return code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename


def quiet_abandoned_reads() -> None:
  """Keeps the reads Orbax abandons on a damaged step off the console.

  Orbax reads a step's arrays concurrently in an event loop of its own and
  closes that loop as soon as one read fails. The TensorStore reads still in
  flight then finish into the closed loop, and their coroutines are closed
  unawaited; Python reports each as ``Exception ignored ... RuntimeError:
  Event loop is closed`` (a dozen tracebacks for one damaged step, after
  the warning that already said what happened), and an Orbax read
  coroutine closed unawaited raises its read's error as it closes. Nothing
  can receive those results, so this drops exactly these two from
  ``sys.unraisablehook`` (installed once, before the first read of a
  step; every other unraisable exception goes to the hook that was there
  before).
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_errors', False):
    return

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  hook.drops_closed_loop_errors = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


# TensorStore appends its whole JSON spec (hundreds of characters) and
# source locations to each error; the reason a reader needs comes before.
_TENSORSTORE_DETAIL = re.compile(
    r"\s*\[(?:tensorstore_spec|source locations)='.*?'\]")


def first_line(error: BaseException) -> str:
  """``'Type: first line'`` of ``error``, without TensorStore's spec dump.

  Examples:
    >>> from optax_guard.host.integrity import first_line
    >>> first_line(ValueError(
    ...     "DATA_LOSS: bad manifest [tensorstore_spec='{...}']\\nmore"))
    'ValueError: DATA_LOSS: bad manifest'
  """
  text = _TENSORSTORE_DETAIL.sub('', str(error)).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'.strip()


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


def map_leaves(fn: Callable[[jax.Array], jax.Array], leaves: list[Any]):
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


def all_finite(x: jax.Array) -> jax.Array:
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.ones((), jnp.bool_)
  return jnp.all(jnp.isfinite(x))


def check_finite_params(params: Any) -> None:
  """Raises :class:`Damage` naming the first non-finite parameter leaf."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  finite = map_leaves(all_finite, [leaf for _, leaf in flat])
  for (path, _), ok in zip(flat, finite):
    if not ok:
      raise Damage(
          f'non-finite parameter values in params{jax.tree_util.keystr(path)}'
      )


def fingerprint(tree: Any) -> dict[str, int]:
  """Fingerprints of every array in ``tree``, by key path.

  The fingerprint is a position-weighted sum of the bit patterns modulo
  2**32: bitwise-equal arrays give equal values on any sharding, and a
  flipped bit always changes the value.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_guard.host.integrity import fingerprint
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
  values = map_leaves(_leaf_fingerprint, [x for _, x in flat])
  return {
      jax.tree_util.keystr(path): int(v)
      for (path, _), v in zip(flat, values)
  }


def json_digests(metrics, events, data_state) -> dict[str, str]:
  """SHA-256 of each JSON item as canonical text, for the integrity record."""
  items = {'metrics': metrics, 'events': events, 'data_iterator': data_state}
  return {
      name: hashlib.sha256(
          json.dumps(value, sort_keys=True).encode()).hexdigest()
      for name, value in items.items()
  }


def warn(directory: epath.Path, step: int, reason: str,
         category: type[Warning] = CorruptCheckpointWarning) -> None:
  """Logs and warns ``Checkpoint step <step> in <directory>: <reason>.``"""
  message = f'Checkpoint step {step} in {directory}: {reason}.'
  _log.warning(message)
  warnings.warn(message, category, stacklevel=4)


def move_aside(directory: epath.Path, step: int, reason: str, *,
               read_only: bool, name: Optional[str] = None) -> None:
  """Warns and moves ``step`` into ``corrupted/``, deleting nothing.

  Every process calls it with the same arguments; process 0 moves. ``name``:
  the step's directory name, when not ``str(step)`` (an unfinished save).
  """
  if read_only:
    warn(directory, step, f'{reason}; skipped (read-only: left in place)')
    return
  path = directory / (name or str(step))
  destination = directory / QUARANTINE_DIR / str(step)
  suffix = 1
  while destination.exists():
    destination = directory / QUARANTINE_DIR / f'{step}-{suffix}'
    suffix += 1
  warn(directory, step,
       f'{reason}; skipped and moved to {destination} (nothing deleted)')
  multihost = jax.process_count() > 1
  if multihost:  # Every process has named the same destination.
    ocp.multihost.sync_global_processes(f'og_quarantine_{step}_named')
  if jax.process_index() == 0 and path.exists():
    destination.parent.mkdir(parents=True, exist_ok=True)
    path.rename(destination)
  if multihost:  # No process lists the steps again before the move.
    ocp.multihost.sync_global_processes(f'og_quarantine_{step}_moved')
