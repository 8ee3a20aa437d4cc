"""Clipping transformations: fixed, ZClip, AutoClip and AGC.

Every clipping state records ``grad_norm`` (pre-clip global norm),
``clip_threshold`` (``inf`` when the step was not clipped) and ``update_norm``
(post-clip global norm), which :func:`optax_guard.metrics` reads.

A caller that already knows the global norm of the updates (such as
:func:`optax_guard.guard`) passes it as the extra argument
``global_grad_norm=`` so that the gradients are read only once.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_guard.transforms import arguments as _arguments
from optax_guard.transforms import numerics as _numerics

_ZCLIP_MODES = ('zscore', 'percentile')
_ZCLIP_CLIP_OPTIONS = ('adaptive_scaling', 'mean')


class ClipStats(NamedTuple):
  """What one clipping step did; shared by every clipping state.

  Attributes:
    grad_norm: global norm of the updates before clipping.
    clip_threshold: the norm they were clipped to, ``inf`` if not clipped.
    update_norm: global norm after clipping.
  """

  grad_norm: jax.Array
  clip_threshold: jax.Array
  update_norm: jax.Array


def _initial_clip_stats() -> ClipStats:
  # Separate buffers, so that the state can be donated.
  return ClipStats(
      grad_norm=jnp.zeros((), jnp.float32),
      clip_threshold=jnp.full((), jnp.inf, jnp.float32),
      update_norm=jnp.zeros((), jnp.float32),
  )


def _norm_of(updates, global_grad_norm: Optional[jax.Array]) -> jax.Array:
  if global_grad_norm is None:
    return _numerics.global_norm(updates)
  return jnp.asarray(global_grad_norm)


def _clip(updates, norm: jax.Array, threshold: jax.Array):
  """Clips ``updates`` to ``threshold`` and reports what happened."""
  threshold = threshold.astype(norm.dtype)
  clipped = norm > threshold
  stats = ClipStats(
      grad_norm=norm.astype(jnp.float32),
      clip_threshold=jnp.where(clipped, threshold, jnp.inf).astype(jnp.float32),
      # Analytic rather than a second pass over the clipped updates.
      update_norm=jnp.where(clipped, threshold, norm).astype(jnp.float32),
  )
  return _numerics.clip_tree_to_norm(updates, norm, threshold), stats


# ---------------------------------------------------------------------------
# Fixed threshold.


class ClipByGlobalNormState(NamedTuple):
  """State of :func:`clip_by_global_norm`: only what the last step did."""

  stats: ClipStats


def clip_by_global_norm(
    max_norm: float,
) -> optax.GradientTransformationExtraArgs:
  """Clips updates to a global L2 norm of at most ``max_norm``, overflow-safe.

  Identical to :func:`optax.clip_by_global_norm` on ordinary input, but the
  norm is accumulated in float32 (or wider) and rescaled when it would
  overflow, so fp16 gradients of norm above 65504, or fp32 gradients of norm
  above ~1.8e19, are clipped to ``max_norm`` rather than zeroed.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_guard as og
    >>> tx = og.clip_by_global_norm(1.0)
    >>> grads = {'w': jnp.full((1000,), 300.0, jnp.float16)}
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> round(float(og.global_norm(updates)), 2)
    1.0

  Args:
    max_norm: the largest global norm an update may have.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2012
  """
  _arguments.real('max_norm', max_norm, low=0)

  def init_fn(params):
    del params
    return ClipByGlobalNormState(_initial_clip_stats())

  def update_fn(updates, state, params=None, *, global_grad_norm=None, **extra):
    del state, params, extra
    norm = _norm_of(updates, global_grad_norm)
    updates, stats = _clip(updates, norm, jnp.asarray(max_norm, norm.dtype))
    return updates, ClipByGlobalNormState(stats)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# ZClip.


class ZClipState(NamedTuple):
  """State of :func:`zclip`.

  Attributes:
    warmup_norms: the finite norms collected during warm-up (``warmup_steps``
      slots; only the first ``warmup_count`` are meaningful).
    warmup_count: how many finite norms have been collected, capped at
      ``warmup_steps``; the EMA is live once it reaches ``warmup_steps``.
    mean: EMA of the gradient norm.
    var: EMA of its variance.
    stats: what the last step did.
  """

  warmup_norms: jax.Array
  warmup_count: jax.Array
  mean: jax.Array
  var: jax.Array
  stats: ClipStats


def zclip(
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    max_norm: Optional[float] = None,
    warmup_steps: int = 25,
    mode: str = 'zscore',
    clip_option: str = 'adaptive_scaling',
    clip_factor: float = 1.0,
    skip_update_on_spike: bool = False,
    eps: float = 1e-6,
) -> optax.GradientTransformationExtraArgs:
  """ZClip: clips gradient-norm outliers found by a z-score on EMA statistics.

  The first ``warmup_steps`` finite norms are only collected (and clipped to
  ``max_norm`` if given); their mean and population variance seed an EMA.
  Afterwards ``z = (norm - mean) / (std + eps)``. In ``"zscore"`` mode an
  outlier (``z > z_thresh``) is clipped to ``mean + z_thresh * std / (z /
  z_thresh)`` times ``clip_factor`` (``clip_option="adaptive_scaling"``) or to
  ``mean`` (``clip_option="mean"``); in ``"percentile"`` mode any norm above
  ``mean + z_thresh * std`` is clipped to that. The effective threshold is the
  smaller of that and ``max_norm``. The EMA (mean first, then the variance
  around the new mean) is updated with the adaptive threshold after an outlier,
  with the raw norm otherwise, and not at all after an outlier if
  ``skip_update_on_spike``. Unlike the reference implementation, a non-finite
  norm never enters the statistics (there, one NaN poisons them for good).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> tx = optax.chain(og.zclip(warmup_steps=3), optax.sgd(0.1))
    >>> params = {'w': jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for g in [1.0, 1.1, 0.9, 1.0, 50.0]:
    ...   _, state = tx.update({'w': jnp.array([g, 0.0])}, state, params)
    >>> m = og.metrics(state)
    >>> float(m['grad_norm']), bool(m['clip_threshold'] < 2.0)
    (50.0, True)

  Args:
    alpha: EMA smoothing factor, in (0, 1).
    z_thresh: z-score above which a norm is an outlier (> 0).
    max_norm: optional fixed ceiling on the norm, always applied.
    warmup_steps: finite norms collected before the EMA starts (>= 1).
    mode: ``"zscore"`` or ``"percentile"``.
    clip_option: ``"adaptive_scaling"`` or ``"mean"`` (zscore mode only).
    clip_factor: multiplier of the adaptive threshold (> 0).
    skip_update_on_spike: leave the EMA untouched after an outlier.
    eps: added to the standard deviation in the z-score (>= 0).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025
  """
  _arguments.real('alpha', alpha, low=0, high=1)
  _arguments.real('z_thresh', z_thresh, low=0)
  _arguments.real('max_norm', max_norm, low=0, allow_none=True)
  _arguments.count('warmup_steps', warmup_steps)
  _arguments.choice('mode', mode, _ZCLIP_MODES)
  _arguments.choice('clip_option', clip_option, _ZCLIP_CLIP_OPTIONS)
  _arguments.real('clip_factor', clip_factor, low=0)
  _arguments.flag('skip_update_on_spike', skip_update_on_spike)
  _arguments.real('eps', eps, low=0, low_open=False)
  ceiling = jnp.inf if max_norm is None else max_norm

  def init_fn(params):
    del params
    return ZClipState(
        warmup_norms=jnp.zeros((warmup_steps,), jnp.float32),
        warmup_count=jnp.zeros((), jnp.int32),
        mean=jnp.zeros((), jnp.float32),
        var=jnp.zeros((), jnp.float32),
        stats=_initial_clip_stats(),
    )

  def adaptive_threshold(norm, mean, std):
    """The reference's clip value, or ``inf`` when the norm is no outlier."""
    if mode == 'percentile':
      threshold = mean + z_thresh * std
      return jnp.where(norm > threshold, threshold, jnp.inf)
    z = (norm - mean) / (std + eps)
    if clip_option == 'mean':
      threshold = mean
    else:
      threshold = (mean + z_thresh * std / (z / z_thresh)) * clip_factor
    return jnp.where(z > z_thresh, threshold, jnp.inf)

  def update_fn(updates, state, params=None, *, global_grad_norm=None, **extra):
    del params, extra
    norm = _norm_of(updates, global_grad_norm).astype(jnp.float32)
    finite = jnp.isfinite(norm)
    live = state.warmup_count >= warmup_steps

    # Warm-up: collect the norm; seed the EMA once the buffer is full.
    collect = finite & ~live
    warmup_norms = jnp.where(
        collect,
        state.warmup_norms.at[jnp.minimum(state.warmup_count, warmup_steps - 1)]
        .set(norm),
        state.warmup_norms,
    )
    warmup_count = state.warmup_count + collect.astype(jnp.int32)
    seed_mean = jnp.mean(warmup_norms)
    seed_var = jnp.mean(jnp.square(warmup_norms - seed_mean))
    just_filled = collect & (warmup_count == warmup_steps)

    # Live: clip outliers, then move the EMA.
    std = jnp.sqrt(state.var)
    outlier_threshold = adaptive_threshold(norm, state.mean, std)
    outlier = live & jnp.isfinite(outlier_threshold)
    threshold = jnp.minimum(jnp.where(live, outlier_threshold, jnp.inf), ceiling)
    observed = jnp.where(outlier, outlier_threshold, norm)
    new_mean = alpha * state.mean + (1 - alpha) * observed
    new_var = alpha * state.var + (1 - alpha) * jnp.square(observed - new_mean)
    move_ema = live & finite
    if skip_update_on_spike:
      move_ema &= ~outlier

    mean = jnp.where(just_filled, seed_mean, jnp.where(move_ema, new_mean, state.mean))
    var = jnp.where(just_filled, seed_var, jnp.where(move_ema, new_var, state.var))
    updates, stats = _clip(updates, norm, threshold)
    return updates, ZClipState(warmup_norms, warmup_count, mean, var, stats)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# AutoClip.


class AutoClipState(NamedTuple):
  """State of :func:`autoclip`.

  Attributes:
    history: ring buffer of the last ``history_length`` finite pre-clip norms.
    count: how many norms were ever recorded (the buffer holds
      ``min(count, history_length)`` of them).
    stats: what the last step did.
  """

  history: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  stats: ClipStats


def _quantile_of_prefix(values: jax.Array, size: jax.Array, q: float):
  """``numpy.quantile(values[:size], q)`` (linear) for a traced ``size``."""
  slots = jnp.arange(values.shape[0])
  ordered = jnp.sort(jnp.where(slots < size, values, jnp.inf))
  position = q * (jnp.maximum(size, 1) - 1).astype(values.dtype)
  below = jnp.floor(position).astype(jnp.int32)
  above = jnp.minimum(below + 1, jnp.maximum(size, 1) - 1)
  fraction = position - below
  low, high = ordered[below], ordered[above]
  return low + (high - low) * fraction


def autoclip(
    quantile: float = 0.9, history_length: int = 1000
) -> optax.GradientTransformationExtraArgs:
  """AutoClip: clips to a quantile of the history of observed gradient norms.

  Each step's finite pre-clip global norm joins a ring buffer of the last
  ``history_length`` norms; the update is clipped to the ``quantile`` (linear
  interpolation, as ``numpy.quantile``) of the buffer, the current norm
  included, so the first step is never clipped.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_guard as og
    >>> tx = og.autoclip(quantile=0.5, history_length=4)
    >>> state = tx.init(None)
    >>> for g in [1.0, 2.0, 3.0, 100.0]:
    ...   _, state = tx.update({'w': jnp.array([g])}, state)
    >>> float(og.metrics(state)['clip_threshold'])
    2.5

  Args:
    quantile: which quantile of the history to clip to, in (0, 1].
    history_length: how many recent norms the quantile is taken over (>= 1).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020
  """
  _arguments.real('quantile', quantile, low=0, high=1, high_open=False)
  _arguments.count('history_length', history_length)

  def init_fn(params):
    del params
    return AutoClipState(
        history=jnp.zeros((history_length,), jnp.float32),
        count=jnp.zeros((), jnp.int32),
        stats=_initial_clip_stats(),
    )

  def update_fn(updates, state, params=None, *, global_grad_norm=None, **extra):
    del params, extra
    norm = _norm_of(updates, global_grad_norm).astype(jnp.float32)
    finite = jnp.isfinite(norm)
    history = jnp.where(
        finite, state.history.at[state.count % history_length].set(norm),
        state.history,
    )
    count = state.count + finite.astype(jnp.int32)
    size = jnp.minimum(count, history_length)
    threshold = jnp.where(
        size > 0, _quantile_of_prefix(history, size, quantile), jnp.inf
    )
    updates, stats = _clip(updates, norm, threshold)
    return updates, AutoClipState(history, count, stats)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Re-adapting to a level the spike rule accepted.


def rebase(state: Any, norms: jax.Array, when: jax.Array) -> Any:
  """An adaptive clip's statistics seeded from ``norms`` where ``when``.

  :func:`optax_guard.guard` calls it when its spike rule accepts a level
  shift of the gradient norm: ``norms`` are the raw norms of the skipped
  run and of the accepting step (the values the rule rebuilt its own window
  from). ZClip's mean and variance are set to theirs (as its warm-up seeds
  them), AutoClip's history is refilled with them; any other state is
  returned as it was. Without it, a clip whose statistics learn from
  clipped norms (ZClip's EMA) keeps clipping the new level for hundreds of
  steps. A clip used alone never calls it, and stays the published
  algorithm.

  Args:
    state: the clip's state.
    norms: float32 vector of the norms of the new level.
    when: bool scalar, whether to rebase at all.

  Returns:
    The state, rebased where ``when``.
  """
  if isinstance(state, ZClipState):
    mean = jnp.mean(norms)
    var = jnp.mean(jnp.square(norms - mean))
    warmup_steps = state.warmup_norms.shape[0]
    return state._replace(
        warmup_count=jnp.where(when, warmup_steps, state.warmup_count),
        mean=jnp.where(when, mean, state.mean),
        var=jnp.where(when, var, state.var),
    )
  if isinstance(state, AutoClipState):
    length = state.history.shape[0]
    return state._replace(
        history=jnp.where(when, jnp.resize(norms, (length,)), state.history),
        count=jnp.where(when, length, state.count),
    )
  return state


# ---------------------------------------------------------------------------
# Adaptive gradient clipping (unit-wise).


class AGCState(NamedTuple):
  """State of :func:`agc`: what the last step did."""

  stats: ClipStats


def agc(
    clipping: float, eps: float = 1e-3
) -> optax.GradientTransformationExtraArgs:
  """Unit-wise adaptive gradient clipping (AGC), with metrics in its state.

  Wraps :func:`optax.adaptive_grad_clip`: each unit's gradient is clipped to
  at most ``clipping * max(param_norm, eps)``. Since every unit has its own
  threshold, ``clip_threshold`` reports the post-clip global norm when any
  unit was clipped (``inf`` otherwise).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_guard as og
    >>> tx = og.agc(clipping=0.1)
    >>> params = {'w': jnp.ones((2, 2))}
    >>> updates, _ = tx.update({'w': jnp.full((2, 2), 10.0)}, tx.init(params), params)
    >>> # Each column's norm is clipped to 0.1 times the column's norm in params.
    >>> bool(jnp.allclose(updates['w'], 0.1))
    True

  Args:
    clipping: the largest allowed ratio of a unit's update norm to its
      parameter norm (> 0).
    eps: floor on the parameter norm, so zero-initialised units still move.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021
  """
  _arguments.real('clipping', clipping, low=0)
  _arguments.real('eps', eps, low=0, low_open=False)
  inner = optax.adaptive_grad_clip(clipping, eps)

  def init_fn(params):
    del params
    return AGCState(_initial_clip_stats())

  def update_fn(updates, state, params=None, *, global_grad_norm=None, **extra):
    del state, extra
    if params is None:
      raise ValueError('og.agc needs params: call update(updates, state, params).')
    norm = _norm_of(updates, global_grad_norm).astype(jnp.float32)
    clipped, _ = inner.update(updates, optax.EmptyState(), params)
    update_norm = _numerics.global_norm(clipped).astype(jnp.float32)
    any_clipped = update_norm < norm
    stats = ClipStats(
        grad_norm=norm,
        clip_threshold=jnp.where(any_clipped, update_norm, jnp.inf),
        update_norm=update_norm,
    )
    return clipped, AGCState(stats)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

