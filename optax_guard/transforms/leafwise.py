"""The leaf-granular hold of ``og.guard(..., granularity="leaf")``.

A NaN/Inf gradient holds only the leaves it is in: their gradients enter
neither the norm nor the clip, their updates are zero, and the slices of the
inner state that mirror them (Adam's moments) keep their old values, while
the healthy leaves update.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_guard.transforms import numerics as _numerics


def _is_none(x: Any) -> bool:
  return x is None


class LeafHealth(NamedTuple):
  """Which leaves of one step's gradients take part in the update.

  Attributes:
    healthy: a tree like the gradients: a boolean array per floating leaf,
      ``True`` (python) for other leaves, ``None`` where the gradient is.
    norm: the global norm of the healthy leaves (bit for bit the global
      norm when every leaf is finite).
    any_healthy: whether some floating leaf is finite (``True`` without
      floating leaves).
  """

  healthy: Any
  norm: jax.Array
  any_healthy: jax.Array


def assess(grads: Any, stats: _numerics.NormStats) -> LeafHealth:
  """The healthy leaves of ``grads``, from its :class:`NormStats`."""
  healthy = jax.tree.map(
      lambda g, n: None if g is None else (True if n is None else jnp.isfinite(n)),
      grads, stats.leaf_norms, is_leaf=_is_none,
  )
  norms = jax.tree.leaves(stats.leaf_norms)
  if not norms:
    return LeafHealth(healthy, stats.global_norm, jnp.ones((), jnp.bool_))
  finite = jnp.isfinite(jnp.stack(norms))
  norm = jnp.where(
      stats.finite,
      stats.global_norm,
      _numerics.combine_norms(
          [jnp.where(jnp.isfinite(n), n, 0) for n in norms],
          stats.global_norm.dtype,
      ),
  )
  return LeafHealth(healthy, norm, jnp.any(finite))


def keep_healthy(tree: Any, healthy: Any, held: Any = None) -> Any:
  """``tree`` on healthy leaves; ``held`` (zeros by default) on the others."""
  if held is None:
    held = jax.tree.map(jnp.zeros_like, tree)
  return jax.tree.map(
      lambda x, old, ok: x if ok is True else jnp.where(ok, x, old),
      tree, held, healthy,
  )


def hold_parameter_slices(new_state: Any, old_state: Any, grads: Any,
                          healthy: Any) -> Any:
  """Restores the slices of ``old_state`` that mirror unhealthy leaves.

  A subtree of the state mirrors the parameters when it has the tree
  structure and leaf shapes of the gradients (Adam's ``mu`` and ``nu``, a
  momentum, an EMA of the params). Other leaves (step counts) keep their new
  value. The slices are chosen with ``jnp.where``, which makes XLA write the
  new moments to fresh buffers: a leaf-granular update costs more than a
  bare one.
  """
  structure = jax.tree.structure(grads)
  shapes = [jnp.shape(x) for x in jax.tree.leaves(grads)]

  def mirrors(node):
    return jax.tree.structure(node) == structure and [
        jnp.shape(x) for x in jax.tree.leaves(node)
    ] == shapes

  def hold(new, old):
    return keep_healthy(new, healthy, old) if mirrors(new) else new

  return jax.tree.map(hold, new_state, old_state, is_leaf=mirrors)


def healthy_vector(healthy: Any) -> jax.Array:
  """Per floating leaf, whether it is healthy, as one boolean vector (the
  order of :func:`optax_guard.transforms.numerics.leaf_vector`)."""
  flags = [h for h in jax.tree.leaves(healthy) if h is not True]
  if not flags:
    return jnp.zeros((0,), jnp.bool_)
  return jnp.stack(flags)
