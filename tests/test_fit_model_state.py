"""og.fit and og.Checkpointer with model state: Linen, NNX, Flax TrainState.

Each form trains a BatchNorm model with og.fit over data with a NaN batch,
checkpointing as it goes; a second run is interrupted and resumed; both end
with bitwise the same params *and* model state, and the NaN batch left the
statistics finite. Also: the traps of a step og.fit cannot drive.
"""

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_guard as og
from optax_guard import testing
from optax_guard.host.fit import Rollback
from tests.test_seams import _LinenBN

NUM_STEPS = 24
NAN_STEP = 7  # The batch og.fit draws at this step is all NaN.


def _data():
  x = np.random.default_rng(0).normal(size=(256, 3)).astype(np.float32)
  arrays = {'x': x, 'y': x.sum(axis=1, keepdims=True)}
  plan = {NAN_STEP: testing.Fault('nan_batch', 1.0)}
  return testing.FaultInjector(og.batches(arrays, batch_size=16, seed=0),
                               plan, keys='step')


def _linen(tx=None):
  module = _LinenBN()
  variables = module.init(jax.random.PRNGKey(0), jnp.ones((4, 3)), train=False)

  def loss_fn(params, model_state, batch):
    out, new_state = module.apply(
        {'params': params, **model_state}, batch['x'], train=True,
        mutable=['batch_stats'])
    return jnp.mean((out - batch['y']) ** 2), new_state

  tx = tx or og.guard(optax.adam(1e-2))
  step = og.make_train_step(loss_fn, tx, has_state=True)
  state = og.TrainState(0, variables['params'], tx.init(variables['params']),
                        model_state={'batch_stats': variables['batch_stats']})
  return step, state


def _nnx():
  model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)),
                         nnx.BatchNorm(8, rngs=nnx.Rngs(1)), nnx.relu,
                         nnx.Dropout(0.1, rngs=nnx.Rngs(dropout=2)),
                         nnx.Linear(8, 1, rngs=nnx.Rngs(3)))
  optimizer = nnx.Optimizer(model, og.guard(optax.adam(1e-2)), wrt=nnx.Param)
  loss_fn = lambda m, b: jnp.mean((m(b['x']) - b['y']) ** 2)
  return og.nnx_fit_step(loss_fn, model, optimizer)


class _StateWithStats(train_state.TrainState):
  batch_stats: Any


def _flax_train_state():
  module = _LinenBN()
  variables = module.init(jax.random.PRNGKey(0), jnp.ones((4, 3)), train=False)
  state = _StateWithStats.create(
      apply_fn=module.apply, params=variables['params'],
      tx=og.guard(optax.adam(1e-2)), batch_stats=variables['batch_stats'])

  def flax_step(state, batch):
    def loss_fn(params):
      out, new = state.apply_fn(
          {'params': params, 'batch_stats': state.batch_stats}, batch['x'],
          train=True, mutable=['batch_stats'])
      return jnp.mean((out - batch['y']) ** 2), new['batch_stats']

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    state = og.apply_gradients(state, grads=grads, value=loss,
                               batch_stats=stats)
    return state, {'loss': loss, **og.metrics(state.opt_state)}

  return og.flax_fit_step(flax_step, state)


FORMS = {'linen': _linen, 'nnx': _nnx, 'flax_train_state': _flax_train_state}


class _Interrupt(Exception):
  pass


def _fit(form, directory, *, stop_at=None):
  step, state = FORMS[form]()

  def callback(state, metrics, events):
    del metrics, events
    if state.step == stop_at:
      raise _Interrupt

  with og.Checkpointer(directory, save_interval_steps=5) as checkpointer:
    return og.fit(step, state, _data(), num_steps=NUM_STEPS,
                  checkpointer=checkpointer, progress=False,
                  handle_preemption=False, callback=callback)


def _as_numpy(leaf):
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)  # An NNX RNG stream's key.
  return np.asarray(leaf)


def _pure(tree):
  return jax.tree.map(_as_numpy, nnx.to_pure_dict(tree)
                      if isinstance(tree, nnx.State) else tree)


@pytest.mark.parametrize('form', sorted(FORMS))
def test_resumed_run_equals_an_uninterrupted_one_with_model_state(
    form, tmp_path):
  reference = _fit(form, tmp_path / 'reference').state
  assert reference.step == NUM_STEPS
  with pytest.raises(_Interrupt):
    _fit(form, tmp_path / 'resumed', stop_at=13)
  resumed = _fit(form, tmp_path / 'resumed').state

  chex.assert_trees_all_equal(_pure(resumed.params), _pure(reference.params))
  chex.assert_trees_all_equal(_pure(resumed.model_state),
                              _pure(reference.model_state))
  statistics = [leaf for leaf in jax.tree.leaves(_pure(reference.model_state))
                if np.issubdtype(leaf.dtype, np.floating)]
  assert statistics and all(np.isfinite(leaf).all() for leaf in statistics)
  assert int(og.metrics(reference.opt_state)['total_skips']) == 1


def test_nnx_update_writes_the_trained_state_into_the_objects(tmp_path):
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                         nnx.BatchNorm(4, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(model, og.guard(optax.sgd(0.1)), wrt=nnx.Param)
  loss_fn = lambda m, b: jnp.mean((m(b['x']) - b['y'][:, :1]) ** 2)
  step, state = og.nnx_fit_step(loss_fn, model, optimizer)
  before = _pure(nnx.state(model))
  result = og.fit(step, state, _data(), num_steps=3, progress=False)
  # The objects were not touched (nor their buffers donated) by training.
  chex.assert_trees_all_equal(_pure(nnx.state(model)), before)
  og.nnx_update(model, optimizer, result.state)
  assert int(optimizer.step[...]) == 3
  chex.assert_trees_all_equal(_pure(nnx.state(model, nnx.BatchStat)),
                              _pure(result.state.model_state))


def test_a_step_that_cannot_take_the_state_is_refused_before_anything(
    tmp_path):
  step, state = _linen()
  plain = state._replace(model_state=None)
  with og.Checkpointer(tmp_path / 'ckpt') as checkpointer:
    with pytest.raises(TypeError, match='model_state=.*4|4.*model_state'):
      og.fit(step, plain, _data(), num_steps=2, checkpointer=checkpointer,
             progress=False)
    assert checkpointer.latest_step() is None  # Nothing was saved.
  # The arrays were not donated: the state is still usable.
  assert np.isfinite(np.asarray(jax.tree.leaves(plain.params)[0])).all()
  # The NNX step itself (the natural first try): refused, naming the path.
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, og.guard(optax.sgd(0.1)), wrt=nnx.Param)
  loss_fn = lambda m, b: jnp.mean((m(b['x']) - b['y']) ** 2)
  params = nnx.state(model, nnx.Param)
  with pytest.raises(TypeError, match='og.nnx_fit_step'):
    og.fit(og.make_nnx_train_step(loss_fn),
           og.TrainState(0, params, optimizer.opt_state), _data(),
           num_steps=1, progress=False)
  assert np.isfinite(np.asarray(model.kernel[...])).all()  # Still usable.


@pytest.mark.parametrize('result, message', [
    (0.5, 'mapping of scalar metrics'),
    ({'eval_loss': jnp.ones(3)}, 'not scalars'),
])
def test_eval_fn_must_return_a_mapping_of_scalars(result, message):
  step, state = _linen()
  with pytest.raises(TypeError, match=message):
    og.fit(step, state, _data(), num_steps=2, progress=False,
           eval_fn=lambda state: result, eval_every=1)


def test_restore_best_without_a_recorded_metric_names_eval_fn(tmp_path):
  step, state = _linen()
  with og.Checkpointer(tmp_path / 'ckpt', save_interval_steps=1,
                       best_metric='eval_loss') as checkpointer:
    og.fit(step, state, _data(), num_steps=2, checkpointer=checkpointer,
           progress=False)
    with pytest.raises(ValueError, match='eval_fn'):
      checkpointer.restore_best(state)


def test_a_rollback_restores_the_statistics_of_the_same_checkpoint(tmp_path):
  step, state = _linen(og.guard(optax.adam(1e-2), max_consecutive_skips=2))
  x = np.random.default_rng(0).normal(size=(256, 3)).astype(np.float32)
  plan = {at: testing.Fault('nan_batch', 1.0) for at in (15, 16, 17)}
  data = testing.FaultInjector(
      og.batches({'x': x, 'y': x.sum(axis=1, keepdims=True)}, 16, seed=0),
      plan, keys='step')
  after_rollback = []

  def callback(state, metrics, events):
    del metrics
    after_rollback.extend((state, e) for e in events
                          if isinstance(e, Rollback))

  with og.Checkpointer(tmp_path / 'ckpt', save_interval_steps=4,
                       max_to_keep=5) as checkpointer:
    og.fit(step, state, data, num_steps=24, checkpointer=checkpointer,
           recovery=og.RecoveryPolicy(confirm_steps=1), progress=False,
           callback=callback)
    (rolled, event), = after_rollback
    saved, _ = checkpointer.restore(event.to_step, state)
  chex.assert_trees_all_equal(_pure(rolled.model_state),
                              _pure(saved.model_state))
  chex.assert_trees_all_equal(_pure(rolled.params), _pure(saved.params))


@pytest.mark.parametrize('form', sorted(FORMS))
def test_the_checkpointer_alone_saves_and_restores_every_form(form, tmp_path):
  # A user's own loop: og.Checkpointer with the state of each form.
  _, state = FORMS[form]()
  state = state._replace(step=3)
  expected = jax.tree.map(_as_numpy, (state.params, state.opt_state,
                                      state.model_state))
  with og.Checkpointer(tmp_path / 'ckpt') as checkpointer:
    assert checkpointer.save(state, force=True)
    checkpointer.wait_until_finished()
    restored, _ = checkpointer.restore(3, FORMS[form]()[1])
  assert restored.step == 3
  chex.assert_trees_all_equal(
      jax.tree.map(_as_numpy, (restored.params, restored.opt_state,
                               restored.model_state)), expected)
