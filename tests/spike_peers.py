"""Spike-skipping decisions of OLMo-core and MaxText, ported to pure JAX.

Each rule is a :class:`Rule`: ``init()`` gives its state and
``step(state, loss, grad_norm)`` returns ``(skipped, new_state)`` for one
step. Only the decision and the window admission are ported, exactly as the
sources do them (window length, warm-up, Bessel-corrected statistics, the
``<=`` comparison, which values enter the window); the optimizer around them
is not. Every rule here also skips a step with a non-finite loss or gradient
norm, as the frameworks' separate NaN checks do, but what enters the window
is the ported rule's own business (both peers append whatever they see, NaN
included).

Sources (read through the project's code index):

* MaxText ``skip_step_on_spikes`` and ``_compute_rolling_stats``:
  ``src/maxtext/optimizers/optimizers.py`` in ``pingzhili/maxtext`` at
  commit ``284a8344b6078481d6771edc3eb2d5b1c9d95c43`` (a fork carrying
  AI-Hypercomputer/maxtext pull request #3490 unchanged; the stored upstream
  commit ``a90f9925425fac5c94a811276fffe303bd198a50`` predates it).
* OLMo-core ``SkipStepOptimizer.get_step_factor`` and the
  ``latest_loss``/``latest_grad_norm`` setters:
  ``src/olmo_core/optim/skip_step_muon.py`` in ``allenai/OLMo-core`` at
  commit ``39e270769b37d0b39a8871eec72fd1f8f86cc474`` (warm-up
  ``max(2, window // 2)``); ``src/olmo_core/optim/skip_step_optimizer.py``
  at commit ``a14de852ba73e34bff26d6955805e3d11325f08b`` holds the same
  decision with the older warm-up ``max(20, window // 2)``.
* optax_guard before issue 12: ``_is_spike`` and ``_record`` of
  ``optax_guard/transforms/guard.py`` at commit ``5955972`` (only accepted
  values enter; warm-up ``max(20, window // 2)`` values).
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

import optax

import optax_guard as og


class Rule(NamedTuple):
  """A spike decision as a pure step function."""

  name: str
  init: Callable[[], Any]
  step: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


def _finite(loss, grad_norm):
  return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


# -- MaxText ------------------------------------------------------------------


def _maxtext_rolling_stats(arr, count, interval):
  """``_compute_rolling_stats``: mean and Bessel std of the valid entries."""
  valid_elements = jnp.minimum(count, interval)
  safe_elements = jnp.maximum(1, valid_elements)
  mask = jnp.arange(interval) < valid_elements
  mean = jnp.sum(jnp.where(mask, arr, 0.0)) / safe_elements
  sq_diff = jnp.where(mask, (arr - mean) ** 2, 0.0)
  variance = jnp.sum(sq_diff) / jnp.maximum(1, valid_elements - 1)
  return mean, jnp.sqrt(variance)


def maxtext(interval: int = 128, scaling_factor: float = 6.0) -> Rule:
  """MaxText's ``skip_step_on_spikes`` decision and buffer update.

  The buffers of the last ``interval`` losses and norms take every step's
  values, skipped or not ("append even if skipped so spikes can become the
  new baseline"); the check starts when ``count + 1 >= max(2, interval //
  2)``.
  """

  def init():
    return {
        'losses': jnp.zeros(interval, jnp.float32),
        'grad_norms': jnp.zeros(interval, jnp.float32),
        'count': jnp.zeros((), jnp.int32),
    }

  def step(state, loss, grad_norm):
    count = state['count']
    loss_mean, loss_std = _maxtext_rolling_stats(state['losses'], count,
                                                 interval)
    norm_mean, norm_std = _maxtext_rolling_stats(state['grad_norms'], count,
                                                 interval)
    is_ok = ((loss - loss_mean) <= scaling_factor * loss_std) & (
        (grad_norm - norm_mean) <= scaling_factor * norm_std)
    min_history = max(2, interval // 2)
    is_ok = ((count + 1) < min_history) | is_ok
    idx = count % interval
    new_state = {
        'losses': state['losses'].at[idx].set(loss),
        'grad_norms': state['grad_norms'].at[idx].set(grad_norm),
        'count': count + 1,
    }
    return ~(is_ok & _finite(loss, grad_norm)), new_state

  return Rule(f'MaxText (interval={interval})', init, step)


# -- OLMo-core ----------------------------------------------------------------


def _torch_std_mean(values, size):
  """``torch.std_mean`` (unbiased) of ``values[:size]``; NaN std if size 1."""
  valid = jnp.arange(values.shape[0]) < size
  n = size.astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, values, 0.0)) / n
  squares = jnp.sum(jnp.where(valid, (values - mean) ** 2, 0.0))
  return jnp.sqrt(squares / (n - 1)), mean


def olmo_core(rolling_interval_length: int = 128, sigma_factor: float = 6.0,
              warmup: Optional[int] = None) -> Rule:
  """OLMo-core's ``SkipStepOptimizer.get_step_factor`` with its lists.

  The trainer appends every step's loss and norm (skipped or not) to lists
  capped at ``rolling_interval_length + 1``; the decision compares the latest
  with ``std_mean`` of the others once the list holds ``warmup`` values
  (``max(2, rolling_interval_length // 2)``, or ``max(20, ...)`` before
  2025). Here the list minus its latest value is a ring of
  ``rolling_interval_length`` entries, in which order does not matter.
  """
  window = rolling_interval_length
  if warmup is None:
    warmup = max(2, window // 2)

  def init():
    return {
        'losses': jnp.zeros(window, jnp.float32),
        'grad_norms': jnp.zeros(window, jnp.float32),
        'count': jnp.zeros((), jnp.int32),
    }

  def step(state, loss, grad_norm):
    count = state['count']  # values before this one
    history = jnp.minimum(count, window)
    loss_std, loss_mean = _torch_std_mean(state['losses'], history)
    norm_std, norm_mean = _torch_std_mean(state['grad_norms'], history)
    proceed = ((loss - loss_mean) <= sigma_factor * loss_std) & (
        (grad_norm - norm_mean) <= sigma_factor * norm_std)
    proceed = (history + 1 < warmup) | proceed
    idx = count % window
    new_state = {
        'losses': state['losses'].at[idx].set(loss),
        'grad_norms': state['grad_norms'].at[idx].set(grad_norm),
        'count': count + 1,
    }
    return ~(proceed & _finite(loss, grad_norm)), new_state

  name = f'OLMo-core (window={window}'
  name += ')' if warmup == max(2, window // 2) else f', warm-up {warmup})'
  return Rule(name, init, step)


# -- optax_guard before issue 12 ---------------------------------------------


def previous(window: int = 128, sigma: float = 6.0) -> Rule:
  """optax_guard's rule before issue 12: only accepted values enter."""
  min_history = min(window, max(20, window // 2))

  def bound(values, size):
    valid = jnp.arange(window) < size
    n = jnp.maximum(size, 2).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, values, 0)) / jnp.maximum(size, 1)
    squares = jnp.sum(jnp.where(valid, jnp.square(values - mean), 0))
    return mean + sigma * jnp.sqrt(squares / (n - 1))

  def init():
    return {
        'losses': jnp.zeros(window, jnp.float32),
        'grad_norms': jnp.zeros(window, jnp.float32),
        'count': jnp.zeros((), jnp.int32),
    }

  def step(state, loss, grad_norm):
    size = jnp.minimum(state['count'], window)
    spike = (size >= min_history) & (
        (grad_norm > bound(state['grad_norms'], size))
        | (loss > bound(state['losses'], size)))
    accept = ~spike & _finite(loss, grad_norm)
    slot = state['count'] % window
    recorded = {
        'losses': state['losses'].at[slot].set(loss),
        'grad_norms': state['grad_norms'].at[slot].set(grad_norm),
        'count': state['count'] + 1,
    }
    new_state = jax.tree.map(lambda n, o: jnp.where(accept, n, o), recorded,
                             state)
    return ~accept, new_state

  return Rule(f'optax_guard before (window={window})', init, step)


# -- ours, through og.guard ---------------------------------------------------


def ours(**options) -> Rule:
  """``og.guard(optax.sgd(0.0), spikes=options)`` fed the values directly.

  The gradient is the one-element vector ``[grad_norm]``, so its global norm
  is ``grad_norm`` (and a NaN norm is a NaN gradient); the loss goes in as
  ``value=``. The decision is the guard's ``skipped`` flag.
  """
  tx = og.guard(optax.sgd(0.0), spikes=options)
  params = {'w': jnp.zeros(1)}

  def step(state, loss, grad_norm):
    _, state = tx.update({'w': grad_norm[None]}, state, params, value=loss)
    return state.last_step.skipped, state

  details = ', '.join(f'{k}={v}' for k, v in options.items())
  return Rule(f'ours ({details or "defaults"})', lambda: tx.init(params),
              step)


def run(rule: Rule, losses: jax.Array, grad_norms: jax.Array) -> jax.Array:
  """The rule's skip decision at every step of the sequences, as booleans."""

  def body(state, values):
    skipped, state = rule.step(state, *values)
    return state, skipped

  _, skipped = jax.lax.scan(
      body, rule.init(),
      (jnp.asarray(losses, jnp.float32), jnp.asarray(grad_norms, jnp.float32)),
  )
  return skipped
