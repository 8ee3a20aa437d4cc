"""Per-leaf diagnostics on the host: which leaves went wrong, by name."""

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from optax_guard.transforms import guard as _guard
from optax_guard.transforms import numerics as _numerics
from optax_guard.transforms import states as _states
from optax_guard.transforms import vanishing as _vanishing


# Why a parameter can be non-finite behind a guard, and what skips it.
NONFINITE_PARAMS_HINT = ('an update, not a gradient, made them so: og.guard'
                         ' skips such steps unless check_updates=False')


@dataclasses.dataclass(frozen=True)
class Diagnosis:
  """What :func:`diagnose` found, leaves named by :func:`jax.tree_util.keystr`.

  Attributes:
    nonfinite: leaves whose last gradient held a NaN or an Inf.
    exploded: leaves whose last gradient norm exceeded ``explode_ratio``
      times their (floored) parameter norm.
    vanished: leaves whose gradient norm stayed below the guard's
      ``vanishing_ratio`` times their parameter norm for at least
      ``vanishing_steps`` accepted steps in a row (empty unless the guard
      tracks it).
    ratios: per leaf, last gradient norm / floored parameter norm.
    vanishing_tracked: whether the guard was built with ``vanishing_ratio``.
    worst: ``(leaf, last gradient norm)`` of every leaf, largest first,
      NaN and Inf first of all (the leaves to look at after a divergence).
    nonfinite_params: leaves whose parameters themselves hold a NaN or an
      Inf. A guard never applies a non-finite gradient, so an update put it
      there: the inner optimizer's own arithmetic (an ``eps=0`` division,
      an overflow), which :func:`og.guard` skips unless built with
      ``check_updates=False``.
  """

  nonfinite: tuple[str, ...]
  exploded: tuple[str, ...]
  vanished: tuple[str, ...]
  ratios: dict[str, float]
  vanishing_tracked: bool
  worst: tuple[tuple[str, float], ...] = ()
  nonfinite_params: tuple[str, ...] = ()

  @property
  def healthy(self) -> bool:
    """No leaf is non-finite (gradient or parameter), exploded or vanished."""
    return not (self.nonfinite or self.exploded or self.vanished
                or self.nonfinite_params)

  def __str__(self) -> str:
    if self.healthy:
      lines = ['all leaves healthy']
    else:
      lines = [
          f'{kind}: {", ".join(names)}'
          for kind, names in (('non-finite', self.nonfinite),
                              ('exploded', self.exploded),
                              ('vanished', self.vanished))
          if names
      ]
      if self.nonfinite_params:
        lines.append(f'non-finite parameters:'
                     f' {", ".join(self.nonfinite_params)}'
                     f' ({NONFINITE_PARAMS_HINT})')
    if not self.vanishing_tracked:
      lines.append('(vanishing not tracked: build the guard with'
                   ' vanishing_ratio=...)')
    return '\n'.join(lines)


def _params_tree(opt_state: Any, params: Any) -> Any:
  """The plain parameter tree: an NNX model's variables that the optimizer
  (if one is handed in) differentiates, else ``params`` itself."""
  nnx = _states.loaded_nnx()
  if nnx is None or not isinstance(params, nnx.Module):
    return _states.pure_state(params)
  wrt = getattr(opt_state, 'wrt', nnx.Param)
  return nnx.as_pure(nnx.state(params, wrt))


def _rank(norms: dict[str, float]) -> tuple[tuple[str, float], ...]:
  """Largest first, NaN and Inf before every finite norm."""
  key = lambda item: math.inf if math.isnan(item[1]) else item[1]
  return tuple(sorted(norms.items(), key=key, reverse=True))


def diagnose(
    opt_state: Any,
    params: Any,
    *,
    explode_ratio: float = 1.0,
    vanishing_steps: int = 100,
) -> Diagnosis:
  """Names the parameter leaves whose gradients went wrong.

  Reads the per-leaf gradient norms of the last step that the outermost
  guard keeps in its state (``GuardState.last_step.leaf_norms``), names them
  by the paths of ``params`` and compares them with the parameter norms
  (overflow-safe, :mod:`optax_guard.transforms.numerics`). A leaf is

  * *non-finite* if its last gradient held a NaN or an Inf (with
    ``og.guard(..., granularity="leaf")``, the leaves that were held);
  * *exploded* if its last gradient norm exceeded ``explode_ratio`` times its
    parameter norm, floored at a root-mean-square of ``1e-3`` so that a
    zero-initialised bias has a scale (the ``eps`` of AGC);
  * *vanished* if, for ``vanishing_steps`` accepted steps in a row, its
    gradient norm stayed below the guard's ``vanishing_ratio`` times that
    parameter norm (tracked only by a guard built with ``vanishing_ratio``);
  * in ``nonfinite_params`` if the parameter itself holds a NaN or an Inf.

  ``worst`` ranks every leaf by its last gradient norm (non-finite first).
  Runs on the host (it reads the state's values): call it when
  :func:`optax_guard.metrics` reports a skip, a spike or ``diverged``, or
  every so many steps.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> params = {'dense': {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)}}
    >>> tx = og.guard(optax.sgd(0.1), granularity='leaf')
    >>> state = tx.init(params)
    >>> grads = {'dense': {'w': jnp.full((2, 2), 5.0), 'b': jnp.array([jnp.nan, 0.0])}}
    >>> _, state = tx.update(grads, state, params)
    >>> report = og.diagnose(state, params)
    >>> report.nonfinite, report.exploded
    (("['dense']['b']",), ("['dense']['w']",))
    >>> report.worst
    (("['dense']['b']", nan), ("['dense']['w']", 10.0))

  Args:
    opt_state: an optimizer state holding a guard state (anywhere), or an
      :class:`flax.nnx.Optimizer`.
    params: the parameters, or the :class:`flax.nnx.Module` the optimizer
      updates.
    explode_ratio: gradient / parameter norm above which a leaf exploded (>
      0).
    vanishing_steps: accepted steps in a row below the vanishing ratio after
      which a leaf vanished (>= 1).

  Returns:
    A :class:`Diagnosis`.

  Raises:
    ValueError: for a bad argument, or if ``opt_state`` holds no guard state.
  """
  if not explode_ratio > 0:
    raise ValueError(f'explode_ratio must be > 0, got {explode_ratio!r}.')
  if not isinstance(vanishing_steps, int) or vanishing_steps < 1:
    raise ValueError(
        f'vanishing_steps must be an int >= 1, got {vanishing_steps!r}.'
    )
  guards = _states.find_states(opt_state, _guard.GuardState)
  if not guards:
    raise ValueError(
        'opt_state holds no GuardState: build the optimizer with og.guard,'
        ' og.skip_nonfinite or og.skip_spikes.'
    )
  state = guards[0][1]
  leaves = _numerics.float_leaf_paths(_params_tree(opt_state, params))
  names = [jax.tree_util.keystr(path) for path, _ in leaves]
  sizes = np.array([np.size(x) for _, x in leaves], np.int64)
  param_norms = _numerics.leaf_vector(
      _numerics.norm_stats([x for _, x in leaves]).leaf_norms)
  grad_norms, param_norms, counters = jax.device_get(
      (state.leaf_norms, param_norms, state.vanishing))
  if len(grad_norms) != len(names):
    raise ValueError(
        f'params has {len(names)} floating leaves but the guard saw'
        f' {len(grad_norms)}: pass the params the optimizer updates.'
    )
  scales = np.asarray(_vanishing.floored_param_norm(param_norms, sizes))
  finite = np.isfinite(grad_norms)
  ratios = grad_norms.astype(np.float64) / scales.astype(np.float64)
  vanished: tuple[str, ...] = ()
  if counters is not None:
    vanished = tuple(n for n, c in zip(names, counters) if c >= vanishing_steps)
  return Diagnosis(
      nonfinite=tuple(n for n, ok in zip(names, finite) if not ok),
      exploded=tuple(n for n, ok, r in zip(names, finite, ratios)
                     if ok and r > explode_ratio),
      vanished=vanished,
      ratios={n: float(r) for n, ok, r in zip(names, finite, ratios) if ok},
      vanishing_tracked=counters is not None,
      worst=_rank({n: float(g) for n, g in zip(names, grad_norms)}),
      nonfinite_params=tuple(
          n for n, norm in zip(names, param_norms) if not np.isfinite(norm)),
  )
