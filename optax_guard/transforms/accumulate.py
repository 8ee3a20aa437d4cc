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

A model with state (BatchNorm statistics, EMA buffers) writes that state on
every micro-batch, before anyone knows whether its gradient will be applied.
Built with ``model_state=``, the state (:class:`HeldModelState`) keeps a copy
of the model state as it was when the macro step began, and :func:`model_state_to_keep` (which the
train steps call) gives the model state that exactly the applied
micro-batches produce: a dropped micro-batch's statistics are undone at once,
a skipped macro step's all together.
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


class HeldModelState(NamedTuple):
  """State of :func:`accumulate` built with ``model_state=``.

  A wrapper, so that an accumulation without model state keeps the
  checkpoint layout of :class:`AccumulateState` alone.

  Attributes:
    inner_state: the :class:`AccumulateState`.
    model_state: the floating leaves of the model state as it was when this
      macro step began (in ``jax.tree.leaves`` order).
  """

  inner_state: AccumulateState
  model_state: tuple[jax.Array, ...]


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


def _float_leaves(tree: Any) -> list[Any]:
  """The floating leaves of ``tree``, in ``jax.tree.leaves`` order."""
  return [leaf for leaf in jax.tree.leaves(tree) if _is_float(leaf)]


def _held_shapes(template: Any) -> tuple[tuple[Any, Any], ...]:
  """``(shape, dtype)`` of each floating leaf of ``template``."""
  return tuple((jnp.shape(leaf), jnp.result_type(leaf))
               for leaf in _float_leaves(template))


def _describe(leaves: Any) -> str:
  return ', '.join(f'{jnp.dtype(leaf.dtype).name}{list(jnp.shape(leaf))}'
                   for leaf in leaves) or 'none'


def model_state_to_keep(
    state_before: Any, state_after: Any, new_model_state: Any,
    old_model_state: Any, skipped: jax.Array,
) -> tuple[Any, Any]:
  """The model state that the applied micro-batches produce, and the new state.

  Called by the train steps after each micro-batch, with the optimizer
  states before and after it, the model state the forward pass returned and
  the one it started from, and whether the guard skipped (fresh only when a
  macro step ends). Without an :class:`AccumulateState` in the optimizer
  state, a step is a macro step: the model state is held where ``skipped``
  (:func:`optax_guard.train_step.hold_if_skipped` does the same). With one,
  the floating leaves of the returned model state are

  * as they were when the macro step began (the copy kept in
    ``HeldModelState.model_state``), when this micro-batch ended a macro
    step the guard skipped: none of its micro-batches was applied;
  * as they were before this micro-batch, when it was dropped;
  * the new ones otherwise.

  Other leaves (RNG counters, step counts) keep their new value.

  Args:
    state_before: the optimizer state before this micro-batch (pure).
    state_after: the optimizer state after it (pure).
    new_model_state: the model state the forward pass returned.
    old_model_state: the model state before this micro-batch.
    skipped: whether the guard skipped (a bool scalar).

  Returns:
    ``(model_state, state_after)``, ``state_after`` holding the copy of the
    model state for the macro step under way.

  Raises:
    ValueError: when the model state has floating leaves but the
      :func:`accumulate` in the optimizer was built without ``model_state=``
      (or with one of other leaves), or the optimizer holds two of them.
  """
  is_acc = lambda node: isinstance(node, (HeldModelState, AccumulateState))
  found = [n for n in jax.tree.leaves(state_after, is_leaf=is_acc)
           if is_acc(n)]
  old = _float_leaves(old_model_state)
  if not found:
    return hold_floats(skipped, new_model_state, old_model_state), state_after
  if len(found) > 1:
    raise ValueError(
        f'The optimizer state holds {len(found)} og.accumulate states; a'
        ' train step with model state can follow one.')
  if not old:
    return new_model_state, state_after
  copy = getattr(found[0], 'model_state', ())
  if [(leaf.shape, leaf.dtype) for leaf in copy] != [
      (jnp.shape(leaf), jnp.result_type(leaf)) for leaf in old]:
    raise ValueError(
        'og.accumulate keeps a copy of the model state to undo the statistics'
        ' of micro-batches whose gradients are not applied, so it needs the'
        ' model state when it is built: og.accumulate(inner, every_k,'
        ' model_state=...) with the state the step holds: for NNX the'
        ' floating variables outside the optimizer\'s wrt, RNG state aside'
        ' (e.g. nnx.state(model, nnx.BatchStat)); for Linen the mutable'
        ' collections (e.g. {\'batch_stats\': ...}).'
        f' It holds floating leaves [{_describe(copy)}]; the model state has'
        f' [{_describe(old)}].')

  def keep(before, after):
    if not is_acc(after):
      return after
    begins = before.inner_state.micro_step == 0
    copy = [jnp.where(begins, o, c) for o, c in zip(old, before.model_state)]
    # micro_step returns to 0 exactly when the macro step ends.
    undo_macro = (after.inner_state.micro_step == 0) & skipped
    dropped = after.inner_state.dropped
    kept.extend(
        jnp.where(undo_macro, c, jnp.where(dropped, o, n))
        for c, o, n in zip(copy, old, _float_leaves(new_model_state)))
    return after._replace(model_state=tuple(copy))

  kept: list[jax.Array] = []
  state_after = jax.tree.map(keep, state_before, state_after, is_leaf=is_acc)
  return _with_float_leaves(new_model_state, kept), state_after


def hold_floats(skipped: jax.Array, new_tree: Any, old_tree: Any) -> Any:
  """``old_tree``'s floating leaves where ``skipped``, else ``new_tree``'s.

  Other leaves (RNG counters, step counts) keep their new value; one
  ``jnp.where`` per leaf. The trees must have the same structure.
  """

  def hold(new, old):
    if not _is_float(new):
      return new
    return jnp.where(skipped, old, new)

  return jax.tree.map(hold, new_tree, old_tree)


def _with_float_leaves(tree: Any, floats: list[jax.Array]) -> Any:
  """``tree`` with its floating leaves replaced, in order, by ``floats``."""
  leaves, treedef = jax.tree.flatten(tree)
  replacements = iter(floats)
  return jax.tree.unflatten(
      treedef, [next(replacements) if _is_float(leaf) else leaf
                for leaf in leaves])


def accumulate(
    inner: optax.GradientTransformation, every_k: int, *,
    model_state: Any = None,
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

  With model state (BatchNorm statistics), pass it as ``model_state=``: the
  train steps (:func:`optax_guard.make_train_step` with ``has_state``,
  :func:`optax_guard.make_nnx_train_step`) then return the model state that
  exactly the applied micro-batches produce (:func:`model_state_to_keep`).

  Args:
    inner: the optimizer; a guard, or anything else (then wrapped in
      :func:`optax_guard.skip_nonfinite`).
    every_k: micro-batches per macro step (an int >= 1).
    model_state: the model's state, or a pytree with the same floating
      leaves (shapes and dtypes are read, not values): for NNX
      ``nnx.state(model, nnx.BatchStat)`` (whatever the step holds: the
      floating variables outside the optimizer's ``wrt``, RNG state aside),
      for Linen the mutable collections (``{'batch_stats': ...}``).
      ``None`` for a model without state.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is an
    :class:`AccumulateState` (with ``model_state=``, a
    :class:`HeldModelState` around it), with a fused update-and-apply form
    for :func:`optax_guard.make_train_step`.

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
  held = () if model_state is None else _held_shapes(model_state)
  if model_state is not None and not held:
    raise ValueError(
        f'model_state has no floating leaves to hold, got {model_state!r:.200};'
        ' pass None for a model without state, or the state the step holds,'
        ' e.g. nnx.state(model, nnx.BatchStat) or {\'batch_stats\': ...}.')
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

  if model_state is None:
    return _fused.FusedGradientTransformation(init_fn, update_fn)

  def held_init_fn(params):
    # Zeros, fresh in every init: the copy is taken when a macro step
    # begins, before it is read.
    return HeldModelState(init_fn(params), tuple(
        jnp.zeros(shape, dtype) for shape, dtype in held))

  def held_update_fn(updates, state, params=None, **extra_args):
    output, inner_state = update_fn(updates, state.inner_state, params,
                                    **extra_args)
    return output, state._replace(inner_state=inner_state)

  return _fused.FusedGradientTransformation(held_init_fn, held_update_fn)
