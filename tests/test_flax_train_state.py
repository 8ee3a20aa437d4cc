"""og.apply_gradients: Flax's TrainState with the loss handed to the guard."""

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen
from flax.training import train_state

import optax_guard as og


class _Net(linen.Module):

  @linen.compact
  def __call__(self, x, train: bool = True):
    x = linen.Dense(8)(x)
    x = linen.BatchNorm(use_running_average=not train)(x)
    return linen.Dense(1)(linen.relu(x))


class _StateWithStats(train_state.TrainState):
  """As in Flax's ImageNet example: the BatchNorm statistics beside params."""
  batch_stats: Any


def _batch(seed, nan=False):
  x = np.random.default_rng(seed).normal(size=(16, 3)).astype(np.float32)
  if nan:
    x[0, 0] = np.nan
  return jnp.asarray(x), jnp.asarray(np.nan_to_num(x).sum(1, keepdims=True))


def _create(tx):
  variables = _Net().init(jax.random.PRNGKey(0), _batch(0)[0], train=False)
  return _StateWithStats.create(apply_fn=_Net().apply,
                                params=variables['params'], tx=tx,
                                batch_stats=variables['batch_stats'])


def _loss_and_grads(state, batch):
  x, y = batch

  def loss_fn(params):
    out, new = state.apply_fn({'params': params,
                               'batch_stats': state.batch_stats}, x,
                              mutable=['batch_stats'])
    return jnp.mean((out - y) ** 2), new['batch_stats']

  return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


@jax.jit
def _og_step(state, batch):
  (loss, stats), grads = _loss_and_grads(state, batch)
  return og.apply_gradients(state, grads=grads, value=loss, batch_stats=stats)


@jax.jit
def _flax_step(state, batch):
  (_, stats), grads = _loss_and_grads(state, batch)
  return state.apply_gradients(grads=grads, batch_stats=stats)


def _copy(tree):
  return jax.tree.map(np.array, tree)


def test_clean_steps_equal_flax_apply_gradients():
  # SGD, not Adam: the bias before BatchNorm has a gradient of rounding
  # noise only, which Adam's normalisation would blow up to the step size.
  tx = og.guard(optax.sgd(0.1), clip=og.clip_by_global_norm(1.0))
  ours = theirs = _create(tx)
  for seed in range(4):
    ours = _og_step(ours, _batch(seed))
    theirs = _flax_step(theirs, _batch(seed))
  assert int(ours.step) == int(theirs.step) == 4
  # The fused apply rounds params once more at most (train_step's contract).
  chex.assert_trees_all_close(ours.params, theirs.params, rtol=1e-6,
                              atol=1e-8)
  chex.assert_trees_all_close(ours.batch_stats, theirs.batch_stats,
                              rtol=1e-6)
  assert not bool(og.metrics(ours.opt_state)['skipped'])


def test_a_nan_loss_is_held_here_and_applied_by_flax():
  # Finite gradients with a NaN loss: only the loss tells. Flax's
  # apply_gradients never passes it, so its guard cannot see it.
  tx = og.guard(optax.sgd(0.1))
  state = _create(tx)
  grads = jax.tree.map(jnp.ones_like, state.params)
  nan = jnp.float32(jnp.nan)

  ours = og.apply_gradients(state, grads=grads, value=nan)
  theirs = state.apply_gradients(grads=grads)

  chex.assert_trees_all_equal(ours.params, state.params)
  assert bool(og.metrics(ours.opt_state)['skipped']) and int(ours.step) == 1
  assert not bool(og.metrics(theirs.opt_state)['skipped'])
  assert not np.array_equal(theirs.params['Dense_0']['kernel'],
                            state.params['Dense_0']['kernel'])


def test_a_nan_batch_leaves_params_state_and_statistics_bitwise():
  tx = og.guard(optax.adam(1e-2))
  state = _og_step(_create(tx), _batch(0))
  before = _copy((state.params, state.opt_state.inner_state, state.batch_stats))

  state = _og_step(state, _batch(1, nan=True))

  assert bool(og.metrics(state.opt_state)['skipped'])
  chex.assert_trees_all_equal(
      (state.params, state.opt_state.inner_state, state.batch_stats), before)
  assert int(state.step) == 2
  state = _og_step(state, _batch(2))
  assert not bool(og.metrics(state.opt_state)['skipped'])
  assert all(np.isfinite(leaf).all()
             for leaf in jax.tree.leaves(state.batch_stats))


def test_overwrite_with_gradient_is_refused_by_name():
  state = _create(og.guard(optax.sgd(0.1)))
  with pytest.raises(ValueError, match='overwrite_with_gradient'):
    og.apply_gradients(state, grads={'params': state.params,
                                     'overwrite_with_gradient': {}})


def test_a_loss_rule_without_the_loss_says_so_when_traced():
  tx = og.guard(optax.sgd(0.1), spikes={})
  params = {'w': jnp.ones(2)}
  update = jax.jit(tx.update)
  with pytest.warns(UserWarning, match='got no value='):
    update({'w': jnp.ones(2)}, tx.init(params), params)
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    update({'w': jnp.ones(2)}, tx.init(params), params)  # Traced once.
    tx.update({'w': jnp.ones(2)}, tx.init(params), params,
              value=jnp.float32(1.0))
