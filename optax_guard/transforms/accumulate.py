"""Gradient accumulation that drops a bad micro-batch and keeps going.

``optax.MultiSteps(og.guard(inner), k)`` cannot be guarded from the inside:
MultiSteps adds each micro-batch gradient into its accumulator before the
guard sees anything, and resets the accumulator by multiplying it with zero,
which leaves a NaN a NaN. One bad micro-batch therefore poisons every later
macro step, which the guard then skips until it reports ``diverged``.

:func:`accumulate` checks each micro-batch *before* it enters the
accumulator: a micro-batch whose gradient or loss holds a NaN/Inf is dropped
and counted, the others are summed in float32 (or wider), and every ``every_k``
micro-batches drawn the guard receives the mean of the accepted ones (and the
mean of their losses as ``value=``). The guard then takes its usual decision
on the macro step: spike check, clip, inner update, exact rollback. A macro
step whose micro-batches were all dropped hands the guard a NaN gradient, so
it is skipped and counts toward ``diverged`` like any other bad step.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_guard.transforms import arguments as _arguments
from optax_guard.transforms import fused as _fused
from optax_guard.transforms import guard as _guard
from optax_guard.transforms import numerics as _numerics
from optax_guard.transforms import states as _states


class AccumulateState(NamedTuple):
  """State of :func:`accumulate`.

  Attributes:
    inner_state: the guard's state, changed only at the end of a macro step.
    grad_sums: per floating leaf, the sum of the accepted micro-batch
      gradients of this macro step, in float32 or wider (``None`` for other
      leaves).
    loss_sum: the sum of the accepted micro-batch losses (float32).
    micro_step: micro-batches drawn in this macro step so far.
    accepted: micro-batches of this macro step that entered the sums.
    dropped: whether the last micro-batch was dropped.
    total_dropped: micro-batches dropped since ``init`` (saturating).
  """

  inner_state: Any
  grad_sums: Any
  loss_sum: jax.Array
  micro_step: jax.Array
  accepted: jax.Array
  dropped: jax.Array
  total_dropped: jax.Array


_is_float = _numerics.is_float_leaf


def _is_none(x: Any) -> bool:
  return x is None


def _all_finite(tree: Any, value: jax.Array | None) -> jax.Array:
  """Whether every floating element of ``tree`` and ``value`` is finite."""
  return _numerics.all_finite((tree, value))


def _holds_guard(inner: optax.GradientTransformation) -> bool:
  """Whether ``inner``'s state holds a guard (its structure only)."""
  structure = jax.eval_shape(optax.with_extra_args_support(inner).init,
                             {'w': jnp.zeros(1)})
  return bool(_states.find_states(structure, _guard.GuardState))


def _zero_sums(params: Any) -> Any:
  """float32-or-wider zeros for each floating leaf, ``None`` elsewhere."""

  def zeros(x):
    if not _is_float(x):
      return None
    x = jnp.asarray(x)
    return jnp.zeros(x.shape, _numerics.accumulation_dtype(x.dtype))

  return jax.tree.map(zeros, params, is_leaf=_is_none)


def _add_if(sums: Any, grads: Any, ok: jax.Array) -> Any:
  """``sums + grads`` where ``ok``; ``sums`` (NaN-free) otherwise."""

  def add(total, grad):
    if total is None:
      return None
    return total + jnp.where(ok, jnp.asarray(grad).astype(total.dtype), 0)

  return jax.tree.map(add, sums, grads, is_leaf=_is_none)


def _mean_like(sums: Any, count: jax.Array, grads: Any) -> Any:
  """``sums / count`` in each gradient's dtype (NaN when ``count`` is 0).

  Non-floating leaves are taken from this micro-batch as they are.
  """

  def mean(total, grad):
    if total is None:
      return grad
    return (total / count.astype(total.dtype)).astype(jnp.asarray(grad).dtype)

  return jax.tree.map(mean, sums, grads, is_leaf=_is_none)


def accumulate(
    inner: optax.GradientTransformation, every_k: int
) -> optax.GradientTransformationExtraArgs:
  """Averages ``every_k`` micro-batches, dropping those with a NaN/Inf.

  Each call to ``update`` takes one micro-batch gradient (and its loss as
  ``value=``). A micro-batch whose gradient or loss is not finite is
  dropped: it enters neither the gradient sum nor the loss sum, and the
  accumulator stays as it was. On every ``every_k``-th micro-batch drawn,
  ``inner`` (a guard) runs once on the mean gradient of the accepted
  micro-batches, with their mean loss as ``value=``, and its update is
  returned; the other calls return zero updates and leave ``inner``'s state
  alone (``inner`` does not even run, unlike in :class:`optax.MultiSteps`).
  The macro steps keep a fixed stride of ``every_k`` micro-batches drawn, so
  they stay aligned with the data. If all micro-batches of a macro step were
  dropped the guard receives a NaN gradient: it skips the step and counts it
  toward ``diverged``.

  ``inner`` is guarded as :func:`optax_guard.dynamic_loss_scale` does it: a
  guard (:func:`optax_guard.guard`, :func:`optax_guard.skip_nonfinite`,
  :func:`optax_guard.skip_spikes`) is used as is; anything else is wrapped
  in :func:`optax_guard.skip_nonfinite`. Spike checks and clipping thus see
  the macro gradient, as they would with one large batch.

  This is the composition to use for gradient accumulation with a guard;
  ``optax.MultiSteps(og.guard(...))`` stalls after one NaN micro-batch.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> from optax_guard.transforms.accumulate import accumulate
    >>> tx = accumulate(og.guard(optax.sgd(1.0)), every_k=3)
    >>> params = {'w': jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for g in (1.0, float('nan'), 3.0):
    ...   updates, state = tx.update({'w': jnp.full(2, g)}, state, params)
    >>> updates['w'].tolist(), int(state.total_dropped)
    ([-2.0, -2.0], 1)

  Args:
    inner: the optimizer; a guard, or anything else (then wrapped in
      :func:`optax_guard.skip_nonfinite`).
    every_k: micro-batches per macro step (an int >= 1).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is an
    :class:`AccumulateState`, with a fused update-and-apply form for
    :func:`optax_guard.make_train_step`.

  References:
    Goyal et al., `Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour
    <https://arxiv.org/abs/1706.02677>`_, 2017 (the mean over micro-batches
    as the large-batch gradient); :class:`optax.MultiSteps` (the
    accumulation this replaces when a guard is involved).
  """
  _arguments.transformation('inner', inner,
                            example='og.guard(optax.adam(1e-3))')
  _arguments.count('every_k', every_k, hint=' For a schedule of micro-batch'
                   ' counts use optax.MultiSteps without a guard.')
  guarded = optax.with_extra_args_support(
      inner if _holds_guard(inner) else _guard.skip_nonfinite(inner))

  def init_fn(params):
    return AccumulateState(
        inner_state=guarded.init(params),
        grad_sums=_zero_sums(params),
        loss_sum=jnp.zeros((), jnp.float32),
        micro_step=jnp.zeros((), jnp.int32),
        accepted=jnp.zeros((), jnp.int32),
        dropped=jnp.zeros((), jnp.bool_),
        total_dropped=jnp.zeros((), jnp.int32),
    )

  def take(grads, state, value):
    """Adds this micro-batch; returns what the macro step needs."""
    if value is not None:
      # Before the float32 cast, which would hide an integer or complex loss.
      _guard.check_loss(value, 'value=', 'pass the loss alone, not the'
                        ' (loss, aux) tuple.')
    loss = None if value is None else jnp.asarray(value, jnp.float32)
    ok = _all_finite(grads, loss)
    sums = _add_if(state.grad_sums, grads, ok)
    loss_sum = state.loss_sum
    if loss is not None:
      loss_sum = loss_sum + jnp.where(ok, loss, 0)
    accepted = state.accepted + ok.astype(jnp.int32)
    emit = state.micro_step == every_k - 1
    mean_loss = None if loss is None else loss_sum / accepted
    return ok, sums, loss_sum, accepted, emit, mean_loss

  def next_state(state, inner_state, ok, sums, loss_sum, accepted, emit):
    restart = lambda new, zero: jnp.where(emit, zero, new)
    return AccumulateState(
        inner_state=inner_state,
        grad_sums=jax.tree.map(lambda s: restart(s, jnp.zeros_like(s)), sums),
        loss_sum=restart(loss_sum, jnp.zeros_like(loss_sum)),
        micro_step=jnp.where(emit, 0, state.micro_step + 1),
        accepted=restart(accepted, jnp.zeros_like(accepted)),
        dropped=~ok,
        total_dropped=jnp.where(
            ok, state.total_dropped,
            optax.safe_increment(state.total_dropped)),
    )

  def update_fn(updates, state, params=None, *, value=None, fuse_apply=False,
                **extra_args):
    ok, sums, loss_sum, accepted, emit, mean_loss = take(updates, state, value)
    # fuse_apply reaches the guard, which then returns new params (see
    # optax_guard.train_step.plan_apply, which passes it only when the guard
    # is what inner runs last).
    fused = {_fused.FUSE_APPLY: True} if fuse_apply else {}

    def macro_step(params, inner_state):
      return guarded.update(_mean_like(sums, accepted, updates), inner_state,
                            params, value=mean_loss, **fused, **extra_args)

    def micro_step(params, inner_state):
      # The inner state in the dtypes the macro step gives it (an injected
      # float32 learning rate promotes a bfloat16 moment to float32).
      output_shape, state_shape = jax.eval_shape(macro_step, params,
                                                 inner_state)
      inner_state = _guard.cast_like(inner_state, state_shape)
      if fuse_apply:
        return params, inner_state
      return optax.tree.zeros_like(output_shape), inner_state

    output, inner_state = jax.lax.cond(emit, macro_step, micro_step, params,
                                       state.inner_state)
    return output, next_state(state, inner_state, ok, sums, loss_sum,
                              accepted, emit)

  return _fused.FusedGradientTransformation(init_fn, update_fn)
