"""Step skipping with exact state rollback: non-finite values and spikes.

:func:`guard` is the one place where a step is accepted or rejected. It is a
short pipeline of module-level stages over named records:

1. :func:`decide` reads the raw gradients once (norms, finiteness, the spike
   rule of :mod:`~optax_guard.transforms.spikes`, the leaf-granular health of
   :mod:`~optax_guard.transforms.leafwise`) and returns a :class:`Decision`;
2. :func:`run` runs the optional clip and the inner optimizer (and, in the
   fused form, the parameter update) inside one ``lax.cond`` on that
   decision, returning an :class:`Outcome`: a rejected step never executes
   them, so every leaf of their state is returned bit for bit and no
   non-finite value can reach an update;
3. :func:`next_state` folds the decision and the outcome into the new
   :class:`GuardState`.

The pure transformation and the fused update-and-apply of
:mod:`~optax_guard.transforms.fused` are the same three calls; only
``run``'s ``apply_to_params`` differs. :func:`skip_nonfinite` and
:func:`skip_spikes` are :func:`guard` with fewer checks switched on.
"""

import functools
import inspect
import warnings
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_guard.transforms import arguments as _arguments
from optax_guard.transforms import clipping as _clipping
from optax_guard.transforms import fused as _fused
from optax_guard.transforms import leafwise as _leafwise
from optax_guard.transforms import numerics as _numerics
from optax_guard.transforms import spikes as _spikes
from optax_guard.transforms import vanishing as _vanishing

_GRANULARITIES = ('global', 'leaf')


class GuardCounters(NamedTuple):
  """Counts that persist across steps (int32, saturating).

  Attributes:
    consecutive_skips: skipped steps since the last accepted one.
    total_skips: all skipped steps.
    total_nonfinite: all steps with a NaN/Inf gradient or loss.
    total_spikes: all steps skipped as spikes.
    total_inner_nonfinite: all steps skipped because the inner optimizer
      (or the clip) produced a NaN/Inf update or state from finite inputs.
  """

  consecutive_skips: jax.Array
  total_skips: jax.Array
  total_nonfinite: jax.Array
  total_spikes: jax.Array
  total_inner_nonfinite: jax.Array


class StepReport(NamedTuple):
  """What the guard saw in the last step (overwritten every step).

  Attributes:
    grad_norm: the pre-clip global gradient norm (with ``granularity="leaf"``,
      of the finite leaves).
    leaf_norms: the per-leaf gradient norms, one float32 entry per floating
      leaf (:func:`optax_guard.diagnose` names them).
    loss: the loss (``nan`` when none was given).
    update_norm: global norm of the update handed to the inner optimizer
      (zero when skipped).
    clip_threshold: the norm the gradient was clipped to, ``inf`` if none.
    skipped: whether the step was skipped.
    nonfinite: whether the step had a NaN/Inf gradient or loss.
    spike: whether the step's loss or gradient norm was a spike.
    inner_nonfinite: whether the step was skipped because the inner
      optimizer (or the clip), given a finite gradient, produced a NaN/Inf
      update or state (``eps=0``, an overflowing scale, a moment that
      overflows), or an update that would make a float16 (or float8)
      parameter overflow; ``nonfinite`` keeps meaning a bad gradient or
      loss.
    diverged: ``consecutive_skips`` reached ``max_consecutive_skips``; the
      host should act (roll back, lower the learning rate, stop). Cleared by
      the next accepted step.
  """

  grad_norm: jax.Array
  leaf_norms: jax.Array
  loss: jax.Array
  update_norm: jax.Array
  clip_threshold: jax.Array
  skipped: jax.Array
  nonfinite: jax.Array
  spike: jax.Array
  inner_nonfinite: jax.Array
  diverged: jax.Array


class GuardState(NamedTuple):
  """State of :func:`guard`, :func:`skip_nonfinite` and :func:`skip_spikes`.

  The last step's telemetry is also readable as attributes of the state
  itself (``state.skipped``, ``state.total_skips``, ...), as
  :func:`optax_guard.metrics` reports it.

  Attributes:
    inner_state: the inner optimizer's state, unchanged by a skipped step.
    clip_state: the clipping transformation's state (``None`` without one),
      unchanged by a skipped step.
    window: recent accepted losses and norms (``None`` without spike checks).
    counters: the :class:`GuardCounters`.
    vanishing: per floating leaf, the accepted steps in a row whose gradient
      norm was below ``vanishing_ratio`` times the parameter norm (an int32
      vector; ``None`` unless the guard was built with ``vanishing_ratio``).
    last_step: the :class:`StepReport` of the last step.
  """

  inner_state: Any
  clip_state: Any
  window: Optional[_spikes.SpikeWindow]
  counters: GuardCounters
  vanishing: Optional[jax.Array]
  last_step: StepReport

  # The flat names of og.metrics, read from the records above.
  @property
  def grad_norm(self) -> Any:
    return self.last_step.grad_norm

  @property
  def leaf_norms(self) -> Any:
    return self.last_step.leaf_norms

  @property
  def loss(self) -> Any:
    return self.last_step.loss

  @property
  def update_norm(self) -> Any:
    return self.last_step.update_norm

  @property
  def clip_threshold(self) -> Any:
    return self.last_step.clip_threshold

  @property
  def skipped(self) -> Any:
    return self.last_step.skipped

  @property
  def nonfinite(self) -> Any:
    return self.last_step.nonfinite

  @property
  def spike(self) -> Any:
    return self.last_step.spike

  @property
  def inner_nonfinite(self) -> Any:
    return self.last_step.inner_nonfinite

  @property
  def diverged(self) -> Any:
    return self.last_step.diverged

  @property
  def consecutive_skips(self) -> Any:
    return self.counters.consecutive_skips

  @property
  def total_skips(self) -> Any:
    return self.counters.total_skips

  @property
  def total_nonfinite(self) -> Any:
    return self.counters.total_nonfinite

  @property
  def total_spikes(self) -> Any:
    return self.counters.total_spikes

  @property
  def total_inner_nonfinite(self) -> Any:
    return self.counters.total_inner_nonfinite


class GuardConfig(NamedTuple):
  """The validated options of one :func:`guard` (static, not state)."""

  inner: optax.GradientTransformationExtraArgs
  clip: Optional[optax.GradientTransformationExtraArgs]
  spikes: Optional[_spikes.SpikeConfig]
  max_consecutive_skips: Optional[int]
  by_leaf: bool
  vanishing_ratio: Optional[float]
  check_updates: bool


class Decision(NamedTuple):
  """What the guard found in one step's gradients, before anything ran.

  Attributes:
    stats: the norms of the raw gradients (divided by the loss scale).
    healthy: with ``granularity="leaf"``, per leaf whether it takes part in
      the update (see :class:`~optax_guard.transforms.leafwise.LeafHealth`);
      ``None`` with ``granularity="global"``.
    clip_norm: the norm handed to the clip: the global norm, or with
      ``granularity="leaf"`` the norm of the finite leaves.
    grad_norm: ``clip_norm`` as float32.
    loss: the loss as float32, or ``None``.
    nonfinite: any NaN/Inf gradient, or a NaN/Inf loss.
    spike: the loss or ``grad_norm`` spiked.
    spike_check: the spike rule's full verdict, which
      :func:`~optax_guard.transforms.spikes.record` needs (``None`` without
      spike checks).
    accept: the step updates (some of) the parameters.
    unscale: ``1 / loss_scale`` when the gradients arrive scaled, else
      ``None``.
    new_level: the spike rule accepts this step as the start of a new
      level of the gradient norm (the clip is then rebased, see
      :func:`~optax_guard.transforms.clipping.rebase`).
    level_norms: the norms of that level: those of the skipped run and this
      step's (``None`` without spike checks).
  """

  stats: _numerics.NormStats
  healthy: Any
  clip_norm: jax.Array
  grad_norm: jax.Array
  loss: Optional[jax.Array]
  nonfinite: jax.Array
  spike: jax.Array
  spike_check: Optional[_spikes.SpikeCheck]
  accept: jax.Array
  unscale: Optional[jax.Array]
  new_level: jax.Array
  level_norms: Optional[jax.Array]


class Outcome(NamedTuple):
  """What ran (or was held) under the decision's ``lax.cond``.

  Attributes:
    output: the updates (zero when rejected), or in the fused form the new
      params (the old ones when rejected).
    inner_state: the inner optimizer's new (or held) state.
    clip_state: the clip's new (or held) state.
    clip_threshold: the norm clipped to, ``inf`` if none or rejected.
    update_norm: the norm handed to the inner optimizer (zero if rejected).
    vanishing: the new (or held) vanishing counters.
    inner_nonfinite: the step was accepted but its update or new state was
      not finite, so all of the above were held.
  """

  output: Any
  inner_state: Any
  clip_state: Any
  clip_threshold: jax.Array
  update_norm: jax.Array
  vanishing: Optional[jax.Array]
  inner_nonfinite: jax.Array


def _is_none(x: Any) -> bool:
  return x is None


def fresh_buffers(state: Any, params: Any) -> Any:
  """``state`` with every array that also sits elsewhere replaced by a copy.

  Some optimizers keep one array in two places: optax.contrib's ``dog``,
  ``dowg``, ``madgrad`` and ``prodigy`` store ``params`` itself as their
  starting point, ``cocob`` one zero array as three moments. A donating
  train step cannot donate one buffer twice (XLA refuses the call), so each
  repeat (the same array object, concrete or traced) is copied, once, here;
  a state without repeats is returned as it was.
  """
  seen = {id(leaf) for leaf in jax.tree.leaves(params)}

  def fresh(leaf):
    if not isinstance(leaf, jax.Array):
      return leaf
    if id(leaf) in seen:
      return jnp.copy(leaf)
    seen.add(id(leaf))
    return leaf

  return jax.tree.map(fresh, state)


def init(config: GuardConfig, params: Any) -> GuardState:
  """The initial :class:`GuardState` for ``params``.

  Every field is a fresh array: a buffer shared by two leaves could not be
  donated to the train step. That holds for the inner and clip states too
  (:func:`fresh_buffers`).
  """
  zero = lambda dtype=jnp.float32: jnp.zeros((), dtype)
  no = lambda: zero(jnp.bool_)
  return GuardState(
      inner_state=fresh_buffers(config.inner.init(params), params),
      clip_state=None if config.clip is None else fresh_buffers(
          config.clip.init(params), params),
      window=None if config.spikes is None else _spikes.init_window(
          config.spikes),
      counters=GuardCounters(*(zero(jnp.int32) for _ in GuardCounters._fields)),
      vanishing=None if config.vanishing_ratio is None else (
          _vanishing.init_counters(params)),
      last_step=StepReport(
          grad_norm=zero(),
          leaf_norms=jnp.zeros(
              (len(_numerics.float_leaf_paths(params)),), jnp.float32),
          loss=jnp.full((), jnp.nan, jnp.float32),
          update_norm=zero(),
          clip_threshold=jnp.full((), jnp.inf, jnp.float32),
          skipped=no(), nonfinite=no(), spike=no(), inner_nonfinite=no(),
          diverged=no(),
      ),
  )


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


def decide(config: GuardConfig, grads: Any, state: GuardState,
           value: Optional[jax.Array],
           loss_scale: Optional[jax.Array]) -> Decision:
  """Checks one step's raw gradients and loss: accept or reject."""
  stats = _numerics.norm_stats(grads)
  unscale = None
  if loss_scale is not None:
    unscale = 1 / jnp.asarray(loss_scale, jnp.float32)
    stats = _unscaled_stats(stats, unscale)
  loss = None if value is None else jnp.asarray(value, jnp.float32)
  bad_loss = jnp.zeros((), jnp.bool_) if loss is None else ~jnp.isfinite(loss)
  nonfinite = ~stats.finite | bad_loss
  healthy, clip_norm, reject = None, stats.global_norm, nonfinite
  if config.by_leaf:
    health = _leafwise.assess(grads, stats)
    healthy, clip_norm = health.healthy, health.norm
    reject = bad_loss | ~health.any_healthy
  grad_norm = clip_norm.astype(jnp.float32)
  spike = jnp.zeros((), jnp.bool_)
  new_level = jnp.zeros((), jnp.bool_)
  spike_check, level_norms = None, None
  if config.spikes is not None and state.window is not None:
    spike_check = _spikes.is_spike(state.window, config.spikes, loss,
                                   grad_norm)
    spike = ~reject & spike_check.spike
    # The gradient norm's own level moved (not only the loss's): the rule
    # rebuilds its window from these values, and the clip follows.
    new_level = ~reject & spike_check.release & (
        spike_check.grad_norm.high | state.window.grad_norm.high_seen)
    level_norms = jnp.append(state.window.grad_norm.pending, grad_norm)
  return Decision(
      stats=stats, healthy=healthy, clip_norm=clip_norm, grad_norm=grad_norm,
      loss=loss, nonfinite=nonfinite, spike=spike, spike_check=spike_check,
      accept=~(reject | spike), unscale=unscale, new_level=new_level,
      level_norms=level_norms,
  )


def _clip_and_inner(config: GuardConfig, decision: Decision, grads: Any,
                    inner_state: Any, clip_state: Any, params: Any,
                    extra_args: dict[str, Any]):
  """Clip and inner on an accepted step, unhealthy leaves held.

  Returns:
    ``(updates, inner_state, clip_state, clip_threshold, update_norm)``.
  """
  if decision.unscale is not None:
    # Here rather than before the check, so that XLA fuses the division
    # into the optimizer's pass instead of writing unscaled gradients.
    grads = _numerics.scale_tree(grads, decision.unscale)
  if config.by_leaf:
    grads = _leafwise.keep_healthy(grads, decision.healthy)
  clipped = grads
  clip_threshold = jnp.full((), jnp.inf, jnp.float32)
  update_norm = decision.grad_norm
  if config.clip is not None:
    if decision.level_norms is not None:
      clip_state = _clipping.rebase(clip_state, decision.level_norms,
                                    decision.new_level)
    clipped, clip_state = config.clip.update(
        grads, clip_state, params, global_grad_norm=decision.clip_norm,
        **extra_args,
    )
    # Every optax_guard clip keeps ClipStats; a foreign clip has no
    # threshold to report.
    clip_stats = getattr(clip_state, 'stats', None)
    if isinstance(clip_stats, _clipping.ClipStats):
      clip_threshold = clip_stats.clip_threshold
      update_norm = clip_stats.update_norm
  updates, new_inner_state = config.inner.update(
      clipped, inner_state, params, **extra_args
  )
  if config.by_leaf:
    updates = _leafwise.keep_healthy(updates, decision.healthy)
    new_inner_state = _leafwise.hold_parameter_slices(
        new_inner_state, inner_state, grads, decision.healthy
    )
  return updates, new_inner_state, clip_state, clip_threshold, update_norm


def _zeros_of(shapes: Any) -> Any:
  """Zeros with the structure, shapes and dtypes of ``jax.eval_shape``'s."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cast_like(tree: Any, shapes: Any) -> Any:
  """Each leaf of ``tree`` in the dtype of its ``jax.eval_shape`` twin."""
  return jax.tree.map(lambda x, s: jnp.asarray(x).astype(s.dtype), tree,
                      shapes)


def run(config: GuardConfig, decision: Decision, grads: Any,
        state: GuardState, params: Any, extra_args: dict[str, Any],
        apply_to_params: bool = False) -> Outcome:
  """Clip, inner (and with ``apply_to_params`` the apply) under one cond.

  A rejected step returns zero updates (or the params unchanged) and every
  state it was handed, bit for bit. So does an accepted step whose update is
  not finite or whose new inner state turns a finite value into a NaN/Inf
  (``inner_nonfinite``): the accepted branch first computes the update only
  into reductions, one per leaf shape (XLA writes nothing), then a nested
  ``lax.cond`` on their finiteness computes it again and writes it in
  place, or holds everything. The price is one more read of gradients,
  params and state per accepted step, and no extra buffer. The zero
  updates take the dtypes and
  structure of the inner optimizer's (a float update for an integer leaf, a
  :class:`optax.LookaheadParams` for lookahead), as the bare optimizer
  returns them.
  """

  def computed(params, inner_state, clip_state, vanishing):
    if vanishing is not None:
      # In the branch (a skipped step leaves the counters alone), before the
      # apply, so that XLA can read the params before updating them in place.
      vanishing = _vanishing.count(
          vanishing, _numerics.leaf_vector(decision.stats.leaf_norms), params,
          config.vanishing_ratio,
          None if decision.healthy is None else _leafwise.healthy_vector(
              decision.healthy),
      )
    updates, *ran = _clip_and_inner(config, decision, grads, inner_state,
                                    clip_state, params, extra_args)
    return updates, ran, vanishing

  updates_shape, (inner_shape, clip_shape, *_), _ = jax.eval_shape(
      computed, params, state.inner_state, state.clip_state, state.vanishing)

  def held(params, inner_state, clip_state, vanishing, inner_nonfinite):
    output = params if apply_to_params else _zeros_of(updates_shape)
    # An optimizer may change a state leaf's dtype on its first update
    # (optax.adam's moments of an integer leaf become float32): the held
    # state takes the dtypes the update gives, values unchanged.
    inner_state = cast_like(inner_state, inner_shape)
    clip_state = cast_like(clip_state, clip_shape)
    return Outcome(output, inner_state, clip_state,
                   jnp.full((), jnp.inf, jnp.float32),
                   jnp.zeros((), jnp.float32), vanishing, inner_nonfinite)

  def finite(params, inner_state, clip_state, vanishing):
    updates, (new_inner_state, *_), _ = computed(params, inner_state,
                                                 clip_state, vanishing)
    # The clip's own state is telemetry (ClipStats holds inf when nothing
    # was clipped); what it does to the gradients shows in the updates.
    # With params, a float16 parameter the update would overflow fails too
    # (numerics.overflows_below_float32; float32 params are not read).
    return _numerics.outputs_finite(updates, new_inner_state, inner_state,
                                    params)

  def applied(params, inner_state, clip_state, vanishing):
    updates, ran, new_vanishing = computed(params, inner_state, clip_state,
                                           vanishing)
    output = optax.apply_updates(params, updates) if apply_to_params else updates
    return Outcome(output, *ran, new_vanishing, jnp.zeros((), jnp.bool_))

  def accepted(*operands):
    if not config.check_updates:
      return applied(*operands)
    # Only reductions read the first computation, which XLA fuses into them
    # (nothing is written); the second, in its own branch, writes in place.
    ok = finite(*operands)
    return jax.lax.cond(ok, applied,
                        lambda *held_operands: held(*held_operands, ~ok),
                        *operands)

  def rejected(params, inner_state, clip_state, vanishing):
    return held(params, inner_state, clip_state, vanishing,
                jnp.zeros((), jnp.bool_))

  return jax.lax.cond(
      decision.accept, accepted, rejected,
      params, state.inner_state, state.clip_state, state.vanishing,
  )


def next_state(config: GuardConfig, state: GuardState, decision: Decision,
               outcome: Outcome) -> GuardState:
  """The new :class:`GuardState` once clip and inner ran (or did not)."""
  accept = decision.accept & ~outcome.inner_nonfinite
  skipped = ~accept
  window = state.window
  if (config.spikes is not None and state.window is not None
      and decision.spike_check is not None):
    # A step rejected before the spike check (non-finite) is not counted,
    # so it leaves the window bit for bit.
    window = _spikes.record(state.window, config.spikes, decision.loss,
                            decision.grad_norm, decision.spike_check,
                            counted=accept | decision.spike, accepted=accept)
  count_if = lambda flag, count: jnp.where(flag, optax.safe_increment(count),
                                           count)
  old = state.counters
  counters = GuardCounters(
      consecutive_skips=jnp.where(
          skipped, optax.safe_increment(old.consecutive_skips), 0),
      total_skips=count_if(skipped, old.total_skips),
      total_nonfinite=count_if(decision.nonfinite, old.total_nonfinite),
      total_spikes=count_if(decision.spike, old.total_spikes),
      total_inner_nonfinite=count_if(outcome.inner_nonfinite,
                                     old.total_inner_nonfinite),
  )
  diverged = jnp.zeros((), jnp.bool_)
  if config.max_consecutive_skips is not None:
    diverged = counters.consecutive_skips >= config.max_consecutive_skips
  loss = decision.loss
  return GuardState(
      inner_state=outcome.inner_state,
      clip_state=outcome.clip_state,
      window=window,
      counters=counters,
      vanishing=outcome.vanishing,
      last_step=StepReport(
          grad_norm=decision.grad_norm,
          leaf_norms=_numerics.leaf_vector(decision.stats.leaf_norms),
          loss=jnp.full((), jnp.nan, jnp.float32) if loss is None else loss,
          update_norm=outcome.update_norm,
          clip_threshold=outcome.clip_threshold,
          skipped=skipped,
          nonfinite=decision.nonfinite,
          spike=decision.spike,
          inner_nonfinite=outcome.inner_nonfinite,
          diverged=diverged,
      ),
  )


def check_loss(loss: Any, where: str, tuple_fix: str) -> None:
  """A loss must be one real floating-point scalar (checked at trace time).

  An integer loss has no gradient and a complex one would be reduced to its
  real part, so both are refused with the non-scalar ones, naming dtype and
  shape; any float dtype passes (bfloat16 and float16 included).

  Args:
    loss: the loss as given.
    where: how the error names it (``'value='``, ``'loss_fn'``'s loss).
    tuple_fix: what to do instead when ``loss`` is a tuple.

  Raises:
    TypeError: for anything but a real floating-point scalar.
  """
  if isinstance(loss, tuple):
    raise TypeError(
        f'{where} must be the scalar loss, got a tuple of {len(loss)};'
        f' {tuple_fix}'
    )
  if not isinstance(loss, (int, float)) and not hasattr(loss, 'shape'):
    raise TypeError(
        f'{where} must be the scalar loss, got a {type(loss).__name__}.'
    )
  dtype, shape = jnp.result_type(loss), jnp.shape(loss)
  if not jnp.issubdtype(dtype, jnp.floating) or shape != ():
    raise TypeError(
        f'{where} must be a real floating-point scalar, got dtype {dtype} and'
        f' shape {shape}: return the mean loss as a float (e.g.'
        ' jnp.mean(losses).astype(jnp.float32)), a scalar of shape ().'
    )


def _check_value(value: Any) -> None:
  """``value=`` must be one scalar loss (checked at trace time)."""
  if value is not None:
    check_loss(value, 'value=', 'with has_aux, pass the loss alone, not the'
               ' (loss, aux) tuple.')


def _spike_options(spikes: Mapping[str, Any]) -> _spikes.SpikeConfig:
  """:func:`~optax_guard.transforms.spikes.spike_config` of known keys only."""
  allowed = tuple(inspect.signature(_spikes.spike_config).parameters)
  unknown = sorted(set(spikes) - set(allowed))
  if unknown:
    raise ValueError(
        f'spikes got unknown option(s) {unknown}; the allowed ones are'
        f' {", ".join(allowed)}.'
    )
  return _spikes.spike_config(**spikes)


def _spike_config(spikes: Mapping[str, Any],
                  max_consecutive_skips: Optional[int]) -> _spikes.SpikeConfig:
  """The spike options; an explicit ``shift_after`` must stay below
  ``max_consecutive_skips``, or a level shift would raise ``diverged``.

  The default ``shift_after`` is not lowered to fit: a burst longer than it
  would be accepted as a new level, where ``diverged`` lets the host roll
  it back (measured on the recovering guide: 12 batches poisoned x1e6).
  """
  config = _spike_options(spikes)
  if (max_consecutive_skips is not None and spikes.get('shift_after')
      is not None and config.shift_after >= max_consecutive_skips):
    raise ValueError(
        f'max_consecutive_skips must exceed the spike rule\'s shift_after='
        f'{config.shift_after}, got {max_consecutive_skips}: a permanent '
        'level shift is skipped shift_after times in a row before it is '
        'accepted, and would raise diverged. Raise max_consecutive_skips or '
        'lower spikes["shift_after"].'
    )
  return config


def guard_config(
    inner: optax.GradientTransformation,
    *,
    clip: Optional[optax.GradientTransformation] = None,
    spikes: Optional[Mapping[str, Any]] = None,
    max_consecutive_skips: Optional[int] = None,
    granularity: str = 'global',
    vanishing_ratio: Optional[float] = None,
    check_updates: bool = True,
) -> GuardConfig:
  """Checks the options of :func:`guard` (``TypeError``/``ValueError``
  naming the argument, the value and what is accepted)."""
  _arguments.transformation('inner', inner)
  _arguments.transformation('clip', clip, allow_none=True,
                            example='og.zclip()')
  if spikes is not None and not isinstance(spikes, Mapping):
    raise TypeError(
        f'spikes must be None (no spike check) or a dict of spike options,'
        f' {{}} for the defaults (e.g. {{"window": 64}}), got {spikes!r}.'
    )
  _arguments.count('max_consecutive_skips', max_consecutive_skips,
                   allow_none=True)
  spike_config = None if spikes is None else _spike_config(
      spikes, max_consecutive_skips)
  _arguments.choice('granularity', granularity, _GRANULARITIES)
  _arguments.real('vanishing_ratio', vanishing_ratio, low=0, allow_none=True)
  _arguments.flag('check_updates', check_updates)
  return GuardConfig(
      inner=optax.with_extra_args_support(inner),
      clip=None if clip is None else optax.with_extra_args_support(clip),
      spikes=spike_config,
      max_consecutive_skips=max_consecutive_skips,
      by_leaf=granularity == 'leaf',
      vanishing_ratio=vanishing_ratio,
      check_updates=check_updates,
  )


def guard(
    inner: optax.GradientTransformation,
    *,
    clip: Optional[optax.GradientTransformation] = None,
    spikes: Optional[Mapping[str, Any]] = None,
    max_consecutive_skips: Optional[int] = None,
    granularity: str = 'global',
    vanishing_ratio: Optional[float] = None,
    check_updates: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """The recommended guard: skip bad steps, clip, then run ``inner``.

  Per step, on the raw gradient and the loss (extra argument ``value=``):

  1. the global and per-leaf norms are computed once, overflow-safe;
  2. a NaN/Inf gradient or loss, or (with ``spikes``) a loss or norm above
     ``mean + sigma * std`` of the recent accepted steps (the rule of
     :func:`skip_spikes`, which lets a level shift in after ``shift_after``
     skips), rejects the step:
     the update is zero and the state of ``clip`` and ``inner`` is returned
     unchanged, bit for bit (the parameters and, in
     :func:`optax_guard.make_train_step`, the model state too). The spike
     window is the rule's own record: a non-finite step leaves it bit for
     bit; a skipped spike leaves its admitted values as they were and
     writes its raw values to ``pending``, marks the high signals, ends a
     run of low values and counts one more in ``streak`` (after
     ``shift_after`` of them the statistics are rebuilt from ``pending``);
  3. otherwise ``clip`` (given the norm already computed) and ``inner`` run.

  After ``max_consecutive_skips`` skips in a row, ``diverged`` is raised in
  the state (see :func:`optax_guard.metrics`) for the host to act on; the
  guard itself never lets a non-finite gradient or loss through, nor
  (unless ``check_updates=False``) a non-finite update or inner state that
  the inner optimizer makes from finite gradients.

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

  A guard checks the leaves it is handed: inside :func:`optax.masked` it
  never sees the masked-out leaves, whose updates ``masked`` passes on
  unchanged (NaN included); put the guard outside the mask instead,
  ``og.guard(optax.masked(inner, mask))``.

  The result is a :class:`~optax_guard.transforms.fused.
  FusedGradientTransformation`: called with the extra argument
  ``fuse_apply=True`` (as :func:`optax_guard.make_train_step` does), the
  update returns the new params instead of the updates, the same decision
  and state, but the ``lax.cond`` covers the inner update *and* the
  parameter update, so that no update tree is materialised (the check of
  the inner optimizer's output keeps one boolean mask per leaf shape, which
  XLA:CPU holds at once).

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
    spikes: ``None`` for no spike check, or options of
      :func:`~optax_guard.transforms.spikes.spike_config` (``window``,
      ``sigma``, ``min_history``, ``shift_after``, ``rebase_down``,
      ``winsorize``, ``min_rel_std``, ``min_abs_std``; see
      :func:`skip_spikes`); ``{}`` takes the defaults.
    max_consecutive_skips: raise ``diverged`` after this many skips in a row.
      Skips of every kind count, and a level shift costs ``shift_after`` of
      them: an explicit ``shift_after`` that is not smaller raises
      ``ValueError``; with the default one, a shift then raises ``diverged``
      (and a host rollback) instead of being accepted.
    granularity: ``"global"`` (a NaN/Inf anywhere skips the step) or
      ``"leaf"`` (it holds only the leaves it is in).
    vanishing_ratio: if given, count per leaf the accepted steps in a row
      whose gradient norm is below ``vanishing_ratio`` times the parameter's
      norm (floored at an RMS of ``1e-3``), for :func:`optax_guard.diagnose`.
      Costs a read of the parameters per step (in the fused train step also
      a copy: XLA does not update in place what it reduces in the same
      branch); needs ``params`` in ``update``.
    check_updates: also skip an accepted step whose update, or new inner
      state, the inner optimizer made non-finite from finite gradients
      (``adam(eps=0)`` on a zero gradient, an overflowing ``scale``, a NaN
      learning rate), or whose finite update would make a parameter of a
      narrower range than float32 overflow (float16: 60000 + 10000; read
      only when ``params`` are passed, as the train steps do), reported as
      ``inner_nonfinite``. float32, bfloat16 and float64 parameters are not
      read: their sum with a finite update overflows only above 1.7e38, and
      the float32 check costs what it did. The check computes
      the inner update twice (into reductions, one per leaf shape, then in
      place): the optimizer update alone costs about 2x a bare adamw update
      on CPU where ``False`` costs 1.2-1.4x, a whole train step about 1%
      more (``BENCHMARKS.md``). With ``False``, such an update lands and
      :func:`optax_guard.diagnose` names the parameters it made non-finite.

  Returns:
    A :class:`~optax_guard.transforms.fused.FusedGradientTransformation`.

  References:
    Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
    <https://arxiv.org/abs/2204.02311>`_, 2022 (skipping spiky batches)
  """
  config = guard_config(
      inner, clip=clip, spikes=spikes,
      max_consecutive_skips=max_consecutive_skips, granularity=granularity,
      vanishing_ratio=vanishing_ratio, check_updates=check_updates,
  )

  def update_fn(updates, state, params=None, *, value=None, loss_scale=None,
                fuse_apply=False, **extra_args):
    if params is None and (fuse_apply or config.vanishing_ratio is not None):
      raise ValueError(
          'og.guard needs params here (for vanishing_ratio=... or the fused'
          ' apply): call update(updates, state, params).'
      )
    _check_value(value)
    if value is None and config.spikes is not None:
      # At trace time: once per compiled step, not on every call.
      warnings.warn(
          'og.guard(spikes=...) watches the loss, but update() got no'
          ' value=: only the gradient norm is checked and the loss metric is'
          ' NaN. Pass the loss as value= (nnx.Optimizer.update(model, grads,'
          ' value=loss); og.apply_gradients for a Flax TrainState;'
          ' og.make_train_step does it).', stacklevel=2)
    decision = decide(config, updates, state, value, loss_scale)
    outcome = run(config, decision, updates, state, params,
                  dict(value=value, **extra_args), apply_to_params=fuse_apply)
    return outcome.output, next_state(config, state, decision, outcome)

  return _fused.FusedGradientTransformation(
      functools.partial(init, config), update_fn
  )


def skip_nonfinite(
    inner: optax.GradientTransformation,
    max_consecutive_skips: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips any step whose gradient or loss holds a NaN or an Inf, or whose
  update or new inner state ``inner`` made non-finite.

  A skipped step returns zero updates and the inner state unchanged, bit for
  bit (step counts, moments, clip statistics). Unlike
  :func:`optax.apply_if_finite`, a non-finite gradient is never applied,
  however many steps in a row are bad: after ``max_consecutive_skips`` of
  them the state's ``diverged`` flag is raised for the host to act on.

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
    shift_after: Optional[int] = None,
    max_consecutive_skips: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips steps whose loss or gradient norm spikes above recent history.

  Once ``min_history`` values are recorded, a step is skipped when its loss
  (extra argument ``value=``) or its global gradient norm exceeds
  ``mean + sigma * std`` (Bessel-corrected) of the last ``window`` admitted
  values of that signal. Only accepted values are admitted, so neither a
  spike nor a burst widens the bound for the next step; a NaN/Inf step is
  skipped and leaves the statistics exactly as they were. A skipped spike's
  raw values wait in the window's ``pending`` buffer (its admitted values
  and their mean and std do not change), and ``streak`` counts it. After
  ``shift_after`` spike skips in a row the next high step is accepted as a
  new level and the statistics are rebuilt from ``pending`` and that step,
  so a permanent shift (noisier data, a new mixture, a smaller batch) costs
  ``shift_after`` skips instead of locking training out. The rollback of
  the parameters and the inner state is exact, as in
  :func:`skip_nonfinite`.

  Compared with OLMo-core's ``SkipStepOptimizer`` and MaxText's
  ``skip_step_on_spikes`` (which admit every value), it catches every step
  of a burst up to ``shift_after`` long where they catch about
  ``window / sigma**2``, one NaN costs one step where it costs them a
  window, and a shift costs ``shift_after`` skips where it costs them 4 to 7
  (``docs/spike_rule.md``).

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
    window: how many recent values the statistics cover (>= 2).
    sigma: how many standard deviations above the mean is a spike (> 0).
    min_history: values needed before any spike is called; default
      ``max(2, window // 2 - 1)``, which arms the check at the same step as
      OLMo-core and MaxText.
    shift_after: spike skips in a row after which a high step is accepted as
      a new level; default ``max(1, min(16, window // 4))``. A shift and a
      burst look alike until then: larger catches longer bursts whole,
      smaller follows a real shift with fewer dropped batches (see
      :func:`~optax_guard.transforms.spikes.spike_config`).
    max_consecutive_skips: raise ``diverged`` after this many skips in a row;
      keep it above ``shift_after`` so that a level shift never raises it
      (an explicit ``shift_after`` that is not smaller is a ``ValueError``).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
  return guard(
      inner,
      spikes=dict(window=window, sigma=sigma, min_history=min_history,
                  shift_after=shift_after),
      max_consecutive_skips=max_consecutive_skips,
  )
