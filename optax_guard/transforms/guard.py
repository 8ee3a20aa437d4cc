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
import weakref

import jax
import jax.numpy as jnp
import optax

from optax_guard.transforms import fused as _apply
from optax_guard.transforms import clipping as _clipping
from optax_guard.transforms import numerics as _numerics

_GRANULARITIES = ('global', 'leaf')

# The update functions of every transformation built by `guard`.
_GUARD_UPDATES = weakref.WeakSet()


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
    grad_norm: this step's pre-clip global gradient norm (with
      ``granularity="leaf"``, of the finite leaves).
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
    leaf_vanishing_steps: per floating leaf, the accepted steps in a row whose
      gradient norm was below ``vanishing_ratio`` times the parameter norm
      (``None`` unless the guard was built with ``vanishing_ratio``).
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
  leaf_vanishing_steps: Any = None


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


# Parameter norms below this root-mean-square are treated as this RMS when a
# gradient is compared with its parameter, so that zero-initialised leaves
# (biases) have a scale (the default ``eps`` of AGC, per element).
PARAM_RMS_FLOOR = 1e-3


def floored_param_norm(param_norm: jax.Array, size: int) -> jax.Array:
  """``max(param_norm, PARAM_RMS_FLOOR * sqrt(size))``."""
  return jnp.maximum(param_norm, PARAM_RMS_FLOOR * float(size) ** 0.5)


class _Check(NamedTuple):
  """What the guard found in one step's gradients, before anything ran.

  Attributes:
    stats: the norms of the raw gradients.
    healthy: per leaf, whether the leaf takes part in the update: a tree like
      the gradients, a boolean array per floating leaf (``True`` python
      bool everywhere else), or ``None`` with ``granularity="global"``.
    clip_norm: the norm handed to the clip: the global norm, or with
      ``granularity="leaf"`` the norm of the finite leaves.
    grad_norm: ``clip_norm`` as float32.
    loss: the loss as float32, or ``None``.
    nonfinite: any NaN/Inf gradient, or a NaN/Inf loss.
    spike: the loss or ``grad_norm`` spiked.
    accept: the step updates (some of) the parameters.
    unscale: ``1 / loss_scale`` when the gradients arrive scaled, else
      ``None``.
  """

  stats: _numerics.NormStats
  healthy: Any
  clip_norm: jax.Array
  grad_norm: jax.Array
  loss: Optional[jax.Array]
  nonfinite: jax.Array
  spike: jax.Array
  accept: jax.Array
  unscale: Optional[jax.Array]


def _is_none(x: Any) -> bool:
  return x is None


def _scale_leaves(tree: Any, factor: jax.Array) -> Any:
  """Each floating leaf times ``factor``, in float32 or wider, rounded once."""

  def scale_leaf(x):
    if not _numerics.is_float_leaf(x):
      return x
    dtype = jnp.result_type(x.dtype, _numerics.accumulation_dtype(x.dtype))
    return (x.astype(dtype) * factor.astype(dtype)).astype(x.dtype)

  return jax.tree.map(scale_leaf, tree, is_leaf=_is_none)


def _unscaled_stats(stats: _numerics.NormStats, unscale: jax.Array):
  """The norms of the gradients divided by the loss scale.

  Exact for a power-of-two scale (the default of dynamic_loss_scale): the
  norm of ``g / 2**k`` is the norm of ``g`` over ``2**k``, bit for bit.
  """
  scale = lambda n: n * unscale.astype(n.dtype)
  global_norm = scale(stats.global_norm)
  return _numerics.NormStats(
      global_norm=global_norm,
      leaf_norms=jax.tree.map(scale, stats.leaf_norms),
      finite=jnp.isfinite(global_norm),
  )


def _param_norms(params: Any) -> Any:
  """Per-leaf L2 norms of the floating leaves, accumulated in float32 or wider.

  Plain sums of squares, without the overflow-safe second pass of
  ``norm_stats``: only the vanishing ratio reads these norms, and a
  parameter norm past float32's range is no vanishing gradient.
  """

  def norm(x):
    if not _numerics.is_float_leaf(x):
      return None
    dtype = _numerics.accumulation_dtype(x.dtype)
    return jnp.sqrt(jnp.sum(jnp.square(jnp.abs(x).astype(dtype))))

  return jax.tree.map(norm, params, is_leaf=_is_none)


def _keep_healthy(tree: Any, healthy: Any, held: Any = None) -> Any:
  """``tree`` on healthy leaves; ``held`` (zeros by default) on the others."""
  if held is None:
    held = jax.tree.map(jnp.zeros_like, tree)
  return jax.tree.map(
      lambda x, old, ok: x if ok is True else jnp.where(ok, x, old),
      tree, held, healthy,
  )


def _hold_parameter_slices(new_state, old_state, grads, healthy):
  """Restores the slices of ``old_state`` that mirror unhealthy leaves.

  A subtree of the state mirrors the parameters when it has the tree
  structure and leaf shapes of the gradients (Adam's ``mu`` and ``nu``, a
  momentum, an EMA of the params). Other leaves (step counts) keep their new
  value.
  """
  structure = jax.tree.structure(grads)
  shapes = [jnp.shape(x) for x in jax.tree.leaves(grads)]

  def mirrors(node):
    return jax.tree.structure(node) == structure and [
        jnp.shape(x) for x in jax.tree.leaves(node)
    ] == shapes

  def hold(new, old):
    return _keep_healthy(new, healthy, old) if mirrors(new) else new

  return jax.tree.map(hold, new_state, old_state, is_leaf=mirrors)


def guard(
    inner: optax.GradientTransformation,
    *,
    clip: Optional[optax.GradientTransformation] = None,
    spikes: Optional[Mapping[str, Any]] = None,
    max_consecutive_skips: Optional[int] = None,
    granularity: str = 'global',
    vanishing_ratio: Optional[float] = None,
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

  With ``granularity="leaf"``, a NaN/Inf gradient holds only its own leaves:
  their gradients enter neither the norm nor the clip, their updates are
  zero and the slices of the inner state that mirror them (Adam's moments)
  keep their old values, while the healthy leaves update (step counts move
  on). ``grad_norm`` is then the norm of the healthy leaves, ``nonfinite``
  is raised and ``skipped`` is not. The step is skipped whole only for a
  non-finite loss, a spike, or when no leaf is healthy. The held slices are
  chosen with ``jnp.where``, which makes XLA write the new moments to fresh
  buffers: on CPU a leaf-granular update costs a few times a bare one.

  The extra argument ``loss_scale=`` says that the gradients are those of
  the loss times this factor (:func:`optax_guard.dynamic_loss_scale` passes
  it): the guard divides the norms by it and, inside its update, the
  gradients, so that checks, clip and ``inner`` see the true gradients.

  The train step (:func:`optax_guard.make_train_step`) applies the guard in
  its fused form: the same decision and state, but the ``lax.cond`` covers
  the inner update *and* the parameter update, so that nothing is
  materialised beyond what the bare optimizer writes.

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
    granularity: ``"global"`` (a NaN/Inf anywhere skips the step) or
      ``"leaf"`` (it holds only the leaves it is in).
    vanishing_ratio: if given, count per leaf the accepted steps in a row
      whose gradient norm is below ``vanishing_ratio`` times the parameter's
      norm (floored at an RMS of ``1e-3``), for :func:`optax_guard.diagnose`.
      Costs a read of the parameters per step (in the fused train step also
      a copy: XLA does not update in place what it reduces in the same
      branch); needs ``params`` in ``update``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
    <https://arxiv.org/abs/2204.02311>`_, 2022 (skipping spiky batches)
  """
  config = None if spikes is None else spike_config(**spikes)
  _check_count('max_consecutive_skips', max_consecutive_skips)
  if granularity not in _GRANULARITIES:
    raise ValueError(
        f'granularity must be one of {_GRANULARITIES}, got {granularity!r}.'
    )
  if vanishing_ratio is not None and not vanishing_ratio > 0:
    raise ValueError(
        f'vanishing_ratio must be None or > 0, got {vanishing_ratio!r}.'
    )
  by_leaf = granularity == 'leaf'
  inner = optax.with_extra_args_support(inner)
  clip = None if clip is None else optax.with_extra_args_support(clip)

  def init_fn(params):
    # Fresh arrays for every field: a buffer shared by two leaves could not be
    # donated to the train step.
    zero = lambda: jnp.zeros((), jnp.float32)
    zero_count = lambda: jnp.zeros((), jnp.int32)
    no = lambda: jnp.zeros((), jnp.bool_)
    per_float_leaf = lambda make: jax.tree.map(
        lambda x: make() if _numerics.is_float_leaf(x) else None,
        params,
        is_leaf=_is_none,
    )
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
        leaf_norms=per_float_leaf(zero),
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
        leaf_vanishing_steps=(
            None if vanishing_ratio is None else per_float_leaf(zero_count)
        ),
    )

  def check(updates, state, params, value, loss_scale) -> _Check:
    stats = _numerics.norm_stats(updates)
    unscale = None
    if loss_scale is not None:
      unscale = 1 / jnp.asarray(loss_scale, jnp.float32)
      stats = _unscaled_stats(stats, unscale)
    loss = None if value is None else jnp.asarray(value, jnp.float32)
    bad_loss = jnp.zeros((), jnp.bool_) if loss is None else ~jnp.isfinite(loss)
    nonfinite = ~stats.finite | bad_loss
    healthy, clip_norm, reject = None, stats.global_norm, nonfinite
    if by_leaf:
      healthy = jax.tree.map(
          lambda u, n: None if u is None else (
              True if n is None else jnp.isfinite(n)),
          updates, stats.leaf_norms, is_leaf=_is_none,
      )
      norms = jax.tree.leaves(stats.leaf_norms)
      if norms:
        finite_norms = [jnp.where(jnp.isfinite(n), n, 0) for n in norms]
        # Equal to the global norm, bit for bit, when every leaf is finite.
        clip_norm = jnp.where(
            stats.finite,
            stats.global_norm,
            _numerics._combine_norms(finite_norms, stats.global_norm.dtype),
        )
        none_healthy = ~jnp.any(jnp.stack([jnp.isfinite(n) for n in norms]))
        reject = bad_loss | none_healthy
      else:
        reject = bad_loss
    grad_norm = clip_norm.astype(jnp.float32)
    spike = jnp.zeros((), jnp.bool_)
    if config is not None:
      spike = ~reject & _is_spike(state.window, config, loss, grad_norm)
    if vanishing_ratio is not None and params is None:
      raise ValueError(
          'og.guard(vanishing_ratio=...) needs params: call'
          ' update(updates, state, params).'
      )
    return _Check(
        stats=stats,
        healthy=healthy,
        clip_norm=clip_norm,
        grad_norm=grad_norm,
        loss=loss,
        nonfinite=nonfinite,
        spike=spike,
        accept=~(reject | spike),
        unscale=unscale,
    )

  def run(updates, inner_state, clip_state, params, found, value, extra_args):
    """Clip and inner on an accepted step (unhealthy slices not yet held)."""
    updates_in = updates
    if found.unscale is not None:
      # Here rather than before the check, so that XLA fuses the division
      # into the optimizer's pass instead of writing unscaled gradients.
      updates_in = _scale_leaves(updates_in, found.unscale)
    if by_leaf:
      updates_in = _keep_healthy(updates_in, found.healthy)
    clipped = updates_in
    clip_threshold = jnp.full((), jnp.inf, jnp.float32)
    update_norm = found.grad_norm
    if clip is not None:
      clipped, clip_state = clip.update(
          updates_in, clip_state, params,
          global_grad_norm=found.clip_norm, value=value, **extra_args,
      )
      # Every optax_guard clip keeps ClipStats; a foreign clip has no
      # threshold to report.
      clip_stats = getattr(clip_state, 'stats', None)
      if isinstance(clip_stats, _clipping.ClipStats):
        clip_threshold = clip_stats.clip_threshold
        update_norm = clip_stats.update_norm
    new_updates, new_inner_state = inner.update(
        clipped, inner_state, params, value=value, **extra_args
    )
    if by_leaf:
      new_updates = _keep_healthy(new_updates, found.healthy)
    return new_updates, new_inner_state, clip_state, clip_threshold, update_norm

  def hold(new_inner_state, inner_state, updates, found):
    if not by_leaf:
      return new_inner_state
    return _hold_parameter_slices(
        new_inner_state, inner_state, updates, found.healthy
    )

  def count_vanishing(steps, found, params):
    """The vanishing counters after an accepted step, or ``None``.

    Runs inside the accepted branch (a skipped step leaves the counters
    alone), where XLA can read the params before updating them in place.
    """
    if vanishing_ratio is None:
      return None

    def count(steps, grad_norm, param_norm, param, healthy):
      if steps is None:
        return None
      size = int(jnp.size(param))
      small = grad_norm < vanishing_ratio * floored_param_norm(param_norm, size)
      counted = jnp.where(small, steps + 1, 0)
      if healthy is None or healthy is True:
        return counted
      return jnp.where(healthy, counted, steps)

    healthy = found.healthy
    if healthy is None:
      healthy = jax.tree.map(lambda _: None, found.stats.leaf_norms,
                             is_leaf=_is_none)
    return jax.tree.map(
        count, steps, found.stats.leaf_norms, _param_norms(params), params,
        healthy, is_leaf=_is_none,
    )

  def finish(state, found, inner_state, clip_state, clip_threshold,
             update_norm, vanishing):
    """The new GuardState once clip and inner ran (or did not)."""
    accept = found.accept
    window = state.window
    if config is not None:
      recorded = _record(state.window, config, found.loss, found.grad_norm)
      window = jax.tree.map(
          lambda new, old: jnp.where(accept, new, old), recorded, state.window
      )
    skipped = ~accept
    consecutive = jnp.where(skipped, state.consecutive_skips + 1, 0)
    diverged = jnp.zeros((), jnp.bool_)
    if max_consecutive_skips is not None:
      diverged = consecutive >= max_consecutive_skips
    as_count = lambda flag: flag.astype(jnp.int32)
    loss = found.loss
    return GuardState(
        inner_state=inner_state,
        clip_state=clip_state,
        window=window,
        grad_norm=found.grad_norm,
        leaf_norms=jax.tree.map(
            lambda n: n.astype(jnp.float32), found.stats.leaf_norms
        ),
        loss=jnp.full((), jnp.nan, jnp.float32) if loss is None else loss,
        update_norm=update_norm,
        clip_threshold=clip_threshold,
        skipped=skipped,
        nonfinite=found.nonfinite,
        spike=found.spike,
        consecutive_skips=consecutive,
        total_skips=state.total_skips + as_count(skipped),
        total_nonfinite=state.total_nonfinite + as_count(found.nonfinite),
        total_spikes=state.total_spikes + as_count(found.spike),
        diverged=diverged,
        leaf_vanishing_steps=vanishing,
    )

  def skipped_outputs():
    return jnp.full((), jnp.inf, jnp.float32), jnp.zeros((), jnp.float32)

  def update_fn(updates, state, params=None, *, value=None, loss_scale=None,
                **extra_args):
    found = check(updates, state, params, value, loss_scale)

    def accepted():
      new_updates, inner_state, *rest = run(
          updates, state.inner_state, state.clip_state, params, found, value,
          extra_args,
      )
      return (new_updates, hold(inner_state, state.inner_state, updates, found),
              *rest, count_vanishing(state.leaf_vanishing_steps, found, params))

    def rejected():
      zeros = jax.tree.map(
          lambda u: None if u is None else jnp.zeros_like(u),
          updates,
          is_leaf=_is_none,
      )
      return (zeros, state.inner_state, state.clip_state, *skipped_outputs(),
              state.leaf_vanishing_steps)

    new_updates, *outputs = jax.lax.cond(found.accept, accepted, rejected)
    return new_updates, finish(state, found, *outputs)

  def apply_fn(updates, state, params, *, value=None, loss_scale=None,
               **extra_args):
    """``update_fn`` and ``optax.apply_updates`` under one ``lax.cond``."""
    found = check(updates, state, params, value, loss_scale)

    def accepted(params, inner_state, clip_state, vanishing):
      vanishing = count_vanishing(vanishing, found, params)
      new_updates, new_inner_state, *rest = run(
          updates, inner_state, clip_state, params, found, value, extra_args
      )
      return (optax.apply_updates(params, new_updates),
              hold(new_inner_state, inner_state, updates, found), *rest,
              vanishing)

    def rejected(params, inner_state, clip_state, vanishing):
      return (params, inner_state, clip_state, *skipped_outputs(), vanishing)

    new_params, *outputs = jax.lax.cond(
        found.accept, accepted, rejected,
        params, state.inner_state, state.clip_state,
        state.leaf_vanishing_steps,
    )
    return new_params, finish(state, found, *outputs)

  _GUARD_UPDATES.add(update_fn)
  return _apply.with_fused_apply(
      optax.GradientTransformationExtraArgs(init_fn, update_fn), apply_fn
  )


def is_guard(tx: optax.GradientTransformation) -> bool:
  """Whether ``tx`` was built by :func:`guard` (or its aliases)."""
  return tx.update in _GUARD_UPDATES


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
