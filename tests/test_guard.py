"""Skipping with exact rollback: guard, skip_nonfinite, skip_spikes."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_guard as og

PARAMS = {'w': jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), 'b': jnp.ones(4)}


def _grads(step, scale=1.0):
  key = jax.random.PRNGKey(step)
  return jax.tree.map(
      lambda p: scale * jax.random.normal(jax.random.fold_in(key, p.size),
                                          p.shape), PARAMS)


def _poison(grads, value):
  return {**grads, 'w': grads['w'].at[1, 2].set(value)}


def _full_guard():
  return og.guard(optax.adamw(1e-2), clip=og.zclip(warmup_steps=3),
                  spikes=dict(window=8, sigma=3.0, min_history=4),
                  max_consecutive_skips=3)


def _warm_state(tx, update, steps=10):
  state = tx.init(PARAMS)
  for step in range(steps):
    _, state = update(_grads(step), state, PARAMS, value=jnp.array(2.0))
  return state


class RollbackTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_nonfinite_gradient_holds_every_inner_leaf_bitwise(self):
    tx = _full_guard()
    update = self.variant(tx.update)
    before = _warm_state(tx, update)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
      updates, after = update(_poison(_grads(99), bad), before, PARAMS,
                              value=jnp.array(2.0))
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
      chex.assert_trees_all_equal(after.inner_state, before.inner_state)
      chex.assert_trees_all_equal(after.clip_state, before.clip_state)
      chex.assert_trees_all_equal(after.window, before.window)
      self.assertTrue(after.skipped)
      self.assertTrue(after.nonfinite)
      self.assertEqual(after.total_skips, before.total_skips + 1)
      self.assertEqual(after.consecutive_skips, 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nonfinite_loss_skips(self):
    tx = og.skip_nonfinite(optax.adam(1e-2))
    update = self.variant(tx.update)
    state = tx.init(PARAMS)
    updates, new_state = update(_grads(0), state, PARAMS, value=jnp.nan)
    chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
    self.assertTrue(new_state.skipped)
    self.assertEqual(float(jnp.sum(jnp.abs(updates['w']))), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_accepted_step_equals_the_unguarded_composition(self):
    guarded = og.guard(optax.adam(1e-2), clip=og.clip_by_global_norm(1.0))
    plain = optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-2))
    g_state, p_state = guarded.init(PARAMS), plain.init(PARAMS)
    g_update, p_update = self.variant(guarded.update), self.variant(plain.update)
    for step in range(4):
      grads = _grads(step, scale=3.0)
      g_updates, g_state = g_update(grads, g_state, PARAMS, value=1.0)
      p_updates, p_state = p_update(grads, p_state, PARAMS)
      # The accepted branch is compiled inside lax.cond, so XLA may round one
      # fused expression differently from the eager chain, and adam's
      # division amplifies an ulp in a small second moment.
      chex.assert_trees_all_close(g_updates, p_updates, rtol=1e-5, atol=0)
    chex.assert_trees_all_close(g_state.inner_state, p_state[1], rtol=1e-5)
    chex.assert_trees_all_equal(g_state.clip_state, p_state[0])
    m = og.metrics(g_state)
    self.assertFalse(m['skipped'])
    self.assertEqual(m['clip_threshold'], 1.0)
    self.assertEqual(m['update_norm'], 1.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_diverged_after_max_consecutive_skips_then_cleared(self):
    tx = og.skip_nonfinite(optax.sgd(0.1), max_consecutive_skips=3)
    update = self.variant(tx.update)
    state = tx.init(PARAMS)
    flags = []
    for step in range(5):
      _, state = update(_poison(_grads(step), jnp.nan), state, PARAMS)
      flags.append((int(state.consecutive_skips), bool(state.diverged)))
    self.assertEqual(flags, [(1, False), (2, False), (3, True), (4, True),
                             (5, True)])
    _, state = update(_grads(9), state, PARAMS)
    self.assertEqual(int(state.consecutive_skips), 0)
    self.assertFalse(state.diverged)
    self.assertEqual(int(state.total_skips), 5)
    self.assertEqual(int(state.total_nonfinite), 5)

  def test_half_precision_gradients(self):
    params = {'w': jnp.ones(1000, jnp.float16), 'v': jnp.ones(3, jnp.bfloat16)}
    tx = og.guard(optax.sgd(1.0), clip=og.clip_by_global_norm(1.0))
    grads = {'w': jnp.full(1000, 300.0, jnp.float16),
             'v': jnp.full(3, 1.0, jnp.bfloat16)}
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    self.assertEqual(updates['w'].dtype, jnp.float16)
    self.assertFalse(state.skipped)
    np.testing.assert_allclose(og.global_norm(updates), 1.0, rtol=1e-2)
    self.assertGreater(float(jnp.min(jnp.abs(updates['w']))), 0)

  def test_none_and_empty_trees(self):
    tx = og.skip_nonfinite(optax.sgd(0.1))
    params = {'w': jnp.ones(2), 'frozen': None}
    updates, state = tx.update({'w': jnp.ones(2), 'frozen': None},
                               tx.init(params), params)
    self.assertIsNone(updates['frozen'])
    self.assertFalse(state.skipped)
    updates, state = tx.update({}, tx.init({}), {})
    self.assertEqual(updates, {})
    self.assertEqual(state.grad_norm, 0.0)


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(
    faults=st.lists(
        st.sampled_from(['ok', 'nan', 'inf', 'huge', 'nan_loss']),
        min_size=1, max_size=12),
)
def test_never_a_nonfinite_update_or_param(faults):
  tx = _full_guard()
  update = _jitted_full_guard_update()
  state, params = tx.init(PARAMS), PARAMS
  for step, fault in enumerate(faults):
    grads, loss = _grads(step), jnp.array(1.0)
    if fault in ('nan', 'inf'):
      grads = _poison(grads, jnp.nan if fault == 'nan' else jnp.inf)
    elif fault == 'huge':
      grads = jax.tree.map(lambda g: g * 1e30, grads)
    elif fault == 'nan_loss':
      loss = jnp.array(jnp.nan)
    updates, state = update(grads, state, params, value=loss)
    params = optax.apply_updates(params, updates)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    # A huge gradient squares past float32 in Adam's second moment: the
    # optimizer, not the gradient, is non-finite, and that step is skipped.
    assert bool(state.skipped) == (fault in ('nan', 'inf', 'nan_loss')) or (
        fault in ('ok', 'huge') and bool(state.spike)) or (
        fault == 'huge' and bool(state.inner_nonfinite))
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
  expected_nonfinite = sum(f in ('nan', 'inf', 'nan_loss') for f in faults)
  assert int(state.total_nonfinite) == expected_nonfinite


_COMPILED = {}


def _jitted_full_guard_update():
  if 'full' not in _COMPILED:
    _COMPILED['full'] = jax.jit(_full_guard().update)
  return _COMPILED['full']


class SpikeTest(chex.TestCase):

  def _feed(self, tx, losses, norms):
    update = jax.jit(tx.update)
    state = tx.init({'g': jnp.zeros(1)})
    for loss, norm in zip(losses, norms):
      _, state = update({'g': jnp.array([norm], jnp.float32)}, state,
                        value=jnp.array(loss, jnp.float32))
    return state, update

  def test_bessel_corrected_bound_is_exact(self):
    # Window of losses 1..20: mean 10.5, Bessel std sqrt(35) = 5.9161.
    tx = og.skip_spikes(optax.sgd(0.1), window=20, sigma=1.0,
                        min_history=20)
    state, update = self._feed(tx, range(1, 21), [1.0] * 20)
    bound = 10.5 + np.sqrt(35.0)
    _, below = update({'g': jnp.ones(1)}, state, value=bound - 1e-3)
    _, above = update({'g': jnp.ones(1)}, state, value=bound + 1e-3)
    self.assertFalse(below.skipped)
    self.assertTrue(above.skipped)
    self.assertTrue(above.spike)
    self.assertFalse(above.nonfinite)

  def test_grad_norm_spike_and_min_history(self):
    tx = og.skip_spikes(optax.sgd(0.1), window=16, sigma=6.0, min_history=16)
    noisy = 1.0 + 0.01 * np.sin(np.arange(15))
    state, update = self._feed(tx, [1.0] * 15, noisy)
    _, early = update({'g': jnp.array([100.0])}, state, value=1.0)
    self.assertFalse(early.skipped)  # only 15 accepted steps so far
    _, state = update({'g': jnp.array([1.0])}, state, value=1.0)
    _, late = update({'g': jnp.array([100.0])}, state, value=1.0)
    self.assertTrue(late.skipped)

  def test_skipped_values_never_enter_the_window(self):
    tx = og.skip_spikes(optax.sgd(0.1), window=8, sigma=2.0, min_history=4,
                        shift_after=6)
    state, update = self._feed(tx, [1.0, 1.1, 0.9, 1.0], [1.0] * 4)
    admitted = lambda s: (s.window.loss.values, s.window.loss.size,
                          s.window.grad_norm.values, s.window.grad_norm.size)
    for _ in range(6):
      _, new_state = update({'g': jnp.ones(1)}, state, value=50.0)
      self.assertTrue(new_state.skipped)
      chex.assert_trees_all_equal(admitted(new_state), admitted(state))
      state = new_state
    self.assertEqual(int(state.total_spikes), 6)
    self.assertEqual(int(state.consecutive_skips), 6)
    # The 7th high step in a row is a new level: accepted, the loss buffer
    # rebuilt from the run.
    _, state = update({'g': jnp.ones(1)}, state, value=50.0)
    self.assertFalse(state.skipped)
    np.testing.assert_array_equal(state.window.loss.values, [50.0] * 8)

  def test_no_loss_checks_the_norm_only(self):
    tx = og.skip_spikes(optax.sgd(0.1), window=4, sigma=2.0, min_history=4)
    update = jax.jit(tx.update)
    state = tx.init({'g': jnp.zeros(1)})
    for norm in [1.0, 1.1, 0.9, 1.0]:
      _, state = update({'g': jnp.array([norm])}, state)
    _, state = update({'g': jnp.array([30.0])}, state)
    self.assertTrue(state.spike)
    self.assertTrue(np.isnan(state.loss))


@pytest.mark.parametrize('make,match', [
    (lambda: og.skip_spikes(optax.sgd(1), window=1), 'window'),
    (lambda: og.skip_spikes(optax.sgd(1), window=8.5), 'window'),
    (lambda: og.skip_spikes(optax.sgd(1), sigma=0), 'sigma'),
    (lambda: og.skip_spikes(optax.sgd(1), window=8, min_history=9),
     'min_history'),
    (lambda: og.skip_spikes(optax.sgd(1), min_history=1), 'min_history'),
    (lambda: og.skip_nonfinite(optax.sgd(1), max_consecutive_skips=0),
     'max_consecutive_skips'),
    (lambda: og.skip_nonfinite(optax.sgd(1), max_consecutive_skips=-1),
     'max_consecutive_skips'),
    (lambda: og.guard(optax.sgd(1), spikes={'sigma': -1.0}), 'sigma'),
    (lambda: og.guard(optax.sgd(1), spikes={'windw': 4}), 'windw'),
])
def test_bad_hyperparameters_raise_naming_them(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_default_min_history():
  window = og.skip_spikes(optax.sgd(1)).init(PARAMS).window
  assert window.loss.values.shape == window.grad_norm.values.shape == (128,)
  from optax_guard.transforms.spikes import spike_config
  assert spike_config().min_history == 63
  assert spike_config(window=16).min_history == 7
  assert spike_config(window=3).min_history == 2
