"""What a training state is, and how it is saved, compared and restored.

The one module that knows the state's shape: :class:`TrainState` (step,
params, optimizer state, optional RNG key and model state), the tree Orbax saves for it
(:func:`state_tree`), the comparison of a saved tree with a restore target
(a difference is the user's change, a ``ValueError`` naming it; only
``cast_dtypes`` bridges float dtypes), and the checks of what Orbax read
back (a leaf of another shape or dtype is damage).
"""

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from optax_guard.host.integrity import Damage


class TrainState(NamedTuple):
  """What one checkpoint restores: the step and the arrays of training.

  Attributes:
    step: loop steps done so far (batches drawn from the data iterator).
    params: the parameters (any pytree of arrays, sharded or not).
    opt_state: the optimizer state, e.g. ``tx.init(params)``.
    rng: an optional PRNG key (typed or raw), saved and restored with the rest.
    model_state: the model's state besides its parameters, or ``None``: a
      Linen model's mutable collections (``{'batch_stats': ...}``), an NNX
      model's non-parameter variables (BatchNorm statistics, RNG streams).
      With it, :func:`optax_guard.fit` calls ``train_step(params, opt_state,
      model_state, batch)`` (see :func:`optax_guard.make_train_step`'s
      ``has_state``); it is saved, restored and rolled back with the rest.
  """

  step: int
  params: Any
  opt_state: Any
  rng: Optional[jax.Array] = None
  model_state: Any = None


def from_arrays(step: int, arrays: Mapping[str, Any],
                target: TrainState) -> TrainState:
  """The state of ``step`` from restored ``arrays``; a field that was not
  saved (a plain Orbax step without it) comes from ``target``."""
  return TrainState(
      step=step,
      params=arrays['params'],
      opt_state=arrays.get('opt_state', target.opt_state),
      rng=arrays.get('rng', target.rng),
      model_state=arrays.get('model_state', target.model_state),
  )


def state_tree(state: TrainState) -> dict[str, Any]:
  tree = {'params': state.params, 'opt_state': state.opt_state}
  if state.rng is not None:
    tree['rng'] = state.rng
  if state.model_state is not None:
    tree['model_state'] = state.model_state
  return tree


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


def tree_differences(
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


def abstract_target(tree: Any, casts: Mapping[tuple[str, ...], np.dtype]) -> Any:
  """The restore target: ``tree``'s shapes and shardings, saved dtypes."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  if not casts:
    return abstract
  flat = ocp.tree.to_flat_dict(abstract)
  for key, dtype in casts.items():
    leaf = flat[key]
    flat[key] = jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
  return ocp.tree.from_flat_dict(flat, target=abstract)


def check_restored_leaves(restored: Any, tree: Any,
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
    raise Damage(
        f'{"/".join(map(str, key))} restored as {_describe_leaf(leaf)},'
        f' the target is {saved} (damaged array metadata)'
    )


def _describe_leaf(leaf: Any) -> str:
  return f'{leaf.dtype}{list(np.shape(leaf))}'


def cast_like(restored: Any, tree: Any) -> Any:
  return jax.tree.map(
      lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype),
      restored, tree,
  )


def check_tree(step: int, directory: Any, saved: Mapping[Any, Any],
               tree: Any, cast_dtypes: bool):
  """Raises ValueError naming each difference; returns the dtype casts."""
  differences, casts = tree_differences(
      saved, ocp.tree.to_flat_dict(tree), cast_dtypes
  )
  if differences:
    shown = '\n  '.join(differences[:20])
    more = len(differences) - 20
    raise ValueError(
        f'Checkpoint step {step} in {directory} holds a different'
        f' tree than the restore target; nothing was moved.'
        f' {len(differences)} difference(s):\n  {shown}'
        + (f'\n  ... and {more} more' if more > 0 else '') +
        '\nBuild the target as the saved state was built (same model,'
        ' dtypes and optimizer, e.g. tx.init(params)), or start in a new'
        ' directory.'
    )
  return casts
