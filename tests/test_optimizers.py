"""Every optimizer of optax and optax.contrib inside og.guard (issue 23, item 1).

The optimizers are enumerated, not listed: every public function of ``optax``
defined in optax's ``alias`` module, and every public function of
``optax.contrib`` that takes a ``learning_rate``, ``base_optimizer`` or
``optimizer`` argument and is not a ``scale_by_*`` building block. A new
optimizer in a new optax release is therefore tested without a change here;
one that needs arguments the enumeration cannot guess must be added to
``_ARGS`` (constructor arguments) or ``_EXCEPTIONS`` (with the reason).

Each one runs in the pure form (``tx.update`` under ``jax.jit``), in the
donating :func:`og.make_train_step` and in the donating
:func:`og.make_nnx_train_step`, on one small linear model; a NaN batch must
leave params and optimizer state bitwise unchanged in all three. On main
before the fix, ``dog``, ``dowg``, ``madgrad``, ``prodigy`` and ``cocob``
failed in both donating steps ("donate the same buffer twice").
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from flax import nnx

import optax_guard as og

# Optimizers that cannot run in a plain train step, and why.
_EXCEPTIONS = {
    # Its update needs the extra arguments `grad` and `value_fn` (a line
    # search), which no train step passes.
    'lbfgs': 'needs value_fn= and grad= in every update',
    # Its update needs `obj_fn` (the Hutchinson Hessian estimate).
    'sophia': 'needs obj_fn= in every update',
    # Its update takes no extra argument but grad_fn=, and refuses the
    # value= that every train step passes (optax.chain(sam) fails alike).
    'sam': 'refuses value= in its update',
    # Differentially private SGD needs per-example gradients (a batch axis
    # on every gradient leaf), which a train step of the mean loss lacks.
    'dpsgd': 'needs per-example gradients',
}

# Constructor arguments where the defaults are missing or unusable.
_ARGS = {
    'mechanize': lambda: {'base_optimizer': optax.sgd(0.1)},
    'schedule_free': lambda: {'base_optimizer': optax.sgd(0.1),
                              'learning_rate': 0.1},
    'polyak_sgd': lambda: {'max_learning_rate': 0.1},
    'noisy_sgd': lambda: {'learning_rate': 1e-2, 'key': jax.random.key(0)},
}

_OPTIMIZER_ARGS = ('learning_rate', 'base_optimizer', 'optimizer')


def _optimizers():
  found = {}
  for name in dir(optax):
    fn = getattr(optax, name)
    if (not name.startswith('_') and inspect.isfunction(fn)
        and fn.__module__ == 'optax._src.alias'):
      found[name] = fn
  for name in dir(optax.contrib):
    fn = getattr(optax.contrib, name)
    if name.startswith(('_', 'scale_by_')) or not inspect.isfunction(fn):
      continue
    if set(_OPTIMIZER_ARGS) & set(inspect.signature(fn).parameters):
      found[f'contrib.{name}'] = fn
  return found


_OPTIMIZERS = _optimizers()
_RUN = sorted(n for n in _OPTIMIZERS if n.split('.')[-1] not in _EXCEPTIONS)


def _build(name):
  fn = _OPTIMIZERS[name]
  short = name.split('.')[-1]
  if short in _ARGS:
    return fn(**_ARGS[short]())
  params = inspect.signature(fn).parameters
  if params['learning_rate'].default is inspect.Parameter.empty:
    return fn(learning_rate=1e-2)
  return fn()


def test_the_enumeration_finds_the_optimizers_it_should():
  # Pins the rule against a silent miss: these must be found, and every
  # exception must be a real optimizer name.
  for name in ['adam', 'adamw', 'sgd', 'lion', 'lbfgs', 'contrib.dog',
               'contrib.prodigy', 'contrib.cocob', 'contrib.muon',
               'contrib.schedule_free_adamw', 'contrib.sam']:
    assert name in _OPTIMIZERS, name
  short = {n.split('.')[-1] for n in _OPTIMIZERS}
  assert set(_EXCEPTIONS) <= short
  assert len(_RUN) >= 40


def _bits(tree):
  """Every leaf as (dtype, shape, bytes): equality is bit for bit."""

  def raw(x):
    if jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
      return np.asarray(jax.random.key_data(x))
    return np.asarray(x)

  return [(raw(x).dtype, raw(x).shape, raw(x).tobytes())
          for x in jax.tree.leaves(tree)]


_X = np.linspace(-1.0, 1.0, 8 * 4, dtype=np.float32).reshape(8, 4)
_BATCH = {'x': jnp.asarray(_X), 'y': jnp.asarray(_X @ np.ones((4, 3),
                                                               np.float32))}
_NAN_X = _X.copy()
_NAN_X[3, 2] = np.nan
_NAN_BATCH = {'x': jnp.asarray(_NAN_X), 'y': _BATCH['y']}


def _loss(params, batch):
  pred = batch['x'] @ params['kernel'] + params['bias']
  return jnp.mean((pred - batch['y']) ** 2)


def _params():
  return {'kernel': jnp.full((4, 3), 0.1, jnp.float32),
          'bias': jnp.zeros((3,), jnp.float32)}


def _check_pure(tx):
  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(_loss)(params, batch)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, updates

  params = _params()
  params, state, _ = step(params, tx.init(params), _BATCH)
  assert not bool(og.metrics(state)['skipped'])
  before = _bits(params), _bits(state.inner_state)
  params, state, updates = step(params, state, _NAN_BATCH)
  assert bool(og.metrics(state)['skipped'])
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  assert (_bits(params), _bits(state.inner_state)) == before


def _check_train_step(tx):
  step = og.make_train_step(_loss, tx)  # donates params and opt_state
  params = _params()
  state = tx.init(params)
  params, state, m = step(params, state, _BATCH)
  assert not bool(m['skipped'])
  params_before, state_before = _bits(params), _bits(state.inner_state)
  params, state, m = step(params, state, _NAN_BATCH)
  assert bool(m['skipped'])
  assert _bits(params) == params_before
  assert _bits(state.inner_state) == state_before


class _Linear(nnx.Module):

  def __init__(self):
    self.kernel = nnx.Param(jnp.full((4, 3), 0.1, jnp.float32))
    self.bias = nnx.Param(jnp.zeros((3,), jnp.float32))

  def __call__(self, x):
    return x @ self.kernel[...] + self.bias[...]


def _nnx_loss(model, batch):
  return jnp.mean((model(batch['x']) - batch['y']) ** 2)


def _check_nnx_step(tx):
  model = _Linear()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = og.make_nnx_train_step(_nnx_loss)  # donates model and optimizer
  assert not bool(step(model, optimizer, _BATCH)['skipped'])
  inner = lambda: nnx.as_pure(optimizer.opt_state).inner_state
  before = _bits(nnx.state(model)), _bits(inner())
  assert bool(step(model, optimizer, _NAN_BATCH)['skipped'])
  assert (_bits(nnx.state(model)), _bits(inner())) == before


def _repeats_a_buffer(name):
  """Whether the bare optimizer's state holds ``params`` or one array twice."""
  params = _params()
  ids = [id(x) for x in jax.tree.leaves(_build(name).init(params))]
  return len(set(ids)) < len(ids) or bool(
      set(ids) & {id(p) for p in jax.tree.leaves(params)})


@pytest.mark.parametrize('name', _RUN)
def test_every_optimizer_runs_guarded_and_holds_on_a_nan_step(name):
  tx = og.guard(_build(name))
  _check_pure(tx)
  _check_train_step(tx)


# The NNX step runs the same fused apply as make_train_step; what it adds is
# nnx.Optimizer's own init and state plumbing, where a repeated buffer also
# breaks donation. So it runs for every optimizer whose bare state repeats
# one (found, not listed), plus two ordinary ones, which keeps the module
# near a minute of CPU on CI.
_NNX_RUN = sorted({n for n in _RUN if _repeats_a_buffer(n)}
                  | {'adamw', 'contrib.schedule_free_adamw'})


def test_the_repeating_optimizers_are_found():
  assert {'contrib.dog', 'contrib.dowg', 'contrib.madgrad', 'contrib.prodigy',
          'contrib.cocob'} <= set(_NNX_RUN)


@pytest.mark.parametrize('name', _NNX_RUN)
def test_the_nnx_step_runs_guarded_and_holds_on_a_nan_step(name):
  _check_nnx_step(og.guard(_build(name)))
