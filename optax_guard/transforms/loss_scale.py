"""Dynamic loss scaling for float16 training, as an Optax transformation."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from optax_guard.transforms import fused as _apply
from optax_guard.transforms import guard as _guard


class LossScaleState(NamedTuple):
  """State of :func:`dynamic_loss_scale`.

  Attributes:
    inner_state: the state of the guarded inner optimizer (a
      :class:`optax_guard.GuardState`), unchanged by a skipped step.
    loss_scale: the factor the next step multiplies its loss by (float32).
    good_steps: finite steps since the scale last changed.
  """

  inner_state: Any
  loss_scale: jax.Array
  good_steps: jax.Array


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    initial_scale: float = 2.0**15,
    growth_interval: int = 2000,
    factor: float = 2.0,
    min_scale: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Dynamic loss scaling for float16: skip and shrink on overflow, then grow.

  The train step multiplies the loss by :func:`loss_scale` (``initial_scale``
  at first) before differentiating, so that small float16 gradients do not
  flush to zero; this transformation divides the gradients by the same
  scale (in float32, inside the guard's update, where it fuses into the
  optimizer's pass) and hands them to ``inner``. A step whose gradients or
  loss are not finite is skipped (zero update, every inner state leaf
  unchanged bit for bit) and the scale is divided by ``factor`` (not below
  ``min_scale``); after ``growth_interval`` finite steps in a row it is
  multiplied by ``factor`` (never to infinity). :func:`optax_guard.
  make_train_step` scales the loss by itself when the optimizer state holds
  this transformation.

  ``inner`` is guarded: an :func:`optax_guard.guard` (or
  :func:`optax_guard.skip_nonfinite`, :func:`optax_guard.skip_spikes`) is
  used as is, so that the overflow check shares its single pass over the
  gradients; any other optimizer is wrapped in
  :func:`optax_guard.skip_nonfinite`. A spike skipped by the guard counts as
  a finite step. Put this transformation outermost: a guard outside it
  would see scaled gradients.

  Compared with ``jmp.DynamicLossScale``: the same rule (shrink by
  ``factor`` to at least ``min_scale`` on overflow, grow by ``factor``
  after ``period`` finite steps), but the skip is an exact ``lax.cond``
  rollback inside the optimizer instead of a ``select_tree`` over params and
  state in user code. Compared with PyTorch's ``torch.amp.GradScaler``
  (``init_scale=2**16``, ``growth_factor=2``, ``backoff_factor=0.5``,
  ``growth_interval=2000``): the same skipped ``optimizer.step()`` and
  counter reset, with one ``factor`` for both directions, a ``min_scale``
  floor, and a default of ``2**15`` so that the scale times a float16 loss
  gradient of 1 stays finite (65536 is not a float16).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> tx = og.dynamic_loss_scale(optax.sgd(0.1), initial_scale=1024.0,
    ...                            growth_interval=2)
    >>> params = {'w': jnp.ones(2, jnp.float32)}
    >>> state = tx.init(params)
    >>> float(og.loss_scale(state))
    1024.0
    >>> _, state = tx.update({'w': jnp.array([jnp.inf, 0.0])}, state, params)
    >>> float(og.loss_scale(state)), bool(og.metrics(state)['skipped'])
    (512.0, True)
    >>> for _ in range(2):
    ...   _, state = tx.update({'w': jnp.array([512.0, 0.0])}, state, params)
    >>> float(og.loss_scale(state))
    1024.0

  Args:
    inner: the optimizer; a guard, or anything else (then wrapped in
      :func:`optax_guard.skip_nonfinite`).
    initial_scale: the first loss scale (> 0).
    growth_interval: finite steps in a row before the scale grows (>= 1).
    factor: the growth and shrink factor (> 1).
    min_scale: the scale never shrinks below this (> 0, at most
      ``initial_scale``).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`LossScaleState`.

  References:
    Micikevicius et al., `Mixed Precision Training
    <https://arxiv.org/abs/1710.03740>`_, 2018
  """
  if not 0 < initial_scale < float('inf'):
    raise ValueError(
        f'initial_scale must be finite and > 0, got {initial_scale!r}.'
    )
  if not isinstance(growth_interval, int) or growth_interval < 1:
    raise ValueError(
        f'growth_interval must be an int >= 1, got {growth_interval!r}.'
    )
  if not 1 < factor < float('inf'):
    raise ValueError(f'factor must be finite and > 1, got {factor!r}.')
  if not 0 < min_scale <= initial_scale:
    raise ValueError(
        f'min_scale must be in (0, initial_scale={initial_scale}], got'
        f' {min_scale!r}.'
    )
  guarded = inner if _guard.is_guard(inner) else _guard.skip_nonfinite(inner)
  guarded_apply = _apply.update_and_apply(guarded)

  def init_fn(params):
    return LossScaleState(
        inner_state=guarded.init(params),
        loss_scale=jnp.full((), initial_scale, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
    )

  def adjust(state: LossScaleState, inner_state) -> LossScaleState:
    overflow = inner_state.nonfinite
    scale = state.loss_scale
    good_steps = state.good_steps + 1
    grown = scale * factor
    grow = ~overflow & (good_steps >= growth_interval) & jnp.isfinite(grown)
    shrunk = jnp.maximum(scale / factor, jnp.float32(min_scale))
    return LossScaleState(
        inner_state=inner_state,
        loss_scale=jnp.where(overflow, shrunk, jnp.where(grow, grown, scale)),
        good_steps=jnp.where(overflow | grow, 0, good_steps),
    )

  def update_fn(updates, state, params=None, **extra_args):
    updates, inner_state = guarded.update(
        updates, state.inner_state, params, loss_scale=state.loss_scale,
        **extra_args,
    )
    return updates, adjust(state, inner_state)

  def apply_fn(updates, state, params, **extra_args):
    params, inner_state = guarded_apply(
        updates, state.inner_state, params, loss_scale=state.loss_scale,
        **extra_args,
    )
    return params, adjust(state, inner_state)

  return _apply.with_fused_apply(
      optax.GradientTransformationExtraArgs(init_fn, update_fn), apply_fn
  )


def find_loss_scale_state(opt_state: Any) -> Optional[LossScaleState]:
  """The outermost :class:`LossScaleState` in ``opt_state``, or ``None``."""
  is_scale_state = lambda x: isinstance(x, LossScaleState)
  found = [
      node
      for node in jax.tree.leaves(nnx.as_pure(opt_state), is_leaf=is_scale_state)
      if is_scale_state(node)
  ]
  return found[0] if found else None


def loss_scale(opt_state: Any) -> jax.Array:
  """The current loss scale held in ``opt_state``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> tx = og.dynamic_loss_scale(optax.adam(1e-3))
    >>> float(og.loss_scale(tx.init({'w': jnp.ones(2)})))
    32768.0

  Args:
    opt_state: an optimizer state holding a :func:`dynamic_loss_scale` state
      (anywhere), or an :class:`flax.nnx.Optimizer`.

  Returns:
    The float32 scale.

  Raises:
    ValueError: if ``opt_state`` holds no loss scale.
  """
  if isinstance(opt_state, nnx.Optimizer):
    opt_state = opt_state.opt_state
  state = find_loss_scale_state(opt_state)
  if state is None:
    raise ValueError(
        'opt_state holds no loss scale: build the optimizer with'
        ' og.dynamic_loss_scale.'
    )
  return state.loss_scale
