"""Guards inside optax.chain, inject_hyperparams, MultiSteps and nnx.Optimizer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_guard as og

CONTRACT = {'grad_norm', 'clip_threshold', 'update_norm', 'skipped',
            'consecutive_skips', 'total_skips', 'diverged'}
PARAMS = {'w': jnp.arange(6.0).reshape(2, 3)}
GOOD = {'w': jnp.full((2, 3), 2.0)}
BAD = {'w': GOOD['w'].at[0, 0].set(jnp.nan)}


def test_inside_chain_with_metrics():
  tx = optax.chain(optax.add_decayed_weights(1e-4),
                   og.guard(optax.adam(1e-3), clip=og.zclip(warmup_steps=2)),
                   optax.scale(1.0))
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  _, state = update(GOOD, state, PARAMS, value=jnp.array(1.0))
  m = og.metrics(state)
  assert CONTRACT <= set(m)
  assert {'zclip_mean', 'zclip_std', 'loss', 'total_nonfinite'} <= set(m)
  decayed = jax.tree.map(lambda g, p: g + 1e-4 * p, GOOD, PARAMS)
  assert float(m['grad_norm']) == pytest.approx(float(optax.tree.norm(decayed)))
  held = state
  updates, state = update(BAD, state, PARAMS, value=jnp.array(1.0))
  assert bool(og.metrics(state)['skipped'])
  chex.assert_trees_all_equal(state[1].inner_state, held[1].inner_state)
  assert all(not bool(jnp.any(u)) for u in jax.tree.leaves(updates))


def test_metrics_inside_jit_and_on_host_agree():
  tx = og.guard(optax.sgd(0.1), clip=og.clip_by_global_norm(1.0))
  state = tx.init(PARAMS)
  _, state = tx.update(GOOD, state, PARAMS)
  chex.assert_trees_all_equal(jax.jit(og.metrics)(state), og.metrics(state))


def test_inject_hyperparams():
  make = lambda learning_rate: og.guard(optax.adam(learning_rate),
                                        clip=og.autoclip(0.9, 10))
  tx = optax.inject_hyperparams(make)(learning_rate=1e-2)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  _, state = update(GOOD, state, PARAMS, value=jnp.array(0.5))
  held = state
  _, state = update(BAD, state, PARAMS, value=jnp.array(0.5))
  m = og.metrics(state)
  assert bool(m['skipped']) and int(m['total_skips']) == 1
  assert float(m['loss']) == 0.5
  chex.assert_trees_all_equal(state.inner_state.inner_state,
                              held.inner_state.inner_state)


def test_multisteps_around_a_guard_is_refused_naming_accumulate():
  # optax.MultiSteps keeps a NaN micro-batch in its accumulator (0 * nan is
  # nan), so every later macro step would be skipped: og.metrics refuses the
  # composition and names the one that works.
  tx = optax.MultiSteps(og.skip_nonfinite(optax.sgd(1.0)), every_k_schedule=2)
  with pytest.raises(ValueError, match='og.accumulate'):
    og.metrics(tx.init(PARAMS))


class _Linear(nnx.Module):

  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.dense(x)


def test_nnx_optimizer_update_with_value():
  model = _Linear(nnx.Rngs(0))
  tx = og.guard(optax.adamw(1e-2), clip=og.zclip(warmup_steps=2),
                spikes={'window': 8}, max_consecutive_skips=2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.ones((4, 3))

  @nnx.jit
  def train_step(model, optimizer, x, poison):
    def loss_fn(model):
      return jnp.mean(model(x) ** 2) + poison
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)
    return loss

  train_step(model, optimizer, x, 0.0)
  kernel = jnp.array(model.dense.kernel[...])
  inner_before = jax.tree.map(jnp.array, nnx.as_pure(optimizer.opt_state))
  train_step(model, optimizer, x, jnp.nan)
  m = og.metrics(optimizer)
  assert bool(m['skipped']) and bool(m['nonfinite'])
  np.testing.assert_array_equal(model.dense.kernel[...], kernel)
  chex.assert_trees_all_equal(nnx.as_pure(optimizer.opt_state).inner_state,
                              inner_before.inner_state)
  train_step(model, optimizer, x, jnp.nan)
  assert bool(og.metrics(optimizer.opt_state)['diverged'])
  train_step(model, optimizer, x, 0.0)
  assert not bool(og.metrics(optimizer)['diverged'])
  assert not np.array_equal(model.dense.kernel[...], kernel)


def test_clip_alone_fills_the_contract():
  tx = optax.chain(og.clip_by_global_norm(1.0), optax.sgd(0.1))
  _, state = tx.update(GOOD, tx.init(PARAMS), PARAMS)
  m = og.metrics(state)
  assert CONTRACT <= set(m)
  assert not bool(m['skipped']) and int(m['total_skips']) == 0
  assert not bool(m['diverged'])


def test_metrics_of_an_unguarded_state_raises():
  with pytest.raises(ValueError, match='no optax_guard state'):
    og.metrics(optax.adam(1e-3).init(PARAMS))
