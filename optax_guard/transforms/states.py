"""Finding states of a type anywhere in an optimizer state.

Every reader of optax_guard state (:func:`optax_guard.metrics`,
:func:`optax_guard.diagnose`, loss scaling, the train step, recovery) asks the
same question: where in this optimizer state are the states of type X? An
optimizer state is a pytree whatever composed it (:func:`optax.chain`,
:func:`optax.multi_transform`, :class:`optax.MultiSteps`,
:func:`optax.inject_hyperparams`, :func:`optax.masked`), so one walk over its
nodes answers it for all of them; an :class:`flax.nnx.Optimizer` is unwrapped
first (flax is imported only when one could have been handed in).
"""

import sys
from typing import Any, Sequence, Union

import jax

KeyPath = tuple[Any, ...]


def loaded_nnx():
  """``flax.nnx`` if the caller has imported it, else ``None``.

  No NNX object can exist before flax is imported, so this never imports it.
  """
  return sys.modules.get('flax.nnx')


def pure_state(opt_state: Any) -> Any:
  """The plain pytree of an optimizer state.

  ``opt_state`` may be a state, an :class:`flax.nnx.Optimizer` (its
  ``opt_state``) or an NNX state of variables (turned into arrays).
  """
  nnx = loaded_nnx()
  if nnx is None:
    return opt_state
  if isinstance(opt_state, nnx.Optimizer):
    opt_state = opt_state.opt_state
  return nnx.as_pure(opt_state)


def find_states(
    opt_state: Any, types: Union[type, tuple[type, ...]]
) -> list[tuple[KeyPath, Any]]:
  """Every node of ``opt_state`` that is an instance of ``types``, with its path.

  Nodes nested inside a found node are found too (a clip state inside a
  guard state). The order is outermost first (by depth, then left to right),
  so the first of a type is the outermost.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> from optax_guard.transforms.guard import GuardState
    >>> from optax_guard.transforms.states import find_states, path_name
    >>> tx = optax.chain(optax.clip(1.0), og.guard(optax.sgd(0.1)))
    >>> found = find_states(tx.init({'w': jnp.ones(2)}), GuardState)
    >>> [path_name(path) for path, _ in found]
    ['[1]']

  Args:
    opt_state: an optimizer state, or an :class:`flax.nnx.Optimizer`.
    types: a type or a tuple of types.

  Returns:
    ``[(key path, node), ...]``; the path is relative to
    :func:`pure_state` of ``opt_state``.
  """
  root = pure_state(opt_state)
  found = []
  pending = [((), root)]
  while pending:
    prefix, node = pending.pop(0)
    if isinstance(node, types):
      found.append((prefix, node))
    inside = lambda x, node=node: x is not node and isinstance(x, types)
    children = jax.tree_util.tree_flatten_with_path(node, is_leaf=inside)[0]
    pending.extend(
        (prefix + path, child) for path, child in children if inside(child)
    )
  return sorted(found, key=lambda item: len(item[0]))


# Wrappers that keep state of their own across a step the guard inside them
# skips, and the composition to use instead: MultiSteps keeps a NaN
# micro-batch in its accumulator (0 * nan is nan) and lookahead moves its
# slow params on a sync step whatever the guard decided.
REFUSED_WRAPPERS = (
    ('MultiStepsState', 'inner_opt_state',
     'optax.MultiSteps(og.guard(...)) keeps a NaN micro-batch in its'
     ' accumulator and skips every later step; use og.accumulate(og.guard('
     '...), every_k) for gradient accumulation with a guard'),
    ('LookaheadState', 'fast_state',
     'optax.lookahead(og.guard(...)) moves its slow params on a sync step'
     ' the guard skipped; put the guard outside:'
     ' og.guard(optax.lookahead(...))'),
)


def check_guard_placement(opt_state: Any, guard_type: type) -> None:
  """Refuses a guard inside a wrapper of :data:`REFUSED_WRAPPERS`.

  Raises:
    ValueError: naming where the guard sits and the composition to use.
  """
  for path, _ in find_states(opt_state, guard_type):
    node = pure_state(opt_state)
    for key in path:
      name = getattr(key, 'name', None)
      for wrapper, field, why in REFUSED_WRAPPERS:
        if type(node).__name__ == wrapper and name == field:
          raise ValueError(
              f'The guard at {path_name(path)} sits inside {wrapper}: {why}.')
      node = _child(node, key)


def _child(node: Any, key: Any) -> Any:
  """The child of ``node`` under one key-path entry."""
  if isinstance(key, jax.tree_util.GetAttrKey):
    return getattr(node, key.name)
  if isinstance(key, jax.tree_util.SequenceKey):
    return node[key.idx]
  if isinstance(key, jax.tree_util.DictKey):
    return node[key.key]
  return jax.tree_util.tree_flatten_with_path(node)[0]  # unreachable in optax


def path_name(path: KeyPath) -> str:
  """``jax.tree_util.keystr`` of a path; ``''`` for the root."""
  return jax.tree_util.keystr(tuple(path))


def is_last_in(
    opt_state: Any, path: Sequence[Any], wrappers: tuple[type, ...] = ()
) -> bool:
  """Whether the node at ``path`` produces the final output of ``update``.

  True when every step down ``path`` enters the last element of a chain's
  tuple or the ``inner_state`` of one of ``wrappers`` (states of
  transformations that return their inner update as it is): then nothing
  runs after that node's ``update``.
  """
  node = pure_state(opt_state)
  for key in path:
    if type(node) is tuple and isinstance(key, jax.tree_util.SequenceKey):
      if key.idx != len(node) - 1:
        return False
      node = node[key.idx]
    elif (isinstance(key, jax.tree_util.GetAttrKey)
          and key.name == 'inner_state'
          and isinstance(node, wrappers)):
      node = getattr(node, 'inner_state')
    else:
      return False
  return True


def is_first_in(opt_state: Any, path: Sequence[Any]) -> bool:
  """Whether the node at ``path`` receives the raw input of ``update``.

  True when every step down ``path`` enters the first element of a chain's
  tuple: nothing runs before that node's ``update``.
  """
  node = pure_state(opt_state)
  for key in path:
    if not (type(node) is tuple and isinstance(key, jax.tree_util.SequenceKey)
            and key.idx == 0):
      return False
    node = node[0]
  return True
