"""Update and apply in one: the form a train step uses.

An optax transformation returns ``updates`` that the caller adds to the
params. For a guard that is one tree too many: the skip decision sits in a
``lax.cond``, so the ``updates`` leaving it are a materialised buffer (on CPU
also a fresh allocation, page-faulted every step). A transformation that also
knows how to *apply* its update can put the ``lax.cond`` around the whole of
``inner.update`` and ``optax.apply_updates``: the params and the optimizer
state are then updated in place, in the same fused pass as the bare optimizer.

A transformation offers that form by carrying it as the attribute
``fused_apply`` of its update function (so that it survives
:func:`optax.with_extra_args_support`, which returns such a transformation
unchanged). :func:`update_and_apply` returns it, or the plain composition.
"""

from typing import Any, Callable

import optax

ApplyFn = Callable[..., tuple[Any, Any]]

_ATTRIBUTE = 'fused_apply'


def with_fused_apply(
    tx: optax.GradientTransformationExtraArgs, apply_fn: ApplyFn
) -> optax.GradientTransformationExtraArgs:
  """Marks ``tx`` as able to apply its own update with ``apply_fn``.

  Args:
    tx: the transformation; its ``update`` must be a function made for it
      (the attribute is set on that function).
    apply_fn: ``apply_fn(updates, state, params, **extra_args) -> (new_params,
      new_state)``, equal to ``tx.update`` followed by
      :func:`optax.apply_updates`.

  Returns:
    ``tx`` itself.
  """
  setattr(tx.update, _ATTRIBUTE, apply_fn)
  return tx


def update_and_apply(tx: optax.GradientTransformation) -> ApplyFn:
  """``apply(updates, state, params, **extra_args) -> (new_params, new_state)``.

  The fused form when ``tx`` offers one, otherwise ``tx.update`` followed by
  :func:`optax.apply_updates`.
  """
  fused = getattr(tx.update, _ATTRIBUTE, None)
  if fused is not None:
    return fused
  tx = optax.with_extra_args_support(tx)

  def apply(updates, state, params, **extra_args):
    updates, state = tx.update(updates, state, params, **extra_args)
    return optax.apply_updates(params, updates), state

  return apply
