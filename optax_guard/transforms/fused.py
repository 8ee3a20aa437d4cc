"""Update and apply in one: the form a train step uses.

An optax transformation returns ``updates`` that the caller adds to the
params. For a guard that is one tree too many: the skip decision sits in a
``lax.cond``, so the ``updates`` leaving it are a materialised buffer (on CPU
also a fresh allocation, page-faulted every step). A transformation that also
knows how to *apply* its update can put the ``lax.cond`` around the whole of
``inner.update`` and ``optax.apply_updates``: the params and the optimizer
state are then updated in place, in the same fused pass as the bare optimizer.

The protocol is a type and an extra argument. A
:class:`FusedGradientTransformation` is an
:class:`optax.GradientTransformationExtraArgs` whose ``update`` also accepts
the extra argument ``fuse_apply=True`` (:data:`FUSE_APPLY`) and then returns
``(new_params, new_state)``, equal to ``update`` followed by
:func:`optax.apply_updates`. Because :func:`optax.chain` hands extra
arguments to every member, a chain whose last member is fused returns new
params too when called with ``fuse_apply=True``; members that do not know
the argument ignore it. :func:`optax_guard.make_train_step` decides where
that holds by the state types it finds (see
:func:`optax_guard.train_step.plan_apply`).
"""

from typing import Any, Callable

import optax

ApplyFn = Callable[..., tuple[Any, Any]]

# The extra argument that asks a fused transformation for new params.
FUSE_APPLY = 'fuse_apply'


class FusedGradientTransformation(optax.GradientTransformationExtraArgs):
  """A transformation that can apply its own update.

  ``update(updates, state, params, fuse_apply=True, **extra_args)`` returns
  ``(new_params, new_state)``: ``update`` followed by
  :func:`optax.apply_updates`, with the same state. Without ``fuse_apply``
  (or with ``False``) it is an ordinary transformation.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> from optax_guard.transforms.fused import FusedGradientTransformation
    >>> tx = og.guard(optax.sgd(0.5))
    >>> isinstance(tx, FusedGradientTransformation)
    True
    >>> params = {'w': jnp.ones(2)}
    >>> new_params, _ = tx.update({'w': jnp.ones(2)}, tx.init(params), params,
    ...                           fuse_apply=True)
    >>> new_params['w'].tolist()
    [0.5, 0.5]
  """


def fused_apply(tx: optax.GradientTransformation) -> ApplyFn:
  """``apply(updates, state, params, **extra_args) -> (new_params, new_state)``
  through ``tx.update(..., fuse_apply=True)``.

  Only valid where the output of ``tx.update`` is that of a fused
  transformation (``tx`` is one, or one is last in ``tx``).
  """
  tx = optax.with_extra_args_support(tx)

  def apply(updates, state, params, **extra_args):
    return tx.update(updates, state, params, **{FUSE_APPLY: True},
                     **extra_args)

  return apply


def unfused_apply(tx: optax.GradientTransformation) -> ApplyFn:
  """``tx.update`` followed by :func:`optax.apply_updates`."""
  tx = optax.with_extra_args_support(tx)

  def apply(updates, state, params, **extra_args):
    updates, state = tx.update(updates, state, params, **extra_args)
    return optax.apply_updates(params, updates), state

  return apply


def update_and_apply(tx: optax.GradientTransformation) -> ApplyFn:
  """The fused form of ``tx`` if it is a :class:`FusedGradientTransformation`,
  else ``tx.update`` followed by :func:`optax.apply_updates`.

  Recognises ``tx`` by type only; :func:`optax_guard.train_step.
  plan_apply` also finds a fused transformation last in a chain.
  """
  if isinstance(tx, FusedGradientTransformation):
    return fused_apply(tx)
  return unfused_apply(tx)
