"""Overflow-safe norms: exact where optax is exact, right where it overflows."""

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard.transforms.numerics import norm_stats


class GlobalNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_fp16_that_overflows_optax(self):
    grads = {'w': jnp.full((1000,), 300.0, jnp.float16)}
    assert np.isinf(optax.tree.norm(grads))  # the bug we fix
    norm = self.variant(og.global_norm)(grads)
    np.testing.assert_allclose(norm, 300.0 * np.sqrt(1000), rtol=1e-6)
    self.assertEqual(norm.dtype, jnp.float32)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fp32_that_overflows_optax(self):
    grads = [jnp.full((1000,), 1e30, jnp.float32), jnp.full((10,), -1e30)]
    assert np.isinf(optax.tree.norm(grads))
    norm = self.variant(og.global_norm)(grads)
    np.testing.assert_allclose(norm, 1e30 * np.sqrt(1010), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bf16_beyond_float32_squares(self):
    grads = {'w': jnp.full((4,), 1e30, jnp.bfloat16)}
    expected = float(jnp.bfloat16(1e30)) * 2
    np.testing.assert_allclose(self.variant(og.global_norm)(grads), expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_tiny_values_do_not_underflow(self):
    grads = {'w': jnp.full((100,), 1e-25, jnp.float32)}
    assert optax.tree.norm(grads) == 0  # squares underflow in optax
    np.testing.assert_allclose(self.variant(og.global_norm)(grads), 1e-24, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bitwise_equal_to_optax_on_ordinary_fp32(self):
    key = jax.random.PRNGKey(0)
    grads = {
        'a': jax.random.normal(key, (64, 32)),
        'b': [jax.random.normal(jax.random.fold_in(key, 1), (7,)), jnp.ones(())],
    }
    np.testing.assert_array_equal(
        self.variant(og.global_norm)(grads), optax.tree.norm(grads)
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_and_inf_are_reported(self):
    stats = self.variant(norm_stats)(
        {'a': jnp.array([1.0, jnp.nan]), 'b': jnp.array([jnp.inf])}
    )
    self.assertTrue(np.isnan(stats.global_norm))
    self.assertFalse(stats.finite)
    self.assertTrue(np.isnan(stats.leaf_norms['a']))
    self.assertEqual(stats.leaf_norms['b'], np.inf)
    inf_only = self.variant(norm_stats)({'b': jnp.array([jnp.inf, 1.0])})
    self.assertEqual(inf_only.global_norm, np.inf)
    self.assertFalse(inf_only.finite)

  @chex.variants(with_jit=True, without_jit=True)
  def test_leaf_norms_and_non_float_leaves(self):
    tree = {
        'w': jnp.array([3.0, 4.0]),
        'step': jnp.array(7, jnp.int32),
        'mask': jnp.array([True, False]),
        'none': None,
        'h': jnp.array([12.0], jnp.float16),
    }
    stats = self.variant(norm_stats)(tree)
    self.assertEqual(stats.global_norm, 13.0)
    self.assertEqual(stats.leaf_norms['w'], 5.0)
    self.assertEqual(stats.leaf_norms['h'], 12.0)
    self.assertIsNone(stats.leaf_norms['step'])
    self.assertIsNone(stats.leaf_norms['mask'])
    self.assertIsNone(stats.leaf_norms['none'])
    self.assertTrue(stats.finite)

  @chex.variants(with_jit=True, without_jit=True)
  def test_empty_and_zero_trees(self):
    self.assertEqual(self.variant(og.global_norm)({}), 0.0)
    self.assertEqual(self.variant(og.global_norm)({'w': jnp.zeros(5)}), 0.0)

  def test_float64_with_x64(self):
    with jax.enable_x64(True):
      grads = {'w': jnp.full((10,), 1e200, jnp.float64)}
      norm = og.global_norm(grads)
      self.assertEqual(norm.dtype, jnp.float64)
      np.testing.assert_allclose(norm, 1e200 * np.sqrt(10), rtol=1e-12)

  def test_complex_leaves(self):
    grads = {'z': jnp.array([3 + 4j], jnp.complex64)}
    self.assertEqual(og.global_norm(grads), 5.0)


finite_f32 = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=2, max_side=8),
    elements=dict(min_value=float(np.float32(-3e38)), max_value=float(np.float32(3e38))),
)


@hypothesis.given(a=finite_f32, b=finite_f32)
def test_norm_matches_float64_reference_for_any_finite_input(a, b):
  reference = np.sqrt(
      sum(np.sum(np.square(x.astype(np.float64) / 1e30)) for x in (a, b))
  ) * 1e30
  norm = og.global_norm({'a': jnp.asarray(a), 'b': jnp.asarray(b)})
  hypothesis.assume(reference < 3.4e38)  # representable in float32
  np.testing.assert_allclose(float(norm), reference, rtol=2e-6, atol=1e-37)


@hypothesis.given(
    values=hnp.arrays(
        np.float16, hnp.array_shapes(max_dims=2, max_side=64),
        elements=hypothesis.strategies.floats(-65504, 65504, width=16),
    )
)
def test_fp16_norm_is_exact_in_float32(values):
  reference = np.sqrt(np.sum(np.square(values.astype(np.float64))))
  norm = og.global_norm([jnp.asarray(values)])
  # Never inf, as optax would be past 65504; float32 summation of up to 4096
  # squares costs a few ulps.
  np.testing.assert_allclose(float(norm), reference, rtol=1e-5)


if __name__ == '__main__':
  pytest.main([__file__])


class RescaledPathTest(chex.TestCase):
  """The rare path (a sum that overflows) stacks small leaves by shape."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_a_magnitude_near_float32_max_is_not_lost(self):
    # 1 / 1.559e38 is subnormal: a reciprocal flushed to zero made this
    # leaf's rescaled norm 0.
    a = jnp.full((6, 4), 3e16, jnp.float32).at[3, 0].set(1.559e38)
    stats = self.variant(norm_stats)({'a': a, 'b': jnp.full((6,), 2.0)})
    np.testing.assert_allclose(stats.global_norm, 1.559e38, rtol=1e-6)
    np.testing.assert_allclose(stats.leaf_norms['a'], 1.559e38, rtol=1e-6)
    np.testing.assert_allclose(stats.leaf_norms['b'], np.sqrt(24.0),
                               rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_grouped_leaves_keep_their_own_norms_and_order(self):
    # Three (5,) leaves share one stacked computation, interleaved with a
    # large leaf, a float16 and a complex leaf of the same shape, an empty
    # leaf and a NaN leaf; the big value sends every leaf down the rare path.
    tree = [
        jnp.arange(5.0), jnp.full((1 << 15,), 1e30, jnp.float32),
        jnp.full((5,), 2.0), jnp.ones((5,), jnp.float16) * 3,
        jnp.zeros((0,)), jnp.full((5,), -4.0),
        jnp.array([3 + 4j, 0, 0, 0, 0], jnp.complex64),
    ]
    stats = self.variant(norm_stats)(tree)
    expected = [np.sqrt(30.0), 1e30 * np.sqrt(1 << 15), np.sqrt(20.0),
                np.sqrt(45.0), 0.0, np.sqrt(80.0), 5.0]
    np.testing.assert_allclose(jnp.stack(stats.leaf_norms), expected,
                               rtol=1e-6)
    np.testing.assert_allclose(stats.global_norm, expected[1], rtol=1e-6)
    tree[5] = tree[5].at[2].set(jnp.nan)
    stats = self.variant(norm_stats)(tree)
    norms = np.asarray(jnp.stack(stats.leaf_norms))
    assert np.isnan(norms[5]) and np.isnan(stats.global_norm)
    np.testing.assert_allclose(np.delete(norms, 5), np.delete(expected, 5),
                               rtol=1e-6)
