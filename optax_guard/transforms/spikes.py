"""The spike rule: a loss or norm above ``mean + sigma * std`` of recent steps.

The window holds the last accepted losses and pre-clip global gradient norms
in two ring buffers. Only accepted (finite, non-spike) values enter it, so a
spike cannot widen the bounds for the next one.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class SpikeWindow(NamedTuple):
  """The last ``window`` accepted losses and global gradient norms.

  Attributes:
    losses: ring buffer of accepted losses (meaningful when a loss was given).
    grad_norms: ring buffer of accepted pre-clip global gradient norms.
    count: how many accepted steps were ever recorded (saturating).
  """

  losses: jax.Array
  grad_norms: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count


class SpikeConfig(NamedTuple):
  """Validated options of the spike check (see :func:`optax_guard.skip_spikes`)."""

  window: int
  sigma: float
  min_history: int


def spike_config(
    window: int = 128, sigma: float = 6.0, min_history: Optional[int] = None
) -> SpikeConfig:
  """Checks the spike options and fills in ``min_history``.

  Examples:
    >>> from optax_guard.transforms.spikes import spike_config
    >>> spike_config(window=64)
    SpikeConfig(window=64, sigma=6.0, min_history=32)

  Args:
    window: how many recent accepted steps the statistics cover (>= 2).
    sigma: how many standard deviations above the mean is a spike (> 0).
    min_history: accepted steps needed before any spike is called; default
      ``max(20, window // 2)``, capped at ``window``.

  Returns:
    A :class:`SpikeConfig`.

  Raises:
    ValueError: for an option out of range.
  """
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


def init_window(config: SpikeConfig) -> SpikeWindow:
  """An empty window (fresh buffers: each can be donated on its own)."""
  return SpikeWindow(
      losses=jnp.zeros((config.window,), jnp.float32),
      grad_norms=jnp.zeros((config.window,), jnp.float32),
      count=jnp.zeros((), jnp.int32),
  )


def _upper_bound(values: jax.Array, size: jax.Array, sigma: float):
  """``mean + sigma * std`` (Bessel-corrected) of ``values[:size]``."""
  valid = jnp.arange(values.shape[0]) < size
  n = jnp.maximum(size, 2).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, values, 0)) / jnp.maximum(size, 1)
  squares = jnp.sum(jnp.where(valid, jnp.square(values - mean), 0))
  return mean + sigma * jnp.sqrt(squares / (n - 1))


def is_spike(
    window: SpikeWindow,
    config: SpikeConfig,
    loss: Optional[jax.Array],
    grad_norm: jax.Array,
) -> jax.Array:
  """Whether ``loss`` or ``grad_norm`` exceeds the window's upper bound.

  Never before ``config.min_history`` values are in.
  """
  size = jnp.minimum(window.count, config.window)
  ready = size >= config.min_history
  spike = grad_norm > _upper_bound(window.grad_norms, size, config.sigma)
  if loss is not None:
    spike |= loss > _upper_bound(window.losses, size, config.sigma)
  return ready & spike


def record(
    window: SpikeWindow,
    config: SpikeConfig,
    loss: Optional[jax.Array],
    grad_norm: jax.Array,
    accept: jax.Array,
) -> SpikeWindow:
  """The window with this step's values added if ``accept``, else as it was."""
  slot = window.count % config.window
  losses = window.losses if loss is None else window.losses.at[slot].set(loss)
  recorded = SpikeWindow(
      losses=losses,
      grad_norms=window.grad_norms.at[slot].set(grad_norm),
      count=optax.safe_increment(window.count),
  )
  return jax.tree.map(
      lambda new, old: jnp.where(accept, new, old), recorded, window
  )
