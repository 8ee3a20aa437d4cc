"""Vanishing-gradient counters: per leaf, accepted steps in a row whose
gradient norm stayed below ``ratio`` times the parameter's norm.

The counters are one int32 vector with an entry per floating leaf (the order
of :func:`optax_guard.transforms.numerics.leaf_vector`), so a step updates
them in one elementwise kernel; :func:`optax_guard.diagnose` names them.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_guard.transforms import numerics as _numerics

# Parameter norms below this root-mean-square are treated as this RMS when a
# gradient is compared with its parameter, so that zero-initialised leaves
# (biases) have a scale (the default ``eps`` of AGC, per element).
PARAM_RMS_FLOOR = 1e-3


def floored_param_norm(param_norm: Any, size: Any) -> Any:
  """``max(param_norm, PARAM_RMS_FLOOR * sqrt(size))``, elementwise.

  Examples:
    >>> from optax_guard.transforms.vanishing import floored_param_norm
    >>> float(floored_param_norm(0.0, 10**6)), float(floored_param_norm(3.0, 10**6))
    (1.0, 3.0)

  Args:
    param_norm: parameter norm(s).
    size: the number(s) of elements of the parameter(s).

  Returns:
    The floored norm(s).
  """
  # The floor of a static size, in float64 and rounded once.
  floor = np.float32(PARAM_RMS_FLOOR * np.sqrt(np.asarray(size, np.float64)))
  return jnp.maximum(param_norm, floor)


def leaf_sizes(params: Any) -> np.ndarray:
  """The element counts of the floating leaves of ``params`` (static)."""
  return np.array(
      [np.size(x) for _, x in _numerics.float_leaf_paths(params)], np.int64
  )


def init_counters(params: Any) -> jax.Array:
  """Zero counters, one per floating leaf of ``params``."""
  return jnp.zeros((len(_numerics.float_leaf_paths(params)),), jnp.int32)


def count(
    steps: jax.Array,
    grad_norms: jax.Array,
    params: Any,
    ratio: float,
    healthy: Optional[jax.Array] = None,
) -> jax.Array:
  """The counters after an accepted step.

  A leaf whose gradient norm is below ``ratio`` times its floored
  (overflow-safe) parameter norm counts one more step (saturating), any
  other leaf restarts from zero; an unhealthy leaf (``healthy`` False) keeps
  its count.

  Args:
    steps: the counters.
    grad_norms: this step's per-leaf gradient norms (float32 vector).
    params: the parameters before the update.
    ratio: the vanishing ratio.
    healthy: per leaf, whether it took part in the step (``None``: all).

  Returns:
    The new counters.
  """
  param_norms = _numerics.leaf_vector(_numerics.norm_stats(params).leaf_norms)
  scale = floored_param_norm(param_norms, leaf_sizes(params))
  counted = jnp.where(grad_norms < ratio * scale, optax.safe_increment(steps), 0)
  if healthy is None:
    return counted
  return jnp.where(healthy, counted, steps)
