"""Clipping transformations against optax and the published algorithms."""

import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from tests import reference


def _grads(key, scale=1.0):
  k1, k2 = jax.random.split(key)
  return {
      'w': scale * jax.random.normal(k1, (16, 8)),
      'b': scale * jax.random.normal(k2, (8,)),
  }


class ClipByGlobalNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_unclipped_is_bitwise_optax(self):
    grads = _grads(jax.random.PRNGKey(0), scale=0.01)
    ours, _ = self.variant(og.clip_by_global_norm(10.0).update)(
        grads, og.clip_by_global_norm(10.0).init(grads))
    theirs, _ = optax.clip_by_global_norm(10.0).update(grads, None)
    chex.assert_trees_all_equal(ours, theirs)

  @chex.variants(with_jit=True, without_jit=True)
  def test_clipped_matches_optax_within_one_rounding(self):
    grads = _grads(jax.random.PRNGKey(1), scale=3.0)
    tx = og.clip_by_global_norm(1.0)
    ours, state = self.variant(tx.update)(grads, tx.init(grads))
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    chex.assert_trees_all_close(ours, theirs, rtol=2e-7, atol=0)
    norm = float(optax.tree.norm(grads))
    self.assertEqual(state.stats.grad_norm, np.float32(norm))
    self.assertEqual(state.stats.clip_threshold, 1.0)
    self.assertEqual(state.stats.update_norm, 1.0)
    np.testing.assert_allclose(optax.tree.norm(ours), 1.0, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fp16_overflow_is_clipped_not_zeroed(self):
    grads = {'w': jnp.full((1000,), 300.0, jnp.float16)}
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    assert not np.any(theirs['w'])  # optax zeroes the update
    tx = og.clip_by_global_norm(1.0)
    ours, state = self.variant(tx.update)(grads, tx.init(grads))
    self.assertEqual(ours['w'].dtype, jnp.float16)
    np.testing.assert_allclose(og.global_norm(ours), 1.0, rtol=1e-3)
    np.testing.assert_allclose(state.stats.grad_norm, 9486.833, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fp32_overflow_is_clipped_not_zeroed(self):
    grads = {'w': jnp.full((1000,), 1e30, jnp.float32)}
    assert not np.any(optax.clip_by_global_norm(1.0).update(grads, None)[0]['w'])
    tx = og.clip_by_global_norm(1.0)
    ours, _ = self.variant(tx.update)(grads, tx.init(grads))
    np.testing.assert_allclose(ours['w'], 1 / np.sqrt(1000), rtol=1e-6)

  def test_non_float_leaves_pass_through(self):
    grads = {'w': jnp.array([30.0, 40.0]), 'i': jnp.array([5], jnp.int32),
             'n': None}
    tx = og.clip_by_global_norm(5.0)
    updates, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(updates['w'], [3.0, 4.0])
    np.testing.assert_array_equal(updates['i'], [5])
    self.assertIsNone(updates['n'])


@hypothesis.given(
    values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=20),
    max_norm=st.floats(1e-3, 1e3),
)
def test_clipped_norm_never_exceeds_max_norm(values, max_norm):
  grads = {'w': jnp.array(values, jnp.float32)}
  tx = og.clip_by_global_norm(max_norm)
  updates, _ = tx.update(grads, tx.init(grads))
  norm = float(optax.tree.norm(updates))
  assert norm <= max_norm * (1 + 1e-6)
  assert norm == pytest.approx(min(float(optax.tree.norm(grads)), max_norm),
                               rel=1e-5, abs=1e-30)


def _planted_norms(seed, n=120, spikes=(40, 41, 70, 100)):
  """Noisy norms around 1 with large spikes and one NaN planted."""
  rng = np.random.default_rng(seed)
  norms = 1.0 + 0.1 * rng.standard_normal(n)
  for i, step in enumerate(spikes):
    norms[step] = 10.0 ** (1 + i)
  norms[55] = np.nan
  return norms.astype(np.float32)


def _run_on_norms(tx, norms):
  """Feeds one-element gradients of the given norms; returns states."""
  update = jax.jit(tx.update)
  state = tx.init(None)
  states, updates = [], []
  for norm in norms:
    u, state = update({'g': jnp.array([norm], jnp.float32)}, state)
    states.append(state)
    updates.append(float(u['g'][0]))
  return states, updates


ZCLIP_CONFIGS = [
    dict(),
    dict(clip_option='mean'),
    dict(mode='percentile'),
    dict(max_norm=1.05, warmup_steps=10),
    dict(skip_update_on_spike=True, z_thresh=2.0, clip_factor=0.8),
    dict(alpha=0.9, warmup_steps=1),
]


@pytest.mark.parametrize('config', ZCLIP_CONFIGS)
def test_zclip_follows_reference_step_by_step(config):
  norms = _planted_norms(seed=len(str(config)))
  ref = reference.ZClipReference(**config)
  states, updates = _run_on_norms(og.zclip(**config), norms)
  clipped_any = False
  for step, (norm, state, update) in enumerate(zip(norms, states, updates)):
    expected = ref.step(float(norm))
    got = float(state.stats.clip_threshold)
    if math.isinf(expected):
      assert math.isinf(got), (step, got)
    else:
      clipped_any = True
      assert got == pytest.approx(expected, rel=1e-5), step
      assert update == pytest.approx(expected, rel=1e-5), step
    if ref.initialized and math.isfinite(norm):
      assert float(state.mean) == pytest.approx(ref.mean, rel=1e-5), step
      assert float(state.var) == pytest.approx(ref.var, rel=1e-4, abs=1e-9)
  assert clipped_any


def test_zclip_clips_planted_spikes_and_ignores_nan():
  states, updates = _run_on_norms(og.zclip(), _planted_norms(seed=0))
  for step in (40, 41, 70, 100):
    assert updates[step] < 2.0, step
  assert np.isnan(updates[55])  # passed through: skipping is guard's job
  assert np.isfinite(float(states[-1].mean))
  assert np.isfinite(float(states[-1].var))


def test_zclip_warmup_collects_only_finite_norms():
  tx = og.zclip(warmup_steps=3)
  states, _ = _run_on_norms(tx, [1.0, np.nan, 2.0, np.inf, 3.0])
  assert int(states[-1].warmup_count) == 3
  assert float(states[-1].mean) == pytest.approx(2.0)
  assert float(states[-1].var) == pytest.approx(2 / 3)


@pytest.mark.parametrize('quantile,history_length', [(0.9, 1000), (0.5, 7),
                                                     (1.0, 16), (0.25, 3)])
def test_autoclip_follows_reference(quantile, history_length):
  norms = _planted_norms(seed=3, n=60, spikes=(10, 30, 45)).astype(np.float32)
  expected = reference.autoclip_thresholds(
      [float(n) for n in norms], quantile, history_length)
  states, updates = _run_on_norms(og.autoclip(quantile, history_length), norms)
  for step, (norm, state, threshold) in enumerate(zip(norms, states,
                                                      expected)):
    got = float(state.stats.clip_threshold)
    if np.isfinite(norm) and norm > threshold:
      assert got == pytest.approx(threshold, rel=1e-6), step
      assert updates[step] == pytest.approx(threshold, rel=1e-6), step
    else:
      assert math.isinf(got), step
  assert math.isinf(float(states[0].stats.clip_threshold))  # first step


def test_agc_matches_optax_and_reports_metrics():
  params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
  grads = {'w': jnp.full((4, 3), 5.0), 'b': jnp.full(3, 1e-4)}
  tx = og.agc(0.1)
  ours, state = tx.update(grads, tx.init(params), params)
  theirs, _ = optax.adaptive_grad_clip(0.1).update(grads, None, params)
  chex.assert_trees_all_equal(ours, theirs)
  assert float(state.stats.grad_norm) == pytest.approx(
      float(optax.tree.norm(grads)))
  assert float(state.stats.update_norm) == pytest.approx(
      float(optax.tree.norm(ours)))
  assert float(state.stats.clip_threshold) == pytest.approx(
      float(optax.tree.norm(ours)))
  with pytest.raises(ValueError, match='needs params'):
    tx.update(grads, tx.init(params))


@pytest.mark.parametrize('make,match', [
    (lambda: og.clip_by_global_norm(0.0), 'max_norm'),
    (lambda: og.clip_by_global_norm(-1), 'max_norm'),
    (lambda: og.zclip(alpha=1.0), 'alpha'),
    (lambda: og.zclip(alpha=0.0), 'alpha'),
    (lambda: og.zclip(z_thresh=0), 'z_thresh'),
    (lambda: og.zclip(max_norm=-2.0), 'max_norm'),
    (lambda: og.zclip(warmup_steps=0), 'warmup_steps'),
    (lambda: og.zclip(warmup_steps=-3), 'warmup_steps'),
    (lambda: og.zclip(mode='median'), 'mode'),
    (lambda: og.zclip(clip_option='max'), 'clip_option'),
    (lambda: og.zclip(clip_factor=0), 'clip_factor'),
    (lambda: og.zclip(eps=-1e-6), 'eps'),
    (lambda: og.autoclip(quantile=0.0), 'quantile'),
    (lambda: og.autoclip(quantile=1.5), 'quantile'),
    (lambda: og.autoclip(history_length=0), 'history_length'),
    (lambda: og.agc(clipping=0), 'clipping'),
    (lambda: og.agc(0.1, eps=-1), 'eps'),
])
def test_bad_hyperparameters_raise_naming_them(make, match):
  with pytest.raises(ValueError, match=match):
    make()
