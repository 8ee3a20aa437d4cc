"""Per-leaf diagnostics on the host: which leaves went wrong, by name."""

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from optax_guard.transforms import guard as _guard
from optax_guard.transforms import numerics as _numerics


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
  """

  nonfinite: tuple[str, ...]
  exploded: tuple[str, ...]
  vanished: tuple[str, ...]
  ratios: dict[str, float]
  vanishing_tracked: bool

  @property
  def healthy(self) -> bool:
    """No leaf is non-finite, exploded or vanished."""
    return not (self.nonfinite or self.exploded or self.vanished)

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
    if not self.vanishing_tracked:
      lines.append('(vanishing not tracked: build the guard with'
                   ' vanishing_ratio=...)')
    return '\n'.join(lines)


def _outermost_guard_state(opt_state: Any) -> _guard.GuardState:
  is_guard_state = lambda x: isinstance(x, _guard.GuardState)
  for node in jax.tree.leaves(opt_state, is_leaf=is_guard_state):
    if is_guard_state(node):
      return node
  raise ValueError(
      'opt_state holds no GuardState: build the optimizer with og.guard,'
      ' og.skip_nonfinite or og.skip_spikes.'
  )


def diagnose(
    opt_state: Any,
    params: Any,
    *,
    explode_ratio: float = 1.0,
    vanishing_steps: int = 100,
) -> Diagnosis:
  """Names the parameter leaves whose gradients went wrong.

  Reads the per-leaf gradient norms of the last step that the guard keeps in
  its state (:class:`optax_guard.GuardState` ``leaf_norms``) and compares
  them with the norms of ``params``. A leaf is

  * *non-finite* if its last gradient held a NaN or an Inf (with
    ``og.guard(..., granularity="leaf")``, the leaves that were held);
  * *exploded* if its last gradient norm exceeded ``explode_ratio`` times its
    parameter norm, floored at a root-mean-square of ``1e-3`` so that a
    zero-initialised bias has a scale (the ``eps`` of AGC);
  * *vanished* if, for ``vanishing_steps`` accepted steps in a row, its
    gradient norm stayed below the guard's ``vanishing_ratio`` times that
    parameter norm (tracked only by a guard built with ``vanishing_ratio``).

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
  wrt = nnx.Param
  if isinstance(opt_state, nnx.Optimizer):
    wrt = opt_state.wrt
    opt_state = opt_state.opt_state
  if isinstance(params, nnx.Module):
    params = nnx.state(params, wrt)
  state = _outermost_guard_state(nnx.as_pure(opt_state))
  params = nnx.as_pure(params)
  param_norms = _numerics.norm_stats(params).leaf_norms
  counters = state.leaf_vanishing_steps
  tracked = counters is not None
  if not tracked:
    counters = jax.tree.map(lambda _: None, state.leaf_norms,
                            is_leaf=lambda x: x is None)
  host = jax.device_get((state.leaf_norms, param_norms, counters))

  nonfinite, exploded, vanished, ratios = [], [], [], {}

  def visit(path, grad_norm, param_norm, steps, param):
    if grad_norm is None:
      return
    name = jax.tree_util.keystr(path)
    grad_norm = float(grad_norm)
    if not math.isfinite(grad_norm):
      nonfinite.append(name)
      return
    scale = float(_guard.floored_param_norm(np.float32(param_norm),
                                            int(np.size(param))))
    ratios[name] = grad_norm / scale
    if grad_norm > explode_ratio * scale:
      exploded.append(name)
    if steps is not None and int(steps) >= vanishing_steps:
      vanished.append(name)

  jax.tree_util.tree_map_with_path(
      visit, *host, params, is_leaf=lambda x: x is None
  )
  return Diagnosis(
      nonfinite=tuple(nonfinite),
      exploded=tuple(exploded),
      vanished=tuple(vanished),
      ratios=ratios,
      vanishing_tracked=tracked,
  )
