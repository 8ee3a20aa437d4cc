"""Dynamic loss scaling for float16 training, as an Optax transformation."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_guard.transforms import arguments as _arguments
from optax_guard.transforms import fused as _fused
from optax_guard.transforms import guard as _guard
from optax_guard.transforms import states as _states


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


# The largest scale whose inverse is a normal float32 (2**-126 is the
# smallest): above it 1/scale is subnormal, which CPUs and accelerators flush
# to zero, and every unscaled gradient (and update) would be zero.
MAX_SCALE = 2.0**126


def scale_ceiling(tree: Any) -> float:
  """The largest loss scale for gradients with the dtypes of ``tree``.

  :data:`MAX_SCALE`, lowered for a narrow gradient dtype to the largest
  power of two that dtype holds (``2**15`` for float16): the scale itself,
  and a scaled gradient of magnitude up to one, are then finite numbers of
  the gradient dtype, so growth alone never turns a unit gradient into an
  ``inf``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_guard.transforms.loss_scale import scale_ceiling
    >>> scale_ceiling({'w': jnp.ones(2, jnp.float16)}) == 2.0**15
    True
    >>> scale_ceiling({'w': jnp.ones(2, jnp.bfloat16)}) == 2.0**126
    True
  """
  ceiling = MAX_SCALE
  for leaf in jax.tree.leaves(tree):
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.inexact):
      ceiling = min(ceiling, 2.0**(jnp.finfo(dtype).maxexp - 1))
  return ceiling


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
  multiplied by ``factor``, never above :func:`scale_ceiling`: ``2**126``
  (:data:`MAX_SCALE`, the largest scale whose inverse is a normal float32;
  above it the unscaled gradients would flush to zero), or for float16
  gradients ``2**15``, the largest power of two float16 holds. The count of finite steps restarts at
  every growth interval, whether the scale grew or sat at its ceiling, as
  in ``torch.amp.GradScaler`` and ``jmp``. :func:`optax_guard.
  make_train_step` scales the loss by itself when the optimizer state holds
  this transformation.

  ``inner`` is guarded: a guard it holds (:func:`optax_guard.guard`,
  :func:`optax_guard.skip_nonfinite`, :func:`optax_guard.skip_spikes`, found
  by its state type: ``inner`` itself or the first member of a chain) is
  used as is, so that the overflow check shares its single pass over the
  gradients; an optimizer without a guard is wrapped in
  :func:`optax_guard.skip_nonfinite`. ``init`` refuses (``ValueError``) an
  ``inner`` with two guards, or with a transformation before its guard
  (that transformation would see scaled gradients). A spike skipped by the
  guard counts as a finite step. Put this transformation outermost: a guard
  outside it would see scaled gradients.

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
  _arguments.transformation('inner', inner)
  _arguments.real('initial_scale', initial_scale, low=0)
  _arguments.count('growth_interval', growth_interval)
  _arguments.real('factor', factor, low=1)
  _arguments.real('min_scale', min_scale, low=0)
  if not initial_scale <= MAX_SCALE:
    raise ValueError(
        f'initial_scale must be in (0, 2**126], got {initial_scale!r}: above'
        ' 2**126, 1/scale is not a normal float32 and the unscaled gradients'
        ' flush to zero.'
    )
  if not min_scale <= initial_scale:
    raise ValueError(
        f'min_scale must be in (0, initial_scale={initial_scale}], got'
        f' {min_scale!r}.'
    )
  wrapped = _guard.skip_nonfinite(inner)

  def guarded(tree) -> optax.GradientTransformationExtraArgs:
    """``inner`` if it holds a guard in the right place, else ``wrapped``."""
    return wrapped if _inner_guard_path(inner, tree) is None else inner

  def init_fn(params):
    ceiling = scale_ceiling(params)
    if initial_scale > ceiling:
      raise ValueError(
          f'initial_scale={initial_scale!r} is above {ceiling!r}, the largest'
          ' loss scale for gradients of the dtypes of these params'
          ' (optax_guard.transforms.loss_scale.scale_ceiling): the scale'
          ' itself would overflow them.'
      )
    return LossScaleState(
        inner_state=guarded(params).init(params),
        loss_scale=jnp.full((), initial_scale, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    updates, inner_state = guarded(updates).update(
        updates, state.inner_state, params, loss_scale=state.loss_scale,
        **extra_args,
    )
    (_, guard_state), = _states.find_states(inner_state, _guard.GuardState)
    overflow = guard_state.nonfinite
    scale = state.loss_scale
    good_steps = optax.safe_increment(state.good_steps)
    grown = jnp.minimum(scale * factor, jnp.float32(scale_ceiling(updates)))
    interval_done = ~overflow & (good_steps >= growth_interval)
    shrunk = jnp.maximum(scale / factor, jnp.float32(min_scale))
    return updates, LossScaleState(
        inner_state=inner_state,
        loss_scale=jnp.where(overflow, shrunk,
                             jnp.where(interval_done, grown, scale)),
        good_steps=jnp.where(overflow | interval_done, 0, good_steps),
    )

  # Fused exactly when the guard that receives ``fuse_apply`` is the last
  # step: known here only for a guard handed in directly. The train step
  # also finds it by state type (see optax_guard.train_step.plan_apply).
  fused = isinstance(inner, _fused.FusedGradientTransformation)
  make = (_fused.FusedGradientTransformation if fused
          else optax.GradientTransformationExtraArgs)
  return make(init_fn, update_fn)


def _inner_guard_path(inner: optax.GradientTransformation,
                      tree: Any) -> Optional[tuple[Any, ...]]:
  """Where ``inner``'s state holds its guard, or ``None`` without one.

  Looks at the state's structure only (``jax.eval_shape``: nothing runs).

  Raises:
    ValueError: for two guards, or a guard that is not the first thing
      ``inner`` runs (what runs before it would see scaled gradients).
  """
  structure = jax.eval_shape(optax.with_extra_args_support(inner).init, tree)
  found = _states.find_states(structure, _guard.GuardState)
  if not found:
    return None
  paths = [_states.path_name(path) or 'the state itself' for path, _ in found]
  if len(found) > 1:
    raise ValueError(
        f'og.dynamic_loss_scale found {len(found)} guards in its inner'
        f' optimizer state (at {", ".join(paths)}): it reuses one guard for'
        ' the overflow check; keep a single og.guard.'
    )
  path = found[0][0]
  if not _states.is_first_in(structure, path):
    raise ValueError(
        f'og.dynamic_loss_scale: the guard at {paths[0]} of the inner'
        ' optimizer is not the first transformation, so what runs before it'
        ' would see scaled gradients. Put the guard first (e.g.'
        ' og.dynamic_loss_scale(optax.chain(og.guard(...), ...))) or wrap'
        ' the guard alone.'
    )
  return path


def find_loss_scale_state(opt_state: Any) -> Optional[LossScaleState]:
  """The outermost :class:`LossScaleState` in ``opt_state``, or ``None``."""
  found = _states.find_states(opt_state, LossScaleState)
  return found[0][1] if found else None


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
  state = find_loss_scale_state(opt_state)
  if state is None:
    raise ValueError(
        'opt_state holds no loss scale: build the optimizer with'
        ' og.dynamic_loss_scale.'
    )
  return state.loss_scale
