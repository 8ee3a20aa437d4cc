"""The jit-compiled train step."""

from typing import Any, Callable

import jax
import optax

from optax_guard import _metrics


def _guard_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """``og.metrics`` of the state, or nothing for an unguarded optimizer."""
  try:
    return _metrics.metrics(opt_state)
  except ValueError:
    return {}


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
  """Builds ``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

  The step is one ``jax.jit`` computation: gradients of ``loss_fn(params,
  batch)``, ``tx.update(grads, opt_state, params, value=loss)``, and the
  parameter update. ``metrics`` holds ``loss`` (and ``aux`` with
  ``has_aux``) plus :func:`optax_guard.metrics` of the new state. Nothing in
  the step waits for the host.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> loss_fn = lambda p, batch: jnp.mean((batch['x'] * p['w'] - batch['y']) ** 2)
    >>> tx = og.guard(optax.sgd(0.1), clip=og.clip_by_global_norm(1.0))
    >>> step = og.make_train_step(loss_fn, tx)
    >>> params = {'w': jnp.array(0.0)}
    >>> opt_state = tx.init(params)
    >>> batch = {'x': jnp.array([1.0, 2.0]), 'y': jnp.array([2.0, 4.0])}
    >>> params, opt_state, m = step(params, opt_state, batch)
    >>> float(m['loss']), bool(m['skipped'])
    (10.0, False)

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning a scalar loss, or ``(loss,
      aux)`` with ``has_aux``.
    tx: the optimizer, typically built with :func:`optax_guard.guard`.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    donate: donate ``params`` and ``opt_state`` to the step, so that they are
      updated in place (the caller must not reuse the arrays passed in).

  Returns:
    The jitted step function.
  """
  tx = optax.with_extra_args_support(tx)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def step(params, opt_state, batch):
    loss, grads = grad_fn(params, batch)
    aux = None
    if has_aux:
      loss, aux = loss
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    params = optax.apply_updates(params, updates)
    metrics = {'loss': loss, **_guard_metrics(opt_state)}
    if has_aux:
      metrics['aux'] = aux
    return params, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())
