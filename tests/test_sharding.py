"""The guarded train step over 8 CPU devices: data parallel and FSDP.

The sharded runs must take the same skip decisions as one device, end within
rtol 1e-5 of its params, keep every input sharding, and skip the step on all
devices when only one device's batch shard holds a NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_guard as og

STEPS, NAN_STEP, NAN_ROW, GLOBAL_BATCH = 6, 3, 13, 64

LAYOUTS = {
    # mesh shape, mesh axes, param specs, batch spec
    'data_parallel': ((8,), ('data',),
                      {'w1': P(), 'b1': P(), 'w2': P()}, P('data')),
    'fsdp': ((2, 4), ('data', 'fsdp'),
             {'w1': P('fsdp', None), 'b1': P('fsdp'), 'w2': P('fsdp', None)},
             P(('data', 'fsdp'))),
}


def _loss(params, batch):
  hidden = jnp.tanh(batch['x'] @ params['w1'] + params['b1'])
  return jnp.mean((hidden @ params['w2'] - batch['y']) ** 2)


def _host_params():
  rng = np.random.default_rng(0)
  return {'w1': rng.normal(size=(16, 32)).astype(np.float32) / 4,
          'b1': np.zeros(32, np.float32),
          'w2': rng.normal(size=(32, 1)).astype(np.float32) / 6}


def _host_batch(step):
  rng = np.random.default_rng(100 + step)
  x = rng.normal(size=(GLOBAL_BATCH, 16)).astype(np.float32)
  y = np.cos(x[:, :1] + x[:, 1:2]).astype(np.float32)
  if step == NAN_STEP:
    x[NAN_ROW, 5] = np.nan
  return {'x': x, 'y': y}


def _tx():
  return og.guard(optax.adamw(1e-2), clip=og.zclip(warmup_steps=2),
                  spikes=dict(window=8, sigma=4.0, min_history=4))


@pytest.fixture(scope='module')
def step():
  return og.make_train_step(_loss, _tx())


def _train(step, put_params, put_batch, put_state):
  params = put_params(_host_params())
  opt_state = put_state(_tx().init(params))
  history = []
  for index in range(STEPS):
    params, opt_state, metrics = step(params, opt_state,
                                      put_batch(_host_batch(index)))
    history.append(jax.device_get(metrics))
  return params, opt_state, history


@pytest.fixture(scope='module')
def single_device(step):
  return _train(step, lambda t: jax.tree.map(jnp.asarray, t),
                lambda t: jax.tree.map(jnp.asarray, t), lambda s: s)


def _sharded_placement(layout):
  shape, axes, param_specs, batch_spec = LAYOUTS[layout]
  mesh = Mesh(np.array(jax.devices()).reshape(shape), axes)
  param_shardings = {k: NamedSharding(mesh, s) for k, s in param_specs.items()}
  replicated = NamedSharding(mesh, P())

  def put_params(tree):
    return jax.tree.map(jax.device_put, tree, param_shardings)

  def put_batch(tree):
    return jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, batch_spec)), tree)

  def put_state(state):
    # An eager init shards the moments like the params; its scalars and
    # small buffers go on the mesh too, replicated.
    return jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding)
        else jax.device_put(x, replicated), state)

  return param_shardings, put_params, put_batch, put_state


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_sharded_step_matches_one_device(step, single_device, layout):
  param_shardings, put_params, put_batch, put_state = _sharded_placement(
      layout)
  nan_batch = put_batch(_host_batch(NAN_STEP))
  poisoned_shards = [not bool(np.all(np.isfinite(shard.data)))
                     for shard in nan_batch['x'].addressable_shards]
  assert sum(poisoned_shards) == 1  # the NaN sits on one device only

  params, opt_state, history = _train(step, put_params, put_batch, put_state)
  want_params, _, want_history = single_device

  skipped = [bool(m['skipped']) for m in history]
  assert skipped == [bool(m['skipped']) for m in want_history]
  assert skipped == [i == NAN_STEP for i in range(STEPS)]
  for name in ('loss', 'grad_norm', 'update_norm', 'zclip_mean'):
    np.testing.assert_allclose([m[name] for m in history],
                               [m[name] for m in want_history], rtol=1e-5)
  for name, value in params.items():
    np.testing.assert_allclose(value, want_params[name], rtol=1e-5, atol=1e-7)
    assert value.sharding.is_equivalent_to(param_shardings[name], value.ndim)
  moments = opt_state.inner_state[0]
  for name, sharding in param_shardings.items():
    for moment in (moments.mu[name], moments.nu[name]):
      assert moment.sharding.is_equivalent_to(sharding, moment.ndim)
