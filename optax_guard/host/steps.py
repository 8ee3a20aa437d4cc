"""What :func:`optax_guard.fit` calls, and what it refuses to call.

The loop drives one of two step forms, chosen by the state: ``train_step(
params, opt_state, batch) -> (params, opt_state, metrics)``, or, when the
:class:`optax_guard.TrainState` holds ``model_state``, ``train_step(params,
opt_state, model_state, batch) -> (params, opt_state, model_state,
metrics)``. A step of another form is refused before anything is restored,
donated or saved, and ``eval_fn``'s results must be scalars (each is logged
and may rank a checkpoint).
"""

import inspect
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from optax_guard.host.state import TrainState


def run(train_step: Callable[..., Any], state: TrainState,
        batch: Any) -> tuple[TrainState, Mapping[str, Any]]:
  """One call of ``train_step`` in ``state``'s form: the next state (one
  more step) and the step's metrics."""
  if state.model_state is None:
    params, opt_state, metrics = train_step(state.params, state.opt_state,
                                            batch)
    return state._replace(step=state.step + 1, params=params,
                          opt_state=opt_state), metrics
  params, opt_state, model_state, metrics = train_step(
      state.params, state.opt_state, state.model_state, batch)
  return state._replace(step=state.step + 1, params=params,
                        opt_state=opt_state, model_state=model_state), metrics


def check(train_step: Callable[..., Any], state: TrainState) -> None:
  """Refuses a step that cannot take ``state``'s form.

  Raises:
    TypeError: naming the form og.fit calls and how to get it.
  """
  if type(train_step).__module__.startswith('flax.nnx'):
    raise TypeError(
        'train_step is compiled with flax.nnx (e.g. og.make_nnx_train_step):'
        ' it takes NNX objects, but og.fit passes arrays. Use'
        ' step, state = og.nnx_fit_step(loss_fn, model, optimizer), then'
        ' og.fit(step, state, ...) and og.nnx_update(model, optimizer,'
        ' result.state).')
  with_model_state = state.model_state is not None
  wanted = 4 if with_model_state else 3
  arity = _arity(train_step)
  if arity is None or arity == wanted:
    return
  if with_model_state:
    fix = ('with model_state in the TrainState, og.fit calls'
           ' train_step(params, opt_state, model_state, batch) ->'
           ' (params, opt_state, model_state, metrics): build it with'
           ' og.make_train_step(..., has_state=True)')
  else:
    fix = ('og.fit calls train_step(params, opt_state, batch) -> (params,'
           ' opt_state, metrics); a step that also threads model state needs'
           ' og.TrainState(..., model_state=...); an NNX step (model,'
           ' optimizer, batch) goes through og.nnx_fit_step')
  raise TypeError(
      f'train_step takes {arity} positional arguments, not {wanted}: {fix}.')


def _arity(train_step: Callable[..., Any]) -> Optional[int]:
  """How many positional arguments ``train_step`` requires, if it says."""
  try:
    parameters = inspect.signature(train_step).parameters.values()
  except (TypeError, ValueError):
    return None
  if any(p.kind == p.VAR_POSITIONAL for p in parameters):
    return None
  return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
             and p.default is p.empty for p in parameters)


def scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Scalar metrics as Python numbers (one device-to-host transfer)."""
  fetched = jax.device_get(dict(metrics))
  return {
      name: np.asarray(value).item()
      for name, value in fetched.items()
      if np.ndim(value) == 0
  }


def eval_scalars(result: Any) -> dict[str, Any]:
  """``eval_fn``'s result as Python numbers.

  Raises:
    TypeError: for anything but a mapping of scalars, naming the fix.
  """
  if not isinstance(result, Mapping):
    raise TypeError(
        'eval_fn must return a mapping of scalar metrics, e.g.'
        f" {{'eval_loss': loss}}; it returned {type(result).__name__}"
        f' {result!r:.80}.')
  fetched = jax.device_get(dict(result))
  shaped = {name: np.shape(value) for name, value in fetched.items()
            if np.ndim(value) != 0}
  if shaped:
    raise TypeError(
        'eval_fn must return scalar metrics (each is logged and can rank a'
        f' checkpoint); these are not scalars: {shaped}. Reduce them, e.g.'
        ' with jnp.mean.')
  return scalars(fetched)
