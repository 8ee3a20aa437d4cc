"""The jit-compiled train step, for plain pytrees and for Flax NNX.

Both forms differentiate the loss, hand it to the optimizer as ``value=``,
and update params and optimizer state with the optimizer's fused
update-and-apply where the composition allows it (:func:`plan_apply`): the
skip decision is taken on the gradients, and one ``lax.cond`` covers the
clip, the inner update and the parameter update, so an accepted step writes
params and state in place exactly like the bare optimizer. When the state
holds a :func:`optax_guard.dynamic_loss_scale`, the loss is multiplied by
its scale before differentiating.
"""

from typing import Any, Callable
import warnings

import jax
import jax.numpy as jnp
import optax

from optax_guard.transforms import accumulate as _accumulate
from optax_guard.transforms import fused as _fused
from optax_guard.transforms import guard as _guard
from optax_guard.transforms import loss_scale as _loss_scale
from optax_guard.transforms import metrics as _metrics
from optax_guard.transforms import states as _states


def plan_apply(tx: optax.GradientTransformation,
               opt_state: Any) -> _fused.ApplyFn:
  """``apply(grads, state, params, **extra_args) -> (new_params, new_state)``.

  The fused form (``tx.update(..., fuse_apply=True)``, see
  :mod:`optax_guard.transforms.fused`) when the optimizer state holds one
  guard (:class:`~optax_guard.transforms.guard.GuardState`) whose update is
  the last thing ``tx`` runs: ``tx`` is the guard, the guard is the last
  member of an :func:`optax.chain`, or it sits inside a
  :func:`optax_guard.dynamic_loss_scale` (any nesting of these). Without
  a guard, ``tx`` is fused if its type says so. Otherwise (a guard inside
  :class:`optax.MultiSteps`, :func:`optax.multi_transform`,
  :func:`optax.inject_hyperparams`, followed by another transformation, or
  two guards) it warns once, naming where the guard sits, and returns
  ``tx.update`` followed by :func:`optax.apply_updates`.

  Examples:
    >>> import warnings
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> from optax_guard.train_step import plan_apply
    >>> params = {'w': jnp.ones(2)}
    >>> tx = optax.chain(optax.scale(1.0), og.guard(optax.sgd(0.5)))
    >>> apply = plan_apply(tx, tx.init(params))  # fused: the guard is last
    >>> new_params, _ = apply({'w': jnp.ones(2)}, tx.init(params), params)
    >>> new_params['w'].tolist()
    [0.5, 0.5]

  Args:
    tx: the optimizer.
    opt_state: its state (arrays or shapes: only the structure is read).

  Returns:
    The apply function.

  Raises:
    ValueError: for a guard inside :class:`optax.MultiSteps` (use
      :func:`optax_guard.accumulate`) or :func:`optax.lookahead` (put the
      guard outside).
  """
  _states.check_guard_placement(opt_state, _guard.GuardState)
  guards = _states.find_states(opt_state, _guard.GuardState)
  if not guards:
    return _fused.update_and_apply(tx)
  path = guards[0][0]
  last = _states.is_last_in(opt_state, path, (_loss_scale.LossScaleState,
                                             _accumulate.AccumulateState,
                                             _accumulate.HeldModelState))
  if len(guards) == 1 and last and (
      path or isinstance(tx, _fused.FusedGradientTransformation)):
    return _fused.fused_apply(tx)
  where = ', '.join(
      f'{type(_states.pure_state(opt_state)).__name__}'
      f'{_states.path_name(p)}' for p, _ in guards)
  why = ('two guards' if len(guards) > 1 else
         'the guard is not the last transformation (or sits inside a'
         ' wrapper such as MultiSteps, multi_transform or inject_hyperparams)')
  warnings.warn(
      f'og.make_train_step cannot fuse the guard at {where} with the'
      f' parameter update: {why}. The step runs unfused, which materialises'
      ' one more updates tree (a params-sized write and read) per step. Put'
      ' og.guard last, e.g. optax.chain(..., og.guard(inner)).',
      stacklevel=2,
  )
  return _fused.unfused_apply(tx)


def _guard_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """``og.metrics`` of the state, or nothing for an unguarded optimizer."""
  try:
    return _metrics.metrics(opt_state)
  except ValueError:
    return {}


def _value_and_float_grad(fn, argnums=0, has_aux=False):
  """``jax.value_and_grad`` that leaves integer and boolean leaves alone.

  ``jax.value_and_grad`` refuses them; optax passes them through. With
  ``allow_int`` their gradient is a ``float0`` zero, which is replaced by a
  zero of the leaf's own dtype (what ``optax.adam`` expects).
  """
  grad_fn = jax.value_and_grad(fn, argnums=argnums, has_aux=has_aux,
                               allow_int=True)

  def wrapped(*args):
    value, grads = grad_fn(*args)
    primal = args[argnums]
    grads = jax.tree.map(
        lambda g, p: jnp.zeros(jnp.shape(p), jnp.result_type(p))
        if g.dtype == jax.dtypes.float0 else g, grads, primal)
    return value, grads

  return wrapped


def _split_aux(out: Any, has_aux: bool) -> tuple[Any, Any]:
  """``(loss, aux)`` of what ``loss_fn`` returned (``aux`` ``None`` without)."""
  if not has_aux:
    return out, None
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(
        'with has_aux=True, loss_fn must return (loss, aux), got a'
        f' {type(out).__name__}.'
    )
  return out


def _scaled_value_and_grad(loss_fn, has_aux, opt_state,
                           value_and_grad=jax.value_and_grad, argnums=0):
  """``value_and_grad`` of ``loss_fn``, times the state's loss scale if any.

  Returns a function giving ``(loss, aux, grads)`` with the loss unscaled and
  the gradients scaled (the loss scale transformation divides them).
  """
  scale_state = _loss_scale.find_loss_scale_state(opt_state)

  def scaled_loss(*args):
    loss, aux = _split_aux(loss_fn(*args), has_aux)
    # Before any cast: float32(int loss) would train on zero gradients,
    # float32(complex loss) on the real part.
    _guard.check_loss(loss, "loss_fn's loss", 'for (loss, aux) pass'
                      ' has_aux=True to the step builder.')
    scaled = loss
    if scale_state is not None:
      scaled = loss.astype(jnp.float32) * scale_state.loss_scale
    return scaled, (loss, aux)

  scaled_value_and_grad = value_and_grad(
      scaled_loss, argnums=argnums, has_aux=True
  )

  def fn(*args):
    (_, (loss, aux)), grads = scaled_value_and_grad(*args)
    return loss, aux, grads

  return fn


def _skipped(metrics: dict[str, Any]) -> Any:
  """Whether a guard skipped this step (``False`` without a guard)."""
  return metrics.get('skipped', jnp.zeros((), jnp.bool_))


def hold_if_skipped(skipped: jax.Array, new_state: Any, old_state: Any) -> Any:
  """Model state as it was before the step if the step was skipped.

  The forward pass of a skipped step still ran and wrote its mutable state
  (BatchNorm statistics, EMA buffers): from a NaN batch that is NaN. Each
  floating leaf of ``new_state`` is replaced by its old value where
  ``skipped``; other leaves (RNG counters, step counts) keep their new
  value. One ``jnp.where`` per leaf: the model state is small.

  Examples:
    A hand-written loop gets the same guarantee as the train steps:

    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_guard as og
    >>> from optax_guard.train_step import hold_if_skipped
    >>> tx = og.guard(optax.sgd(0.1))
    >>> params, stats = {'w': jnp.ones(2)}, {'mean': jnp.zeros(2)}
    >>> opt_state = tx.init(params)
    >>> grads, new_stats = {'w': jnp.array([jnp.nan, 1.0])}, {'mean': jnp.full(2, jnp.nan)}
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> stats = hold_if_skipped(og.metrics(opt_state)['skipped'], new_stats, stats)
    >>> stats['mean'].tolist()
    [0.0, 0.0]

  Args:
    skipped: a bool scalar, e.g. ``og.metrics(new_opt_state)['skipped']``.
    new_state: the model state the forward pass returned.
    old_state: the model state before the step (same structure).

  Returns:
    ``old_state``'s floating leaves where ``skipped``, else ``new_state``.

  Raises:
    TypeError: for an NNX module (hold its state instead, see below).
    ValueError: when the two states differ in structure.
  """
  nnx = _states.loaded_nnx()
  if nnx is not None and any(isinstance(s, nnx.Module)
                             for s in (new_state, old_state)):
    raise TypeError(
        'hold_if_skipped takes model state, not an NNX module: hold'
        ' nnx.state(model, nnx.BatchStat) (taken before and after the step)'
        ' and write it back with nnx.update(model, held); or train with'
        ' og.make_nnx_train_step, which does this.')
  try:
    return _accumulate.hold_floats(skipped, new_state, old_state)
  except ValueError as e:
    raise ValueError(
        'hold_if_skipped needs the model state before and after the step in'
        f' the same structure; got {jax.tree.structure(new_state)} and'
        f' {jax.tree.structure(old_state)}.') from e


def apply_gradients(state: Any, *, grads: Any, value: Any = None,
                    **fields: Any) -> Any:
  """``state.apply_gradients(grads=grads, **fields)``, guarded, with the loss.

  For a Flax ``flax.training.train_state.TrainState`` (or any subclass,
  such as one with a ``batch_stats`` field): Flax's own ``apply_gradients``
  cannot hand the loss to the optimizer, so a guard's loss rule (a NaN
  loss, a loss spike) never fires there. This passes ``value=`` and uses the
  guard's fused update-and-apply (:func:`plan_apply`), and it holds
  ``fields`` as the train steps hold model state: on a step the guard
  skipped each floating leaf of a field keeps its value in ``state`` (with
  :func:`optax_guard.accumulate` built with ``model_state=``, the fields
  passed are that model state: see
  :func:`optax_guard.transforms.accumulate.model_state_to_keep`).
  ``state.step`` counts calls, as Flax's does, skipped steps included; the
  optimizer's own count (schedules) counts applied steps. Call it inside
  your jitted step; with a :func:`optax_guard.dynamic_loss_scale`, use
  :func:`make_train_step`, which scales the loss before differentiating.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from flax.training import train_state
    >>> import optax_guard as og
    >>> state = train_state.TrainState.create(
    ...     apply_fn=None, params={'w': jnp.ones(2)},
    ...     tx=og.guard(optax.sgd(0.5)))
    >>> state = og.apply_gradients(state, grads={'w': jnp.ones(2)},
    ...                            value=jnp.float32(jnp.nan))
    >>> state.params['w'].tolist(), int(state.step)  # a NaN loss: held
    ([1.0, 1.0], 1)
    >>> bool(og.metrics(state.opt_state)['skipped'])
    True

  Args:
    state: a Flax ``TrainState`` (fields ``step``, ``params``, ``tx``,
      ``opt_state``; a ``replace`` method).
    grads: gradients with the structure of ``state.params``.
    value: the loss, handed to the optimizer as ``value=``.
    **fields: other fields to replace, e.g. ``batch_stats=new_stats``;
      held on a skipped step.

  Returns:
    The new state.

  Raises:
    ValueError: for gradients with an ``overwrite_with_gradient``
      collection (Flax's fp8 path), which this does not handle.
  """
  if isinstance(grads, dict) and 'overwrite_with_gradient' in grads:
    raise ValueError(
        'og.apply_gradients does not handle the overwrite_with_gradient'
        ' collection (fp8 training); call state.apply_gradients for it.')
  apply = plan_apply(state.tx, state.opt_state)
  params, opt_state = apply(grads, state.opt_state, state.params, value=value)
  old_fields = {name: getattr(state, name) for name in fields}
  held, opt_state = _accumulate.model_state_to_keep(
      state.opt_state, opt_state, fields, old_fields,
      _skipped(_guard_metrics(opt_state)))
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state, **held)


def _step_metrics(loss, aux, opt_state, has_aux) -> dict[str, Any]:
  metrics = {'loss': loss, **_guard_metrics(opt_state)}
  if has_aux:
    metrics['aux'] = aux
  return metrics


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    has_state: bool = False,
    donate: bool = True,
) -> Callable[..., tuple[Any, ...]]:
  """Builds ``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

  The step is one ``jax.jit`` computation: gradients of ``loss_fn(params,
  batch)``, then the optimizer's update with the loss as ``value=``, then the
  parameter update. With a guard (``tx`` itself, last in a chain, or inside
  :func:`optax_guard.dynamic_loss_scale`), the last two are its fused form:
  the decision is taken on the gradients and one ``lax.cond`` covers clip,
  inner update and parameter update, so that params and state are updated
  in place; state and metrics equal those of ``tx.update`` followed by
  :func:`optax.apply_updates` bit for bit, params within one rounding.
  Where the composition cannot be fused, :func:`plan_apply` warns when the
  step is traced. When the state holds a
  :func:`optax_guard.dynamic_loss_scale`, the loss is multiplied by the
  current scale before differentiating (the metrics report it unscaled).

  ``metrics`` holds ``loss`` (and ``aux`` with ``has_aux``) plus
  :func:`optax_guard.metrics` of the new state.

  With ``has_state``, the model has mutable state (a Linen collection such as
  ``batch_stats``): ``loss_fn(params, model_state, batch)`` returns ``(loss,
  new_model_state)`` (``((loss, aux), new_model_state)`` with ``has_aux``)
  and the step is ``step(params, opt_state, model_state, batch) -> (params,
  opt_state, model_state, metrics)``. On a skipped step the model state is
  returned as it was, bit for bit, like params and optimizer state (see
  :func:`hold_if_skipped`, which a hand-written loop can call); with
  :func:`optax_guard.accumulate` built with ``model_state=``, it is the
  state that exactly the applied micro-batches produce
  (:func:`optax_guard.transforms.accumulate.model_state_to_keep`). Integer and
  boolean leaves of ``params`` are not differentiated (their gradient is
  zero, as ``jax.grad(allow_int=True)`` gives) and pass through unchanged.

  Nothing in the step waits for
  the host. Shardings are kept: params and state sharded over a
  :class:`jax.sharding.Mesh` come back with the same shardings, and every
  check reduces over the whole (global) gradient, so all devices and
  processes take the same decision.

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

  The loss must be a real floating-point scalar of any float dtype (the
  guard reads it as float32, and a loss scale multiplies it in float32, so
  that a float16 loss times the scale cannot overflow): an integer,
  complex or non-scalar loss, or a ``(loss, aux)`` tuple without
  ``has_aux``, is a ``TypeError`` naming its dtype and shape, raised when
  the step is traced.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning a scalar loss, or ``(loss,
      aux)`` with ``has_aux``.
    tx: the optimizer, typically built with :func:`optax_guard.guard`.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    has_state: whether the model has mutable state, threaded through the
      step and held on a skipped step (see above).
    donate: donate ``params`` and ``opt_state`` (and ``model_state``) to the
      step, so that they are updated in place (the caller must not reuse the
      arrays passed in).

  Returns:
    The jitted step function.
  """

  def differentiated(params, opt_state, *inputs):
    grad_fn = _scaled_value_and_grad(loss_fn, has_aux, opt_state,
                                     value_and_grad=_value_and_float_grad)
    loss, aux, grads = grad_fn(params, *inputs)
    apply = plan_apply(tx, opt_state)
    params, opt_state = apply(grads, opt_state, params, value=loss)
    return params, opt_state, loss, aux

  def step(params, opt_state, batch):
    params, opt_state, loss, aux = differentiated(params, opt_state, batch)
    return params, opt_state, _step_metrics(loss, aux, opt_state, has_aux)

  def stateful_loss(params, model_state, batch):
    out, new_model_state = loss_fn(params, model_state, batch)
    loss, aux = _split_aux(out, has_aux)
    return loss, (aux, new_model_state)

  def stateful_step(params, opt_state, model_state, batch):
    grad_fn = _scaled_value_and_grad(stateful_loss, True, opt_state,
                                     value_and_grad=_value_and_float_grad)
    loss, (aux, new_model_state), grads = grad_fn(params, model_state, batch)
    new_params, new_opt_state = plan_apply(tx, opt_state)(
        grads, opt_state, params, value=loss)
    metrics = _step_metrics(loss, aux, new_opt_state, has_aux)
    model_state, new_opt_state = _accumulate.model_state_to_keep(
        opt_state, new_opt_state, new_model_state, model_state,
        _skipped(metrics))
    return new_params, new_opt_state, model_state, metrics

  # keep_unused: the guard's last-step telemetry is overwritten without being
  # read; jit would prune it from the arguments and not donate its buffers.
  if has_state:
    return jax.jit(stateful_step, donate_argnums=(0, 1, 2) if donate else (),
                   keep_unused=True)
  return jax.jit(step, donate_argnums=(0, 1) if donate else (),
                 keep_unused=True)


def make_nnx_train_step(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    donate: bool = True,
) -> Callable[..., dict[str, jax.Array]]:
  """Builds ``step(model, optimizer, batch) -> metrics`` for Flax NNX.

  ``optimizer`` is an :class:`flax.nnx.Optimizer` (its ``wrt`` filter picks
  the differentiated variables); the step updates ``model`` and
  ``optimizer`` in place. It is :func:`make_train_step` for NNX: gradients
  of ``loss_fn(model, batch)`` (times the loss scale, if the optimizer holds
  one), then the fused guard update, under one :func:`flax.nnx.jit`. The
  model, its optimizer state and ``optimizer.step`` end up exactly as after
  ``optimizer.update(model, grads, value=loss)``, with one difference: on a
  step a guard skipped, every floating variable outside ``wrt`` that the
  forward pass wrote (:class:`flax.nnx.BatchStat`, EMA buffers, ...) is set
  back to its value before the step, bit for bit, so that a NaN batch
  cannot poison the running statistics. RNG counters
  (:class:`flax.nnx.RngState`) still advance. A hand-written loop gets the
  same with :func:`hold_if_skipped`. With :func:`optax_guard.accumulate`
  (built with ``model_state=nnx.state(model, nnx.BatchStat)``), the
  statistics of a dropped micro-batch and of every micro-batch of a skipped
  macro step are undone.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from flax import nnx
    >>> import optax_guard as og
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> tx = og.guard(optax.adam(1e-2), clip=og.zclip())
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> loss_fn = lambda model, batch: jnp.mean((model(batch['x']) - batch['y']) ** 2)
    >>> step = og.make_nnx_train_step(loss_fn)
    >>> batch = {'x': jnp.ones((4, 2)), 'y': jnp.zeros((4, 1))}
    >>> m = step(model, optimizer, batch)
    >>> bool(m['skipped']), int(optimizer.step[...])
    (False, 1)

  The loss contract is :func:`make_train_step`'s.

  Args:
    loss_fn: ``loss_fn(model, batch)`` returning a scalar loss, or ``(loss,
      aux)`` with ``has_aux``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    donate: donate the model's and the optimizer's arrays to the step.

  Returns:
    The step function, compiled with :func:`flax.nnx.jit`.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return nnx.jit(nnx_step_body(loss_fn, has_aux=has_aux),
                 donate_argnums=(0, 1) if donate else None)


def nnx_step_body(loss_fn: Callable[..., Any], *,
                  has_aux: bool = False) -> Callable[..., Any]:
  """The body of :func:`make_nnx_train_step`, not compiled.

  ``step(model, optimizer, batch) -> metrics``, updating both in place; for
  a caller that compiles it within its own function (as
  :func:`optax_guard.nnx_fit_step` does around ``nnx.merge``).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def step(model, optimizer, batch):
    # Flax versions before nnx.Optimizer(graph=...) take no graph argument.
    graph = getattr(optimizer, 'graph', None)
    state_of = lambda node, *filters: nnx.state(
        node, *filters, **({} if graph is None else {'graph': graph}))
    # What the forward pass may write besides the parameters (BatchStat, EMA
    # buffers), as it was; RNG counters are left to advance.
    held_filter = nnx.All(nnx.Not(optimizer.wrt), nnx.Not(nnx.RngState))
    model_state_before = nnx.as_pure(state_of(model, held_filter))
    grad_fn = _scaled_value_and_grad(
        loss_fn, has_aux, optimizer.opt_state,
        value_and_grad=nnx.value_and_grad,
        argnums=nnx.DiffState(0, optimizer.wrt),
    )
    loss, aux, grads = grad_fn(model, batch)
    params = nnx.as_pure(state_of(model, optimizer.wrt))
    # nnx.value_and_grad has updated what the forward pass wrote.
    model_state_after = nnx.as_pure(state_of(model, held_filter))
    opt_state = nnx.as_pure(optimizer.opt_state)
    new_params, new_opt_state = plan_apply(optimizer.tx, opt_state)(
        nnx.as_pure(state_of(grads, optimizer.wrt)),
        opt_state, params, value=loss,
    )
    metrics = _step_metrics(loss, aux, new_opt_state, has_aux)
    model_state, new_opt_state = _accumulate.model_state_to_keep(
        opt_state, new_opt_state, model_state_after, model_state_before,
        _skipped(metrics))
    # As nnx.Optimizer.update does after tx.update and apply_updates.
    nnx.update(model, new_params)
    nnx.update(optimizer.opt_state, state_of(new_opt_state))
    optimizer.step[...] += 1
    nnx.update(model, model_state)
    return metrics

  return step
