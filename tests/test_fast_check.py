"""The check of the inner optimizer's output stays exact (issue 24, item 1).

``check_updates=True`` holds a step whose update or new inner state the
inner optimizer made non-finite (``numerics.outputs_finite``). These tests
pin the guarantee any faster check must keep: a finite update too large
for a sum of squares is applied, a NaN or Inf anywhere, in any float
dtype, of the update or the new state is held bit for bit, an inf the
state already held is let stay, and the pure and the fused form agree.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_guard as og
from optax_guard.transforms import numerics

# Two leaves of one shape in different dtypes (summed into one reduction)
# and two of their own shapes.
_SHAPES = {'a': ((3, 4), jnp.float32), 'b': ((5,), jnp.bfloat16),
           'c': ((2, 3), jnp.float16), 'd': ((5,), jnp.float32)}
_BAD = (float('nan'), float('inf'), float('-inf'))


def _tree(fill):
  return {k: jnp.full(shape, fill, dtype) for k, (shape, dtype) in
          _SHAPES.items()}


def _params():
  return {k: (jnp.arange(np.prod(shape)).reshape(shape) % 7 - 3).astype(dtype)
          for k, (shape, dtype) in _SHAPES.items()}


def _grads():
  return jax.tree.map(lambda p: (p * 0.5 + 1).astype(p.dtype), _params())


def _poisonable():
  """sgd that also sums the gradients into its state; its update and new
  state take an added ``poison`` tree each (extra arguments, so that one
  compilation serves every draw)."""

  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None, *, poison_updates, poison_state,
             **unused):
    del params, unused
    new_state = jax.tree.map(lambda s, g, q: (s + g + q).astype(s.dtype),
                             state, grads, poison_state)
    updates = jax.tree.map(lambda g, q: (-0.1 * g + q).astype(g.dtype),
                           grads, poison_updates)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init, update)


_TX = og.guard(_poisonable())
_PURE = jax.jit(_TX.update)
_FUSED = jax.jit(functools.partial(_TX.update, fuse_apply=True))


def _state():
  # One clean step first, so that the held state is not all zeros.
  clean = {'poison_updates': _tree(0), 'poison_state': _tree(0)}
  return _FUSED(_grads(), _TX.init(_params()), _params(), **clean)[1]


_START = _state()


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8),
                                  np.atleast_1d(y).view(np.uint8))


@settings(max_examples=60, deadline=None)
@given(in_state=st.booleans(), leaf=st.sampled_from(sorted(_SHAPES)),
       position=st.integers(0, 11), bad=st.sampled_from(_BAD))
def test_any_nonfinite_output_is_held_bit_for_bit(in_state, leaf, position,
                                                  bad):
  shape, _ = _SHAPES[leaf]
  index = np.unravel_index(position % int(np.prod(shape)), shape)
  poison = _tree(0)
  poison[leaf] = poison[leaf].at[index].set(bad)
  clean = _tree(0)
  kwargs = ({'poison_updates': clean, 'poison_state': poison} if in_state
            else {'poison_updates': poison, 'poison_state': clean})
  params = _params()
  updates, pure_state = _PURE(_grads(), _START, params, **kwargs)
  new_params, fused_state = _FUSED(_grads(), _START, params, **kwargs)
  for state in (pure_state, fused_state):
    m = og.metrics(state)
    assert bool(m['skipped']) and bool(m['inner_nonfinite'])
    assert not bool(m['nonfinite'])
    _assert_same(state.inner_state, _START.inner_state)
  _assert_same(updates, _tree(0))
  _assert_same(new_params, params)
  _assert_same(pure_state, fused_state)


def test_clean_step_is_applied_and_the_forms_agree():
  clean = {'poison_updates': _tree(0), 'poison_state': _tree(0)}
  params = _params()
  updates, pure_state = _PURE(_grads(), _START, params, **clean)
  new_params, fused_state = _FUSED(_grads(), _START, params, **clean)
  assert not bool(og.metrics(fused_state)['skipped'])
  _assert_same(pure_state, fused_state)
  _assert_same(new_params, optax.apply_updates(params, updates))
  expected = jax.tree.map(lambda s, g: (s + g).astype(s.dtype),
                          _START.inner_state, _grads())
  _assert_same(fused_state.inner_state, expected)


def test_huge_finite_update_that_overflows_a_sum_of_squares_is_applied():
  # 1e20 squared is 1e40, past float32's 3.4e38: a sum-of-squares check
  # would call this update non-finite. The gradient's own norm (rescaled,
  # 2e20) is finite, so the step is accepted and must land.
  tx = optax.sgd(1.0, momentum=0.5)
  guarded = og.guard(tx)
  params = {'w': jnp.zeros((4,), jnp.float32), 'v': jnp.ones((2, 2))}
  grads = {'w': jnp.full((4,), 1e20, jnp.float32), 'v': jnp.ones((2, 2))}
  assert not np.isfinite(float(jnp.sum(jnp.square(grads['w']))))
  bare_updates, bare_state = jax.jit(tx.update)(grads, tx.init(params), params)
  bare_params = optax.apply_updates(params, bare_updates)

  state = guarded.init(params)
  updates, pure_state = jax.jit(guarded.update)(grads, state, params)
  new_params, fused_state = jax.jit(functools.partial(
      guarded.update, fuse_apply=True))(grads, state, params)
  for s in (pure_state, fused_state):
    m = og.metrics(s)
    assert not bool(m['skipped']) and not bool(m['inner_nonfinite'])
    _assert_same(s.inner_state, bare_state)
  _assert_same(updates, bare_updates)
  _assert_same(new_params, bare_params)
  np.testing.assert_array_equal(new_params['w'], np.full(4, -1e20, np.float32))


def test_exact_check_at_the_edges():
  check = jax.jit(lambda u: numerics.outputs_finite(u, None, None))
  # Squares past float32's range, a subnormal and both zeros are finite.
  finite = jnp.array([3.4e38, -3.4e38, 1e-45, 0.0, -0.0], jnp.float32)
  assert bool(check(finite))
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    for bad in _BAD:
      assert not bool(check(jnp.ones((3,), dtype).at[1].set(bad)))
  # An overflow by a constant factor (XLA folds (g * c) * 0 to g * 0, so
  # a check written as x * 0 would miss it).
  overflow = jax.jit(lambda g: numerics.outputs_finite(g * 1e38, None, None))
  assert not bool(overflow(jnp.array([10.0, 0.0])))
  with jax.enable_x64(True):
    big = jnp.array([1e300, 1.0], jnp.float64)
    assert bool(check(big)) and not bool(check(big.at[1].set(jnp.inf)))
  complex_leaf = jnp.array([1 + 1j, 1j], jnp.complex64)
  assert bool(check(complex_leaf))
  assert not bool(check(complex_leaf.at[1].set(complex(1, float('inf')))))


@settings(max_examples=20, deadline=None)
@given(leaf=st.sampled_from(sorted(_SHAPES)), position=st.integers(0, 11),
       held=st.sampled_from((float('inf'), float('-inf'))))
def test_an_inf_the_state_already_held_does_not_skip(leaf, position, held):
  # A state element that was not finite may stay so (optax states that
  # start at inf); only a finite one turning non-finite holds the step.
  shape, _ = _SHAPES[leaf]
  index = np.unravel_index(position % int(np.prod(shape)), shape)
  start = _START._replace(inner_state={
      **_START.inner_state,
      leaf: _START.inner_state[leaf].at[index].set(held)})
  clean = {'poison_updates': _tree(0), 'poison_state': _tree(0)}
  params = _params()
  new_params, state = _FUSED(_grads(), start, params, **clean)
  _assert_same(new_params, optax.apply_updates(
      params, jax.tree.map(lambda g: (-0.1 * g).astype(g.dtype), _grads())))
  m = og.metrics(state)
  assert not bool(m['skipped']) and not bool(m['inner_nonfinite'])
  assert float(state.inner_state[leaf][index]) == held
