"""The jitted train step: fused guard update, rollback, donation, NNX form."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_guard as og
from optax_guard.transforms import fused as _apply

NAN_STEP, SPIKE_STEP, STEPS = 5, 7, 9


def _params():
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  return {
      'hidden': {'w': jax.random.normal(keys[0], (4, 8)) / 2, 'b': jnp.zeros(8)},
      'out': {'w': jax.random.normal(keys[1], (8, 1)) / 3},
  }


def _loss(params, batch):
  hidden = jnp.tanh(batch['x'] @ params['hidden']['w'] + params['hidden']['b'])
  return jnp.mean((hidden @ params['out']['w'] - batch['y']) ** 2)


def _batch(step):
  rng = np.random.default_rng(step)
  x = rng.normal(size=(16, 4)).astype(np.float32)
  y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
  if step == NAN_STEP:
    x[3, 1] = np.nan
  if step == SPIKE_STEP:
    y *= 100.0
  return {'x': jnp.asarray(x), 'y': jnp.asarray(y)}


def _guard(**options):
  return og.guard(optax.adamw(1e-2), clip=og.zclip(warmup_steps=2),
                  spikes=dict(window=8, sigma=3.0, min_history=4),
                  max_consecutive_skips=3, **options)


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


@pytest.fixture(scope='module')
def steps():
  """The train step and the pure reference: value_and_grad, update, apply."""
  tx = _guard()

  @jax.jit
  def reference(params, opt_state, batch):
    loss, grads = jax.value_and_grad(_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {'loss': loss, **og.metrics(opt_state)}

  return tx, og.make_train_step(_loss, tx), reference


def test_each_step_equals_update_then_apply(steps):
  tx, step, reference = steps
  params, opt_state = _params(), tx.init(_params())
  skipped = []
  for index in range(STEPS):
    batch = _batch(index)
    want = reference(params, opt_state, batch)
    got = step(_copy(params), _copy(opt_state), batch)
    # Same decision, state and metrics bit for bit; the parameter update is
    # fused into the optimizer's pass, which may round one ulp differently.
    chex.assert_trees_all_equal(got[2], want[2])
    chex.assert_trees_all_equal(got[1], want[1])
    chex.assert_trees_all_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    skipped.append(bool(got[2]['skipped']))
    params, opt_state = want[0], want[1]
  assert skipped == [i in (NAN_STEP, SPIKE_STEP) for i in range(STEPS)]


def test_skipped_steps_return_params_and_state_bitwise(steps):
  tx, step, _ = steps
  params, opt_state = _params(), tx.init(_params())
  for index in range(STEPS):
    before = _copy((params, opt_state))
    params, opt_state, metrics = step(params, opt_state, _batch(index))
    if index in (NAN_STEP, SPIKE_STEP):
      assert bool(metrics['skipped'])
      chex.assert_trees_all_equal(params, before[0])
      chex.assert_trees_all_equal(opt_state.inner_state, before[1].inner_state)
      chex.assert_trees_all_equal(opt_state.clip_state, before[1].clip_state)
      _assert_window_after_skip(opt_state.window, before[1].window, metrics,
                                spike=index == SPIKE_STEP)
  assert int(opt_state.total_skips) == 2
  assert int(opt_state.total_nonfinite) == 1
  assert int(opt_state.total_spikes) == 1
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


def _assert_window_after_skip(window, before, metrics, *, spike):
  """The spike rule's state after a skipped step, as docs/spike_rule.md says.

  A non-finite step leaves it bit for bit. A skipped spike leaves the
  admitted values as they were; its raw values wait in ``pending`` (a level
  shift is rebuilt from them after ``shift_after`` skips), the signals that
  were high are marked, a run of low values ends, and the skip streak grows
  by one.
  """
  if not spike:
    chex.assert_trees_all_equal(window, before)
    return
  assert int(window.streak) == int(before.streak) + 1 == 1
  for name in ('loss', 'grad_norm'):
    new, old = getattr(window, name), getattr(before, name)
    chex.assert_trees_all_equal((new.values, new.size, new.slot),
                                (old.values, old.size, old.slot))
    assert int(new.low_streak) == 0  # a spike ends a run of low values
    value = jnp.asarray(metrics[name], jnp.float32)
    chex.assert_trees_all_equal(new.pending, old.pending.at[0].set(value))
    # y x 100 raises both the loss and the gradient norm above the bound.
    assert bool(new.high_seen)


def test_params_and_state_are_donated_and_nothing_goes_to_the_host(steps):
  tx, step, _ = steps
  params, opt_state = _params(), tx.init(_params())
  batch = _batch(0)
  step(_copy(params), _copy(opt_state), batch)  # compiled
  with jax.transfer_guard('disallow'):
    new_params, new_state, metrics = step(params, opt_state, batch)
  # Params and moments are updated in place (scalars may land elsewhere).
  donated = jax.tree.leaves((params, opt_state.inner_state))
  assert all(x.is_deleted() for x in donated if x.ndim)
  assert not any(x.is_deleted() for x in jax.tree.leaves(new_params))
  assert {'loss', 'grad_norm', 'skipped', 'zclip_mean'} <= set(metrics)


def test_without_donation_inputs_stay_alive():
  tx = og.skip_nonfinite(optax.sgd(0.1))
  step = og.make_train_step(_loss, tx, donate=False)
  params = _params()
  step(params, tx.init(params), _batch(0))
  assert not any(x.is_deleted() for x in jax.tree.leaves(params))


def test_has_aux_and_an_unguarded_optimizer():
  def loss_with_aux(params, batch):
    loss = _loss(params, batch)
    return loss, {'double': 2 * loss}

  tx = optax.adam(1e-2)
  step = og.make_train_step(loss_with_aux, tx, has_aux=True)
  params = _params()
  _, _, metrics = step(params, tx.init(params), _batch(0))
  assert set(metrics) == {'loss', 'aux'}
  np.testing.assert_allclose(metrics['aux']['double'], 2 * metrics['loss'])


def test_a_guard_last_in_a_chain_skips_in_the_train_step():
  tx = optax.chain(optax.add_decayed_weights(1e-4), _guard())
  step = og.make_train_step(_loss, tx)
  params, opt_state = _params(), tx.init(_params())
  for index in range(NAN_STEP + 1):
    params, opt_state, metrics = step(params, opt_state, _batch(index))
  assert bool(metrics['skipped']) and bool(metrics['nonfinite'])


@pytest.mark.parametrize('check_updates', [False, True])
def test_fused_update_materialises_no_update_tree(check_updates):
  """The cond around update and apply leaves XLA nothing to write twice.

  The pure path's cond hands an ``updates`` tree to apply_updates, which XLA
  materialises (a temporary buffer the size of the params, with XLA 0.10 on
  CPU); the fused form updates params and moments in place. The check of
  the inner optimizer's output (the default) reduces the update computed a
  first time; XLA may keep one boolean mask of a leaf shape for it (a byte
  per element, a quarter of one float32 leaf), never a float tree.
  """
  params = {f'w{i}': jnp.zeros((256, 256)) for i in range(4)}
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  tx = _guard(check_updates=check_updates)
  fused = _apply.update_and_apply(tx)

  def temp_bytes(update):
    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(
        params, tx.init(params), params, jnp.float32(1.0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  def fused_update(params, opt_state, grads, loss):
    return fused(grads, opt_state, params, value=loss)

  one_mask = params['w0'].size if check_updates else 0  # bytes of bools
  assert temp_bytes(fused_update) < one_mask + param_bytes / 50


class _Model(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.out = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def _nnx_loss(model, batch):
  return jnp.mean((model(batch['x']) - batch['y']) ** 2)


def test_nnx_step_equals_optimizer_update():
  step = og.make_nnx_train_step(_nnx_loss)

  @nnx.jit
  def reference(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(_nnx_loss)(model, batch)
    optimizer.update(model, grads, value=loss)
    return {'loss': loss, **og.metrics(optimizer)}

  models = [_Model(nnx.Rngs(0)) for _ in range(2)]
  optimizers = [nnx.Optimizer(m, _guard(), wrt=nnx.Param) for m in models]
  for index in range(STEPS):
    batch = _batch(index)
    held = jax.tree.map(jnp.copy, nnx.state(models[0], nnx.Param))
    got = step(models[0], optimizers[0], batch)
    want = reference(models[1], optimizers[1], batch)
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_close(nnx.state(models[0]), nnx.state(models[1]),
                                rtol=1e-5, atol=1e-6)
    if index in (NAN_STEP, SPIKE_STEP):
      assert bool(got['skipped'])
      chex.assert_trees_all_equal(nnx.state(models[0], nnx.Param), held)
    # Copy the reference across, so that every step starts from the same bits.
    nnx.update(models[0], jax.tree.map(jnp.copy, nnx.state(models[1])))
    nnx.update(optimizers[0], jax.tree.map(jnp.copy, nnx.state(optimizers[1])))
  assert int(optimizers[0].step[...]) == STEPS
