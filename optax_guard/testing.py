"""Fault injection for tests and benchmarks: faults ride along with batches.

Faults ride along with the batches, so one compiled train step serves clean
and faulty steps alike:

* :class:`FaultInjector` wraps a data iterator and adds ``fault_kind`` and
  ``fault_scale`` to every batch, following a plan (:func:`plan_faults`);
  the data faults (``poisoned_batch``, ``nan_batch`` and the slow ones) are
  applied right there, to the batch's data;
* :func:`with_faults` wraps a loss function so that, inside the jitted
  step, ``nan_grad`` / ``inf_grad`` replace the gradients with NaN / Inf,
  ``grad_spike`` multiplies them by ``fault_scale`` and ``nan_loss`` makes
  the loss NaN (gradients untouched);
* :class:`FlakyDevice` corrupts the gradient of chosen *calls* of a step
  (a host callback counts them), not of a batch: a transient fault, which
  the same step run again on the same batch does not repeat.

:func:`regression_data`, :func:`mlp_init`, :func:`mlp_apply` and :func:`mse`
make a small teacher-network problem to train on; the fault campaign of
``benchmarks/faults.py`` (``python -m benchmarks``) uses them.
"""

import collections
import functools
import math
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback


KINDS = ('nan_grad', 'inf_grad', 'grad_spike', 'nan_loss', 'poisoned_batch',
         'nan_batch')
# Data faults that build up or stay: they act on the batch only (the step
# sees no fault code), through :func:`ramp` and :func:`level_shift` plans.
SLOW_KINDS = ('poisoned_rows', 'noisy_targets')
_CODES = {'none': 0, **{kind: code for code, kind in enumerate(KINDS, 1)},
          **{kind: 0 for kind in SLOW_KINDS}}
_FIRST_KEY = {'index': 0, 'step': 1}  # FaultInjector's plan numberings.


class Fault(NamedTuple):
  """One injected fault.

  Attributes:
    kind: one of :data:`KINDS` or :data:`SLOW_KINDS`.
    scale: the gradient multiplier of ``grad_spike``, the data multiplier of
      ``poisoned_batch``, the fraction of rows replaced by noise of
      ``poisoned_rows``, the noise added to the last float array (the
      targets), in units of its standard deviation, of ``noisy_targets``
      (unused by the others).

  ``nan_batch`` makes every float array of the batch NaN, as a corrupt
  record does (integer arrays, such as token ids, cannot hold a NaN and are
  left as they are); a batch without a float array cannot carry it.

  ``poisoned_rows`` replaces the first ``round(scale * rows)`` rows of every
  array of the batch (seeded by the batch index): a float array's with
  Gaussian noise of its own standard deviation, an integer array's (token
  ids, class labels) with integers drawn uniformly from its own range
  ``[min, max]``. A float array with no spread (unit loss weights, a mask)
  and a bool array are left as they are: noise of zero spread would only
  zero the rows' weights and so drop them instead of corrupting them.

  Examples:
    >>> import numpy as np
    >>> from optax_guard import testing
    >>> batch = {'tokens': np.arange(12).reshape(4, 3),
    ...          'weights': np.ones((4, 3), np.float32)}
    >>> plan = {0: testing.Fault('poisoned_rows', 0.5)}
    >>> poisoned = next(testing.FaultInjector(iter([batch]), plan))
    >>> bool((poisoned['tokens'][:2] != batch['tokens'][:2]).any())
    True
    >>> poisoned['tokens'][2:].tolist(), poisoned['weights'].min()
    ([[6, 7, 8], [9, 10, 11]], np.float32(1.0))
  """

  kind: str
  scale: float = 1.0


def plan_faults(
    num_steps: int,
    num_faults: int,
    *,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    scale_range: tuple[float, float] = (1e3, 1e6),
    first_step: int = 0,
    bursts: int = 0,
    burst_length: int = 6,
) -> dict[int, Fault]:
  """A seeded plan: which batch (by index) gets which fault.

  ``num_faults`` single faults land on distinct random batches in
  ``[first_step, num_steps)``, kinds drawn uniformly from ``kinds`` and
  scales log-uniformly from ``scale_range``. Each of ``bursts`` bursts is
  ``burst_length`` consecutive ``nan_grad`` faults: enough, with a guard's
  ``max_consecutive_skips`` at or below it, to make it report ``diverged``.

  Examples:
    >>> from optax_guard import testing
    >>> plan = testing.plan_faults(100, 5, seed=1, kinds=['nan_loss'])
    >>> len(plan), {f.kind for f in plan.values()}
    (5, {'nan_loss'})

  Args:
    num_steps: batches in the run.
    num_faults: single faults to place.
    seed: the plan's seed.
    kinds: the kinds to draw from.
    scale_range: ``(low, high)`` for spike and poison scales.
    first_step: no fault before this batch index.
    bursts: bursts of consecutive ``nan_grad`` faults.
    burst_length: faults per burst.

  Returns:
    ``{batch index: Fault}``.
  """
  unknown = set(kinds) - set(KINDS)
  if unknown or not kinds:
    raise ValueError(f'kinds must be a non-empty subset of {KINDS}, got {kinds}.')
  low, high = scale_range
  if not 1 <= low <= high:
    raise ValueError(f'scale_range must satisfy 1 <= low <= high, got {scale_range}.')
  free = num_steps - first_step - bursts * (burst_length + 1)
  if num_faults < 0 or bursts < 0 or burst_length < 1 or free < num_faults:
    raise ValueError(
        f'cannot place {num_faults} faults and {bursts} bursts of'
        f' {burst_length} in steps [{first_step}, {num_steps}).'
    )
  rng = np.random.default_rng(seed)
  plan: dict[int, Fault] = {}
  # Bursts start in evenly spaced slots so that they never overlap.
  slot = (num_steps - first_step) // max(bursts, 1)
  for b in range(bursts):
    start = first_step + b * slot + int(rng.integers(0, slot - burst_length))
    for step in range(start, start + burst_length):
      plan[step] = Fault('nan_grad')
  candidates = [s for s in range(first_step, num_steps) if s not in plan]
  for step in rng.choice(candidates, size=num_faults, replace=False):
    kind = str(rng.choice(list(kinds)))
    scale = float(math.exp(rng.uniform(math.log(low), math.log(high))))
    plan[int(step)] = Fault(kind, scale)
  return dict(sorted(plan.items()))


def poison(batch: Mapping[str, Any], scale: float) -> dict[str, Any]:
  """Multiplies every float array of a batch by ``scale`` (a corrupt shard)."""
  return {
      name: value * np.asarray(scale, value.dtype)
      if np.issubdtype(np.asarray(value).dtype, np.floating) else value
      for name, value in batch.items()
  }


def nan_batch(batch: Mapping[str, Any], index: int) -> dict[str, Any]:
  """The batch with every float array NaN (the ``nan_batch`` fault).

  Examples:
    >>> import numpy as np
    >>> from optax_guard import testing
    >>> broken = testing.nan_batch({'x': np.ones(2), 'label': np.arange(2)}, 0)
    >>> broken['x'].tolist(), broken['label'].tolist()
    ([nan, nan], [0, 1])

  Args:
    batch: a dict of arrays.
    index: the batch's index, named in the error.

  Returns:
    The batch, its float arrays replaced.

  Raises:
    ValueError: the batch has no float array to hold the NaN.
  """
  floats = [name for name, value in batch.items()
            if np.issubdtype(np.asarray(value).dtype, np.floating)]
  if not floats:
    raise ValueError(
        f'a nan_batch fault at batch index {index} found no float array in'
        f' the batch (keys {sorted(batch)}); use nan_loss or nan_grad, which'
        ' act inside the step through with_faults.'
    )
  return {**batch, **{name: np.full_like(batch[name], np.nan)
                      for name in floats}}


def ramp(start: int, length: int, *, peak: float = 1.0,
         kind: str = 'poisoned_rows') -> dict[int, Fault]:
  """Slow trouble: a fault whose ``scale`` rises linearly to ``peak`` over
  ``length`` batches from ``start``, then falls back over as many.

  Examples:
    >>> from optax_guard import testing
    >>> plan = testing.ramp(10, 4)
    >>> [(i, f.scale) for i, f in plan.items()]
    [(10, 0.25), (11, 0.5), (12, 0.75), (13, 1.0), (14, 0.75), (15, 0.5), (16, 0.25)]

  Args:
    start: the first batch index with the fault.
    length: batches to reach ``peak``.
    peak: the highest ``scale`` (for ``poisoned_rows``, a fraction <= 1).
    kind: one of :data:`SLOW_KINDS` (or ``grad_spike``).

  Returns:
    ``{batch index: Fault}``.
  """
  rising = [peak * (i + 1) / length for i in range(length)]
  scales = rising + rising[-2::-1]
  return {start + i: Fault(kind, scale) for i, scale in enumerate(scales)}


def level_shift(start: int, num_steps: int, scale: float, *,
                kind: str = 'noisy_targets') -> dict[int, Fault]:
  """A permanent change from batch ``start`` to ``num_steps``: by default
  targets ``scale`` standard deviations noisier (a new, noisier data mix).

  Examples:
    >>> from optax_guard import testing
    >>> sorted(testing.level_shift(3, 6, 20.0))
    [3, 4, 5]
  """
  return {i: Fault(kind, scale) for i in range(start, num_steps)}


def _slow_fault(batch: dict[str, Any], fault: Fault,
                index: int) -> dict[str, Any]:
  """The batch with a :data:`SLOW_KINDS` fault applied (seeded by index)."""
  rng = np.random.default_rng(index)
  floats = [name for name, value in batch.items()
            if np.issubdtype(np.asarray(value).dtype, np.floating)]
  if fault.kind == 'noisy_targets':
    y = np.asarray(batch[floats[-1]])
    noise = fault.scale * y.std() * rng.standard_normal(y.shape)
    return {**batch, floats[-1]: (y + noise).astype(y.dtype)}
  # poisoned_rows: the first rows become noise of each array's own scale
  # (floats first, in the order they were always drawn, then integers).
  batch = dict(batch)
  integers = [name for name, value in batch.items()
              if np.issubdtype(np.asarray(value).dtype, np.integer)]
  for name in floats + integers:
    value = np.asarray(batch[name])
    if value.ndim == 0:
      continue
    rows = int(round(fault.scale * value.shape[0]))
    shape = (rows,) + value.shape[1:]
    if name in integers:
      noise = rng.integers(value.min(), value.max(), shape, endpoint=True)
    elif value.std() > 0:
      noise = value.std() * rng.standard_normal(shape)
    else:
      continue
    batch[name] = np.concatenate([noise.astype(value.dtype), value[rows:]])
  return batch


class FaultInjector:
  """Wraps a data iterator: adds the fault fields, poisons planned batches.

  Every batch (a dict) gets ``fault_kind`` (int32, 0 for none) and
  ``fault_scale`` (float32), which :func:`with_faults` reads inside the
  step. Restorable when the wrapped iterator is: the state is the wrapped
  state plus the batch index.

  The plan's keys are batch indices, counted from 0 (``keys='index'``, as
  :func:`plan_faults`, :func:`ramp` and :func:`level_shift` make them), or
  the steps that draw the batches, counted from 1 (``keys='step'``).
  :func:`optax_guard.fit`, :class:`optax_guard.TrainState` and a loop that
  counts ``step += 1`` per batch number a step by the batches drawn so far:
  step ``s`` draws batch index ``s - 1``. With ``keys='step'`` a fault
  placed at 150 is reported at step 150; with batch indices, at 151.

  Examples:
    >>> import numpy as np
    >>> from optax_guard import testing
    >>> data = iter([{'x': np.ones(2, np.float32)}] * 3)
    >>> faulty = testing.FaultInjector(data, {2: testing.Fault('nan_batch')},
    ...                                keys='step')
    >>> [bool(np.isnan(next(faulty)['x']).all()) for _ in range(3)]
    [False, True, False]

  Args:
    data: an iterator of dict batches.
    plan: ``{batch index: Fault}``, e.g. from :func:`plan_faults`, or
      ``{step: Fault}`` with ``keys='step'``.
    keys: ``'index'`` (the default) or ``'step'``: what the plan's keys count.
  """

  def __init__(self, data: Iterator[Mapping[str, Any]],
               plan: Mapping[int, Fault], *, keys: str = 'index'):
    for fault in plan.values():
      if fault.kind not in KINDS + SLOW_KINDS:
        raise ValueError(f'unknown fault kind {fault.kind!r}; known:'
                         f' {KINDS + SLOW_KINDS}.')
    if keys not in _FIRST_KEY:
      raise ValueError(f"keys must be 'index' (batch indices from 0) or"
                       f" 'step' (steps from 1), got {keys!r}.")
    first = _FIRST_KEY[keys]
    if plan and min(plan) < first:
      hint = (" (step s draws batch index s - 1; pass keys='index' for a plan"
              ' of batch indices)' if keys == 'step' else '')
      raise ValueError(f'plan key {min(plan)} is before the first batch: with'
                       f' keys={keys!r} the first is {first}{hint}.')
    # Duck-typed: restorable when the wrapped iterator has get/set_state.
    self._data: Any = data
    self._plan = {key - first: fault for key, fault in plan.items()}
    self._index = 0

  def __iter__(self) -> 'FaultInjector':
    return self

  def __next__(self) -> dict[str, Any]:
    batch = dict(next(self._data))
    fault = self._plan.get(self._index, Fault('none'))
    self._index += 1
    if fault.kind == 'poisoned_batch':
      batch = poison(batch, fault.scale)
    elif fault.kind == 'nan_batch':
      batch = nan_batch(batch, self._index - 1)
    elif fault.kind in SLOW_KINDS:
      batch = _slow_fault(batch, fault, self._index - 1)
    batch['fault_kind'] = np.int32(_CODES[fault.kind])
    batch['fault_scale'] = np.float32(fault.scale)
    return batch

  def injected(self) -> dict[str, int]:
    """Faults injected so far, by kind."""
    counts = collections.Counter(
        f.kind for step, f in self._plan.items() if step < self._index
    )
    return {kind: counts[kind] for kind in KINDS}

  def get_state(self) -> dict[str, Any]:
    return {'data': self._data.get_state(), 'index': self._index}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._data.set_state(state['data'])
    self._index = int(state['index'])


@jax.custom_vjp
def _corrupt_gradients(params, kind, scale):
  del kind, scale
  return params


def _corrupt_forward(params, kind, scale):
  return params, (kind, scale)


def _corrupt(kind, scale, g):
  """``g`` as the gradient fault ``kind`` (a code) with ``scale`` makes it."""
  g = jnp.where(kind == _CODES['grad_spike'], g * scale.astype(g.dtype), g)
  g = jnp.where(kind == _CODES['nan_grad'], jnp.nan, g)
  return jnp.where(kind == _CODES['inf_grad'], jnp.inf, g).astype(g.dtype)


def _corrupt_backward(residuals, grads):
  kind, scale = residuals
  no_grad = np.zeros(np.shape(kind), jax.dtypes.float0)
  return (jax.tree.map(functools.partial(_corrupt, kind, scale), grads),
          no_grad, jnp.zeros_like(scale))


_corrupt_gradients.defvjp(_corrupt_forward, _corrupt_backward)


def with_faults(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Makes ``loss_fn(params, batch)`` obey the batch's fault fields.

  The fields are removed before ``loss_fn`` sees the batch. ``nan_grad`` /
  ``inf_grad`` / ``grad_spike`` act on the gradient of every parameter
  (through a custom VJP, the forward pass is untouched); ``nan_loss`` makes
  the loss value NaN with finite gradients.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from optax_guard import testing
    >>> loss = testing.with_faults(lambda p, b: jnp.sum(p * b['x']))
    >>> batch = {'x': jnp.ones(2), 'fault_kind': jnp.int32(3),
    ...          'fault_scale': jnp.float32(1e3)}  # 3: grad_spike
    >>> jax.grad(loss)(jnp.zeros(2), batch).tolist()
    [1000.0, 1000.0]

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning the loss (or ``(loss,
      aux)``: the fault applies to the first element).

  Returns:
    The wrapped loss function.
  """

  def faulty_loss(params, batch):
    batch = dict(batch)
    kind = jnp.asarray(batch.pop('fault_kind'), jnp.int32)
    scale = jnp.asarray(batch.pop('fault_scale'), jnp.float32)
    out = loss_fn(_corrupt_gradients(params, kind, scale), batch)
    nan_if_asked = jax.lax.stop_gradient(
        jnp.where(kind == _CODES['nan_loss'], jnp.nan, 0.0)
    )
    if isinstance(out, tuple):
      return (out[0] + nan_if_asked.astype(out[0].dtype),) + tuple(out[1:])
    return out + nan_if_asked.astype(out.dtype)

  return faulty_loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flaky(next_fault, params):
  del next_fault
  return params


def _flaky_forward(next_fault, params):
  del next_fault
  return params, None


def _flaky_backward(next_fault, residuals, grads):
  del residuals
  # The host decides, at run time, whether this gradient is corrupted: the
  # compiled step is the same for every call.
  kind, scale = io_callback(
      next_fault, (jax.ShapeDtypeStruct((), jnp.int32),
                   jax.ShapeDtypeStruct((), jnp.float32)))
  # Integer leaves (an NNX model's RNG counters) have float0 cotangents.
  return (jax.tree.map(
      lambda g: _corrupt(kind, scale, g)
      if jnp.issubdtype(g.dtype, jnp.inexact) else g, grads),)


_flaky.defvjp(_flaky_forward, _flaky_backward)

GRADIENT_KINDS = ('nan_grad', 'inf_grad', 'grad_spike')


class FlakyDevice:
  """A flaky machine: corrupts the gradient of chosen calls of a step.

  Unlike the faults that ride in the batch (:class:`FaultInjector`), these
  belong to a *call*, not to the data: the same step run again on the same
  batch (as ``og.fit`` does with ``RecoveryPolicy(rerun=True)``) is the
  next call, clean unless the plan says otherwise. A host callback in the
  backward pass counts the gradient computations (:attr:`calls`, from 1)
  and returns the planned fault of each. Disabled (``plan=None``),
  :meth:`wrap` returns the loss function itself: no callback in the
  compiled step. :meth:`arm` plans a call while training runs (e.g. the
  next one, ``calls + 1``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from optax_guard import testing
    >>> flaky = testing.FlakyDevice({2: testing.Fault('nan_grad')})
    >>> grad = jax.jit(jax.grad(flaky.wrap(lambda p, b: jnp.sum(p * b))))
    >>> [grad(jnp.zeros(2), jnp.ones(2)).tolist() for _ in range(3)]
    [[1.0, 1.0], [nan, nan], [1.0, 1.0]]
    >>> flaky.calls
    3

  Args:
    plan: ``{call number (from 1): Fault}`` with a kind of
      :data:`GRADIENT_KINDS` (``grad_spike`` multiplies the gradient by
      ``scale``); two planned calls in a row corrupt a step and its re-run.
      ``None`` disables the device.
  """

  def __init__(self, plan: Mapping[int, Fault] | None):
    self.enabled = plan is not None
    self._plan: dict[int, Fault] = {}
    self.calls = 0
    for call, fault in (plan or {}).items():
      self.arm(fault, call)

  def arm(self, fault: Fault, call: int) -> None:
    """Plans ``fault`` for gradient computation number ``call``.

    Raises:
      ValueError: for a call already made or numbered below 1, a kind not
        in :data:`GRADIENT_KINDS`, or a disabled device.
    """
    if not self.enabled:
      raise ValueError('this FlakyDevice is disabled (plan=None); build it'
                       ' with a plan, {} for none yet, to arm it.')
    if (isinstance(call, bool) or not isinstance(call, int)
        or call <= self.calls):
      raise ValueError(f'call must be a call number counted from 1 and after'
                       f' the {self.calls} made, got {call!r}.')
    if fault.kind not in GRADIENT_KINDS:
      raise ValueError(f'FlakyDevice corrupts gradients: the kind must be'
                       f' one of {GRADIENT_KINDS}, got {fault.kind!r} at'
                       f' call {call} (data faults go through'
                       ' FaultInjector).')
    self._plan[call] = fault

  def _next_fault(self) -> tuple[np.int32, np.float32]:
    self.calls += 1
    fault = self._plan.pop(self.calls, Fault('none'))
    return np.int32(_CODES[fault.kind]), np.float32(fault.scale)

  def wrap(self, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``loss_fn(params, ...)`` whose gradients follow the plan (itself
    when the device is disabled)."""
    if not self.enabled:
      return loss_fn

    def flaky_loss(params, *args, **kwargs):
      return loss_fn(_flaky(self._next_fault, params), *args, **kwargs)

    return flaky_loss


def mlp_init(key: jax.Array, sizes: Sequence[int]) -> dict[str, Any]:
  """A tanh MLP's params, ``dense_0`` ... ``dense_{n-1}``, LeCun-normal."""
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f'dense_{i}'] = {
        'kernel': jax.random.normal(sub, (n_in, n_out)) / math.sqrt(n_in),
        'bias': jnp.zeros(n_out),
    }
  return params


def mlp_apply(params: Mapping[str, Any], x: jax.Array) -> jax.Array:
  """The MLP of :func:`mlp_init` on ``x`` (tanh between layers)."""
  layers = [params[f'dense_{i}'] for i in range(len(params))]
  for layer in layers[:-1]:
    x = jnp.tanh(x @ layer['kernel'] + layer['bias'])
  return x @ layers[-1]['kernel'] + layers[-1]['bias']


def mse(params: Mapping[str, Any], batch: Mapping[str, Any]) -> jax.Array:
  """Mean squared error of :func:`mlp_apply` on ``batch['x']`` vs ``'y'``."""
  return jnp.mean((mlp_apply(params, batch['x']) - batch['y']) ** 2)


def regression_data(seed: int, num_examples: int, dim: int = 8):
  """A teacher-network regression set: ``{'x', 'y'}`` float32 arrays.

  Examples:
    >>> from optax_guard import testing
    >>> data = testing.regression_data(seed=0, num_examples=10, dim=3)
    >>> data['x'].shape, data['y'].shape
    ((10, 3), (10, 1))
  """
  rng = np.random.default_rng(seed)
  teacher = mlp_init(jax.random.key(seed), [dim, 16, 1])
  x = rng.normal(size=(num_examples, dim)).astype(np.float32)
  y = np.asarray(mlp_apply(teacher, jnp.asarray(x))) + 0.1 * rng.normal(
      size=(num_examples, 1)
  ).astype(np.float32)
  return {'x': x, 'y': y.astype(np.float32)}
