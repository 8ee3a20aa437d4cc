"""Reading guard metrics out of any optimizer state."""

from typing import Any

import jax
import jax.numpy as jnp

from optax_guard.transforms import accumulate as _accumulate
from optax_guard.transforms import clipping as _clipping
from optax_guard.transforms import guard as _guard
from optax_guard.transforms import loss_scale as _loss_scale
from optax_guard.transforms import states as _states

_GUARD_KEYS = (
    'grad_norm', 'clip_threshold', 'update_norm', 'skipped',
    'consecutive_skips', 'total_skips', 'diverged', 'loss', 'nonfinite',
    'spike', 'total_nonfinite', 'total_spikes', 'inner_nonfinite',
    'total_inner_nonfinite',
)

# How several guards' flags and counts combine into one key: a step skipped
# by any guard was skipped; counts add up.
_ANY = ('skipped', 'diverged', 'nonfinite', 'spike', 'inner_nonfinite')
_SUM = ('total_skips', 'total_nonfinite', 'total_spikes',
        'total_inner_nonfinite')

_STATE_TYPES = (_guard.GuardState, _loss_scale.LossScaleState,
                _accumulate.AccumulateState,
                _clipping.ZClipState, _clipping.AutoClipState,
                _clipping.ClipStats)

_CONTRACT_DEFAULTS = {
    'clip_threshold': jnp.inf,
    'skipped': False,
    'consecutive_skips': 0,
    'total_skips': 0,
    'diverged': False,
}


def _own_metrics(node: Any) -> dict[str, jax.Array]:
  """The metrics one guard or clipping state holds itself."""
  if isinstance(node, _guard.GuardState):
    return {name: getattr(node, name) for name in _GUARD_KEYS}
  if isinstance(node, _accumulate.AccumulateState):
    return {'dropped': node.dropped, 'total_dropped': node.total_dropped}
  if isinstance(node, _loss_scale.LossScaleState):
    return {'loss_scale': node.loss_scale}
  if isinstance(node, _clipping.ZClipState):
    return {'zclip_mean': node.mean, 'zclip_std': jnp.sqrt(node.var)}
  if isinstance(node, _clipping.AutoClipState):
    return {'autoclip_history_size': node.count}
  if isinstance(node, _clipping.ClipStats):
    return node._asdict()
  return {}


def _combined_guards(guards: list[tuple[Any, Any]]) -> dict[str, jax.Array]:
  """Each guard's metrics under its path, and the flags and counts combined.

  Only for two guards or more: one guard's metrics are the flat keys.
  """
  found = {}
  for path, state in guards:
    prefix = _states.path_name(path) or '.'
    found.update({f'{prefix}/{k}': v for k, v in _own_metrics(state).items()})
  states = [state for _, state in guards]
  found.update({k: jnp.any(jnp.stack([getattr(s, k) for s in states]))
                for k in _ANY})
  found.update({k: sum(getattr(s, k) for s in states) for k in _SUM})
  return found


def metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Flat scalar metrics of every optax_guard state inside ``opt_state``.

  The state may be nested anywhere: in :func:`optax.chain`,
  :func:`optax.inject_hyperparams`, :class:`optax.MultiSteps`, a
  :class:`flax.nnx.Optimizer` (pass the optimizer or its ``opt_state``). Where
  two states report the same key, the outermost wins: a guard's view of this
  step beats the held state of a clip inside it. With several guards, each
  one's metrics are also reported under its path (``'[0]/skipped'``, see
  :func:`optax_guard.transforms.states.find_states`), and ``skipped``,
  ``diverged``, ``nonfinite``, ``spike`` say whether any guard raised them,
  ``total_*`` add up.

  Always present: ``grad_norm`` (pre-clip global norm), ``clip_threshold``
  (``inf`` when nothing was clipped), ``update_norm`` (post-clip),
  ``skipped``, ``consecutive_skips``, ``total_skips``, ``diverged``. Guards
  add ``loss``, ``nonfinite``, ``spike``, ``total_nonfinite``,
  ``total_spikes``, ``inner_nonfinite`` (the step was skipped because the
  inner optimizer, given finite gradients, produced a NaN/Inf update or
  state) and ``total_inner_nonfinite``; :func:`optax_guard.accumulate` adds
  ``dropped`` (the last micro-batch was dropped) and ``total_dropped``; ZClip adds ``zclip_mean`` and ``zclip_std``;
  :func:`optax_guard.dynamic_loss_scale` adds ``loss_scale``.

  Works inside ``jax.jit`` as well as on the host.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> tx = optax.chain(og.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> _, state = tx.update({'w': jnp.array([3.0, 4.0])}, state)
    >>> m = og.metrics(state)
    >>> float(m['grad_norm']), float(m['update_norm']), bool(m['skipped'])
    (5.0, 1.0, False)

  Args:
    opt_state: an optimizer state, or an :class:`flax.nnx.Optimizer`.

  Returns:
    A dict of scalar arrays.

  Raises:
    ValueError: if ``opt_state`` holds no optax_guard state, or holds a
      guard inside :class:`optax.MultiSteps` or :func:`optax.lookahead`
      (the message names the composition to use, e.g.
      :func:`optax_guard.accumulate`).
  """
  _states.check_guard_placement(opt_state, _guard.GuardState)
  states = _states.find_states(opt_state, _STATE_TYPES)
  guards = [(p, s) for p, s in states if isinstance(s, _guard.GuardState)]
  found: dict[str, Any] = _combined_guards(guards) if len(guards) > 1 else {}
  for _, node in states:
    for key, value in _own_metrics(node).items():
      found.setdefault(key, value)
  if 'grad_norm' not in found:
    raise ValueError(
        'opt_state holds no optax_guard state: build the optimizer with'
        ' og.guard, og.skip_nonfinite, og.skip_spikes or an og clipping'
        ' transformation.'
    )
  found.setdefault('update_norm', found['grad_norm'])
  for key, default in _CONTRACT_DEFAULTS.items():
    found.setdefault(key, default)
  return {key: jnp.asarray(value) for key, value in found.items()}
