"""Step skipping with exact state rollback: non-finite values and spikes.

:func:`guard` is the one place where a step is accepted or rejected. It reads
the raw gradients once (:func:`optax_guard.norm_stats`), decides, and runs the
optional clipping transformation and the inner optimizer inside a
``lax.cond``: a rejected step never executes them, so every leaf of their
state is returned bit for bit and no non-finite value can reach an update.
:func:`skip_nonfinite` and :func:`skip_spikes` are :func:`guard` with fewer
checks switched on.
"""

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_guard import _clipping
from optax_guard import _numerics


class SpikeWindow(NamedTuple):
  """The last ``window`` accepted losses and global gradient norms.

  Attributes:
    losses: ring buffer of accepted losses (meaningful when a loss was given).
    grad_norms: ring buffer of accepted pre-clip global gradient norms.
    count: how many accepted steps were ever recorded.
  """

  losses: jax.Array
  grad_norms: jax.Array
  count: jax.Array


class GuardState(NamedTuple):
  """State of :func:`guard`, :func:`skip_nonfinite` and :func:`skip_spikes`.

  Attributes:
    inner_state: the inner optimizer's state, unchanged by a skipped step.
    clip_state: the clipping transformation's state (``None`` without one),
      unchanged by a skipped step.
    window: recent accepted losses and norms (``None`` without spike checks).
    grad_norm: this step's pre-clip global gradient norm.
    leaf_norms: this step's per-leaf gradient norms (a tree like the params).
    loss: this step's loss (``nan`` when none was given).
    update_norm: global norm of the update handed to the inner optimizer
      (zero when skipped).
    clip_threshold: the norm the gradient was clipped to, ``inf`` if none.
    skipped: whether this step was skipped.
    nonfinite: whether this step had a NaN/Inf gradient or loss.
    spike: whether this step's loss or gradient norm was a spike.
    consecutive_skips: skipped steps since the last accepted one.
    total_skips: all skipped steps.
    total_nonfinite: all steps with a NaN/Inf gradient or loss.
    total_spikes: all steps skipped as spikes.
    diverged: ``consecutive_skips`` reached ``max_consecutive_skips``; the
      host should act (roll back, lower the learning rate, stop). Cleared by
      the next accepted step.
  """

  inner_state: Any
  clip_state: Any
  window: Optional[SpikeWindow]
  grad_norm: jax.Array
  leaf_norms: Any
  loss: jax.Array
  update_norm: jax.Array
  clip_threshold: jax.Array
  skipped: jax.Array
  nonfinite: jax.Array
  spike: jax.Array
  consecutive_skips: jax.Array
  total_skips: jax.Array
  total_nonfinite: jax.Array
  total_spikes: jax.Array
  diverged: jax.Array


class SpikeConfig(NamedTuple):
  """Validated options of the spike check (see :func:`skip_spikes`)."""

  window: int
  sigma: float
  min_history: int


def spike_config(
    window: int = 128, sigma: float = 6.0, min_history: Optional[int] = None
) -> SpikeConfig:
  """Checks the spike options and fills in ``min_history``."""
  if not isinstance(window, int) or window < 2:
    raise ValueError(f'window must be an int >= 2, got {window!r}.')
  if not sigma > 0:
    raise ValueError(f'sigma must be > 0, got {sigma!r}.')
  if min_history is None:
    min_history = min(window, max(20, window // 2))
  if not isinstance(min_history, int) or not 2 <= min_history <= window:
    raise ValueError(
        f'min_history must be an int in [2, window={window}], got'
        f' {min_history!r}.'
    )
  return SpikeConfig(window, float(sigma), min_history)


def _upper_bound(values: jax.Array, size: jax.Array, sigma: float):
  """``mean + sigma * std`` (Bessel-corrected) of ``values[:size]``."""
  valid = jnp.arange(values.shape[0]) < size
  n = jnp.maximum(size, 2).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, values, 0)) / jnp.maximum(size, 1)
  squares = jnp.sum(jnp.where(valid, jnp.square(values - mean), 0))
  return mean + sigma * jnp.sqrt(squares / (n - 1))


def _is_spike(
    window: SpikeWindow, config: SpikeConfig, loss, grad_norm
) -> jax.Array:
  size = jnp.minimum(window.count, config.window)
  ready = size >= config.min_history
  spike = grad_norm > _upper_bound(window.grad_norms, size, config.sigma)
  if loss is not None:
    spike |= loss > _upper_bound(window.losses, size, config.sigma)
  return ready & spike


def _record(window: SpikeWindow, config: SpikeConfig, loss, grad_norm):
  slot = window.count % config.window
  losses = window.losses if loss is None else window.losses.at[slot].set(loss)
  return SpikeWindow(
      losses=losses,
      grad_norms=window.grad_norms.at[slot].set(grad_norm),
      count=window.count + 1,
  )


def _check_count(name: str, value: Optional[int]) -> None:
  if value is not None and (not isinstance(value, int) or value < 1):
    raise ValueError(f'{name} must be None or an int >= 1, got {value!r}.')


def guard(
    inner: optax.GradientTransformation,
    *,
    clip: Optional[optax.GradientTransformation] = None,
    spikes: Optional[Mapping[str, Any]] = None,
    max_consecutive_skips: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """The recommended guard: skip bad steps, clip, then run ``inner``.

  Per step, on the raw gradient and the loss (extra argument ``value=``):

  1. the global and per-leaf norms are computed once, overflow-safe;
  2. a NaN/Inf gradient or loss, or (with ``spikes``) a loss or norm above
     ``mean + sigma * std`` of the recent accepted steps, rejects the step:
     the update is zero and the state of ``clip`` and ``inner`` is returned
     unchanged, bit for bit;
  3. otherwise ``clip`` (given the norm already computed) and ``inner`` run.

  After ``max_consecutive_skips`` skips in a row, ``diverged`` is raised in
  the state (see :func:`optax_guard.metrics`) for the host to act on; the
  guard itself never lets a non-finite update through.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> tx = og.guard(optax.adam(1e-3), clip=og.zclip(), spikes={'window': 64})
    >>> params = {'w': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.array([1.0, jnp.nan, 0.0])}
    >>> updates, state = tx.update(grads, state, params, value=jnp.array(2.0))
    >>> updates['w'].tolist(), bool(og.metrics(state)['skipped'])
    ([0.0, 0.0, 0.0], True)

  Args:
    inner: the optimizer (any optax transformation).
    clip: optional clipping transformation, e.g. :func:`zclip`,
      :func:`autoclip` or :func:`clip_by_global_norm`. It runs after the
      checks, on accepted steps only.
    spikes: ``None`` for no spike check, or options of :func:`skip_spikes`
      (``window``, ``sigma``, ``min_history``); ``{}`` takes the defaults.
    max_consecutive_skips: raise ``diverged`` after this many skips in a row.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
    <https://arxiv.org/abs/2204.02311>`_, 2022 (skipping spiky batches)
  """
  config = None if spikes is None else spike_config(**spikes)
  _check_count('max_consecutive_skips', max_consecutive_skips)
  inner = optax.with_extra_args_support(inner)
  clip = None if clip is None else optax.with_extra_args_support(clip)

  def init_fn(params):
    # Fresh arrays for every field: a buffer shared by two leaves could not be
    # donated to the train step.
    zero = lambda: jnp.zeros((), jnp.float32)
    zero_count = lambda: jnp.zeros((), jnp.int32)
    no = lambda: jnp.zeros((), jnp.bool_)
    window = None
    if config is not None:
      window = SpikeWindow(
          losses=jnp.zeros((config.window,), jnp.float32),
          grad_norms=jnp.zeros((config.window,), jnp.float32),
          count=zero_count(),
      )
    return GuardState(
        inner_state=inner.init(params),
        clip_state=None if clip is None else clip.init(params),
        window=window,
        grad_norm=zero(),
        leaf_norms=jax.tree.map(
            lambda x: zero() if _numerics.is_float_leaf(x) else None,
            params,
            is_leaf=lambda x: x is None,
        ),
        loss=jnp.full((), jnp.nan, jnp.float32),
        update_norm=zero(),
        clip_threshold=jnp.full((), jnp.inf, jnp.float32),
        skipped=no(),
        nonfinite=no(),
        spike=no(),
        consecutive_skips=zero_count(),
        total_skips=zero_count(),
        total_nonfinite=zero_count(),
        total_spikes=zero_count(),
        diverged=no(),
    )

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    stats = _numerics.norm_stats(updates)
    grad_norm = stats.global_norm.astype(jnp.float32)
    loss = None if value is None else jnp.asarray(value, jnp.float32)
    nonfinite = ~stats.finite
    if loss is not None:
      nonfinite |= ~jnp.isfinite(loss)
    spike = jnp.zeros((), jnp.bool_)
    if config is not None:
      spike = ~nonfinite & _is_spike(state.window, config, loss, grad_norm)
    accept = ~(nonfinite | spike)

    def accepted():
      clipped, clip_state = updates, state.clip_state
      clip_threshold = jnp.full((), jnp.inf, jnp.float32)
      update_norm = grad_norm
      if clip is not None:
        clipped, clip_state = clip.update(
            updates, state.clip_state, params,
            global_grad_norm=stats.global_norm, value=value, **extra_args,
        )
        # Every optax_guard clip keeps ClipStats; a foreign clip has no
        # threshold to report.
        clip_stats = getattr(clip_state, 'stats', None)
        if isinstance(clip_stats, _clipping.ClipStats):
          clip_threshold = clip_stats.clip_threshold
          update_norm = clip_stats.update_norm
      new_updates, inner_state = inner.update(
          clipped, state.inner_state, params, value=value, **extra_args
      )
      return new_updates, inner_state, clip_state, clip_threshold, update_norm

    def rejected():
      zeros = jax.tree.map(
          lambda u: None if u is None else jnp.zeros_like(u),
          updates,
          is_leaf=lambda x: x is None,
      )
      zero = jnp.zeros((), jnp.float32)
      return (zeros, state.inner_state, state.clip_state,
              jnp.full((), jnp.inf, jnp.float32), zero)

    new_updates, inner_state, clip_state, clip_threshold, update_norm = (
        jax.lax.cond(accept, accepted, rejected)
    )

    window = state.window
    if config is not None:
      recorded = _record(state.window, config, loss, grad_norm)
      window = jax.tree.map(
          lambda new, old: jnp.where(accept, new, old), recorded, state.window
      )
    skipped = ~accept
    consecutive = jnp.where(skipped, state.consecutive_skips + 1, 0)
    diverged = jnp.zeros((), jnp.bool_)
    if max_consecutive_skips is not None:
      diverged = consecutive >= max_consecutive_skips
    as_count = lambda flag: flag.astype(jnp.int32)
    new_state = GuardState(
        inner_state=inner_state,
        clip_state=clip_state,
        window=window,
        grad_norm=grad_norm,
        leaf_norms=jax.tree.map(
            lambda n: n.astype(jnp.float32), stats.leaf_norms
        ),
        loss=jnp.full((), jnp.nan, jnp.float32) if loss is None else loss,
        update_norm=update_norm,
        clip_threshold=clip_threshold,
        skipped=skipped,
        nonfinite=nonfinite,
        spike=spike,
        consecutive_skips=consecutive,
        total_skips=state.total_skips + as_count(skipped),
        total_nonfinite=state.total_nonfinite + as_count(nonfinite),
        total_spikes=state.total_spikes + as_count(spike),
        diverged=diverged,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def skip_nonfinite(
    inner: optax.GradientTransformation,
    max_consecutive_skips: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips any step whose gradient or loss holds a NaN or an Inf.

  A skipped step returns zero updates and the inner state unchanged, bit for
  bit (step counts, moments, clip statistics). Unlike
  :func:`optax.apply_if_finite`, a non-finite update is never applied, however
  many steps in a row are bad: after ``max_consecutive_skips`` of them the
  state's ``diverged`` flag is raised for the host to act on.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> tx = og.skip_nonfinite(optax.adam(0.1), max_consecutive_skips=2)
    >>> params = {'w': jnp.ones(2)}
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update({'w': jnp.array([jnp.inf, 1.0])}, state)
    >>> m = og.metrics(state)
    >>> int(m['total_skips']), bool(m['diverged'])
    (2, True)

  Args:
    inner: the optimizer to protect.
    max_consecutive_skips: raise ``diverged`` after this many skips in a row
      (``None``: never).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
  return guard(inner, max_consecutive_skips=max_consecutive_skips)


def skip_spikes(
    inner: optax.GradientTransformation,
    window: int = 128,
    sigma: float = 6.0,
    min_history: Optional[int] = None,
    max_consecutive_skips: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips steps whose loss or gradient norm spikes above recent history.

  Once ``min_history`` accepted steps are recorded, a step is skipped when
  its loss (extra argument ``value=``) or its global gradient norm exceeds
  ``mean + sigma * std`` (Bessel-corrected) of the last ``window`` accepted
  steps. A skipped value never enters the window, so one spike cannot widen
  the bounds for the next. Non-finite values are skipped too. The rollback is
  exact, as in :func:`skip_nonfinite`.

  This is the spike skipping of OLMo-core's ``SkipStepOptimizer`` and
  MaxText's ``skip_step_on_spikes``, as an optax transformation.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> tx = og.skip_spikes(optax.sgd(0.1), window=8, sigma=3.0)
    >>> params = {'w': jnp.zeros(1)}
    >>> state = tx.init(params)
    >>> for g in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0, 40.0]:
    ...   _, state = tx.update({'w': jnp.array([g])}, state, value=jnp.array(g))
    >>> bool(og.metrics(state)['skipped'])
    True

  Args:
    inner: the optimizer to protect.
    window: how many recent accepted steps the statistics cover (>= 2).
    sigma: how many standard deviations above the mean is a spike (> 0).
    min_history: accepted steps needed before any spike is called; default
      ``max(20, window // 2)``, capped at ``window``.
    max_consecutive_skips: raise ``diverged`` after this many skips in a row.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
  return guard(
      inner,
      spikes=dict(window=window, sigma=sigma, min_history=min_history),
      max_consecutive_skips=max_consecutive_skips,
  )
