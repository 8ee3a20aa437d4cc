"""Flax models through :func:`optax_guard.fit` and the checkpoints.

:func:`optax_guard.fit` and :class:`optax_guard.Checkpointer` carry arrays:
an :class:`optax_guard.TrainState` of ``params``, ``opt_state`` and
``model_state``. An NNX model and its :class:`flax.nnx.Optimizer` are
objects that update in place. :func:`nnx_fit_step` splits them once into
that state (``params``: the variables the optimizer trains; ``model_state``:
every other variable of the model, BatchNorm statistics and RNG streams
included; ``opt_state``: ``{'opt_state': the optax state, 'step': the
optimizer's step}``, plain NamedTuples, so that :func:`optax_guard.metrics`
and recovery find the guard in it) and gives the pure
step that :func:`optax_guard.fit` drives: it merges them back inside the
compiled step, runs :func:`optax_guard.make_nnx_train_step`'s body, and
splits the result. :func:`nnx_update` writes a state back into the objects.
A Flax ``TrainState`` goes the same way through :func:`flax_fit_step` and
:func:`flax_state`; a Linen model with mutable collections needs no adapter
(:func:`optax_guard.make_train_step` with ``has_state``, and the
collections as ``model_state``).
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from optax_guard import train_step as _train_step
from optax_guard.host import checkpoint as _checkpoint


def nnx_fit_step(
    loss_fn: Callable[..., Any],
    model: Any,
    optimizer: Any,
    *,
    has_aux: bool = False,
    donate: bool = True,
) -> tuple[Callable[..., Any], _checkpoint.TrainState]:
  """``(train_step, state)`` for :func:`optax_guard.fit` from NNX objects.

  ``train_step(params, opt_state, model_state, batch) -> (params,
  opt_state, model_state, metrics)`` is :func:`optax_guard.make_nnx_train_step`
  in pure form (one ``jax.jit``; a skipped step holds the BatchNorm
  statistics, RNG streams advance), and ``state`` the
  :class:`optax_guard.TrainState` at step 0 of the objects as they are now.
  Every part of it is checkpointed, restored and rolled back by
  :func:`optax_guard.fit`. The objects themselves are not changed: after
  training, :func:`nnx_update` writes the final state into them.

  Examples:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> from flax import nnx
    >>> import optax_guard as og
    >>> model = nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(1)),
    ...                        nnx.Linear(4, 1, rngs=nnx.Rngs(2)))
    >>> optimizer = nnx.Optimizer(model, og.guard(optax.adam(1e-2)),
    ...                           wrt=nnx.Param)
    >>> loss_fn = lambda m, b: jnp.mean((m(b['x']) - b['y']) ** 2)
    >>> step, state = og.nnx_fit_step(loss_fn, model, optimizer)
    >>> x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(32, 2)
    >>> data = og.batches({'x': x, 'y': x.sum(1, keepdims=True)}, 8)
    >>> result = og.fit(step, state, data, num_steps=20, progress=False)
    >>> og.nnx_update(model, optimizer, result.state)
    >>> int(optimizer.step[...]), result.state.step
    (20, 20)

  Args:
    loss_fn: ``loss_fn(model, batch)`` returning the loss (``(loss, aux)``
      with ``has_aux``), as for :func:`optax_guard.make_nnx_train_step`.
    model: the NNX model.
    optimizer: its :class:`flax.nnx.Optimizer` (``wrt`` picks ``params``).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    donate: donate the state's arrays to the step.

  Returns:
    ``(train_step, state)``.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  wrt, tx = optimizer.wrt, optimizer.tx
  model_def, *states = nnx.split(model, wrt, ...)
  params, model_state = states
  body = _train_step.nnx_step_body(loss_fn, has_aux=has_aux)

  def step(params, opt_state, model_state, batch):
    model = nnx.merge(model_def, params, model_state)
    # A fresh optimizer given the state's values: its own init is dead code
    # that XLA removes.
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    _load_optimizer(optimizer, opt_state)
    metrics = body(model, optimizer, batch)
    _, params, model_state = nnx.split(model, wrt, ...)
    return params, _optimizer_state(optimizer), model_state, metrics

  # keep_unused: as in og.make_train_step, so that every buffer is donated.
  compiled = jax.jit(step, donate_argnums=(0, 1, 2) if donate else (),
                     keep_unused=True)
  # Copies: the state must not share buffers with the objects, whose arrays
  # the donating step would otherwise delete.
  state = _checkpoint.TrainState(
      step=0, params=_copy(params),
      opt_state=_copy(_optimizer_state(optimizer)),
      model_state=_copy(model_state))
  return compiled, state


def flax_fit_step(
    train_step: Callable[..., Any], state: Any, *, donate: bool = True,
) -> tuple[Callable[..., Any], _checkpoint.TrainState]:
  """``(train_step, state)`` for :func:`optax_guard.fit` from a Flax
  ``flax.training.train_state.TrainState``.

  ``train_step(state, batch) -> (state, metrics)`` is the user's Flax step
  (e.g. with :func:`optax_guard.apply_gradients`, which hands the loss to
  the guard); the returned step is the same computation on an
  :class:`optax_guard.TrainState` whose ``params`` and ``opt_state`` are the
  Flax state's and whose ``model_state`` holds every other array field (its
  ``step``, a subclass's ``batch_stats``, ...), so that all of it is
  checkpointed, restored and rolled back. :func:`flax_state` turns a state
  of that form back into a Flax ``TrainState``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> from flax.training import train_state
    >>> import optax_guard as og
    >>> state = train_state.TrainState.create(
    ...     apply_fn=None, params={'w': jnp.zeros(())},
    ...     tx=og.guard(optax.sgd(0.5)))
    >>> def flax_step(state, batch):
    ...   loss_fn = lambda p: jnp.mean((p['w'] * batch['x'] - batch['y']) ** 2)
    ...   loss, grads = jax.value_and_grad(loss_fn)(state.params)
    ...   state = og.apply_gradients(state, grads=grads, value=loss)
    ...   return state, {'loss': loss, **og.metrics(state.opt_state)}
    >>> step, fit_state = og.flax_fit_step(flax_step, state)
    >>> x = np.linspace(-1, 1, 64, dtype=np.float32)
    >>> data = og.batches({'x': x, 'y': 3 * x}, batch_size=16)
    >>> result = og.fit(step, fit_state, data, num_steps=50, progress=False)
    >>> trained = og.flax_state(state, result.state)
    >>> int(trained.step), round(float(trained.params['w']), 3)
    (50, 3.0)

  Args:
    train_step: ``train_step(state, batch) -> (state, metrics)``.
    state: the Flax ``TrainState`` to start from (also the template of
      :func:`flax_state`).
    donate: donate the state's arrays to the step.

  Returns:
    ``(train_step, state)``.
  """
  names = _array_fields(state)

  def step(params, opt_state, model_state, batch):
    new, metrics = train_step(
        state.replace(params=params, opt_state=opt_state, **model_state),
        batch)
    return (new.params, new.opt_state,
            {name: getattr(new, name) for name in names}, metrics)

  compiled = jax.jit(step, donate_argnums=(0, 1, 2) if donate else (),
                     keep_unused=True)
  fit_state = _checkpoint.TrainState(
      step=0, params=_copy(state.params), opt_state=_copy(state.opt_state),
      model_state=_copy({name: getattr(state, name) for name in names}))
  return compiled, fit_state


def flax_state(template: Any, state: _checkpoint.TrainState) -> Any:
  """The Flax ``TrainState`` of ``template``'s class and static fields
  (``apply_fn``, ``tx``) holding ``state``'s arrays (from
  :func:`flax_fit_step`'s form)."""
  return template.replace(params=state.params, opt_state=state.opt_state,
                          **state.model_state)


def _array_fields(state: Any) -> list[str]:
  """The pytree fields of a Flax struct besides params and opt_state."""
  return [field.name for field in dataclasses.fields(state)
          if field.metadata.get('pytree_node', True)
          and field.name not in ('params', 'opt_state')]


def nnx_update(model: Any, optimizer: Any,
               state: _checkpoint.TrainState) -> None:
  """Writes ``state`` (from :func:`nnx_fit_step`'s form, e.g. the state
  :func:`optax_guard.fit` returns) into ``model`` and ``optimizer``."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  nnx.update(model, state.params, state.model_state)
  _load_optimizer(optimizer, state.opt_state)


def _optimizer_state(optimizer: Any) -> dict[str, Any]:
  """The optimizer's optax state as plain NamedTuples (so that
  :func:`optax_guard.metrics`, recovery's diagnosis and learning-rate
  back-off find the guard in it) and its step count."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return {'opt_state': nnx.as_pure(optimizer.opt_state),
          'step': optimizer.step[...]}


def _load_optimizer(optimizer: Any, state: dict[str, Any]) -> None:
  from flax import nnx  # pylint: disable=g-import-not-at-top

  nnx.update(optimizer.opt_state, nnx.state(state['opt_state']))
  optimizer.step[...] = state['step']


def _copy(tree: Any) -> Any:
  """Fresh arrays of ``tree``'s leaves (a Python number becomes the array the
  step returns for it, e.g. Flax's ``step=0``)."""
  return jax.tree.map(jnp.array, tree)
