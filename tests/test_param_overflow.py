"""No finite update may make a parameter non-finite (issue 23, item 3).

On main before the fix a float16 parameter of 60000 updated by a finite
+10000 landed as ``inf``: the guard checked the update and the optimizer
state, not the parameter it makes. Now the check of the inner optimizer's
output (``check_updates=True``, the default) also holds the step when the
updated parameter would not be finite, in the fused train steps and in the
pure form when ``params`` are passed, reported as ``inner_nonfinite``. Only
dtypes narrower than float32 are read (float16, float8): at float32 the
compiled check is unchanged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_guard as og
from optax_guard.transforms import numerics

_BIG = 60000.0  # float16's largest finite value is 65504.


def _params():
  return {'w': jnp.array([_BIG, 1.0], jnp.float16)}


def _loss(params, batch):
  # d loss / d w = -batch: a gradient of -10000 pushes 60000 to 70000.
  return -jnp.sum(params['w'].astype(jnp.float32) * batch)


_OVERFLOW = jnp.array([10000.0, 1.0], jnp.float32)
_FINE = jnp.array([100.0, 1.0], jnp.float32)


def test_pure_form_with_params_holds_the_step():
  tx = og.guard(optax.sgd(1.0))
  params = _params()
  state = tx.init(params)
  grads = {'w': jnp.array([-10000.0, -1.0], jnp.float16)}
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  m = og.metrics(new_state)
  assert bool(m['skipped']) and bool(m['inner_nonfinite'])
  np.testing.assert_array_equal(updates['w'], np.zeros(2, np.float16))
  assert np.isfinite(np.asarray(optax.apply_updates(params, updates)['w'])).all()


@pytest.mark.parametrize('make_tx', [
    lambda: og.guard(optax.sgd(1.0)),
    lambda: og.dynamic_loss_scale(og.guard(optax.sgd(1.0)), initial_scale=1.0),
], ids=['guard', 'loss_scale'])
def test_fused_train_step_holds_the_step(make_tx):
  tx = make_tx()
  step = og.make_train_step(_loss, tx)
  params = _params()
  opt_state = tx.init(params)
  params, opt_state, m = step(params, opt_state, _OVERFLOW)
  assert bool(m['skipped']) and bool(m['inner_nonfinite'])
  np.testing.assert_array_equal(params['w'], _params()['w'])
  # An ordinary step still lands: 60000 + 100.
  params, opt_state, m = step(params, opt_state, _FINE)
  assert not bool(m['skipped'])
  assert float(params['w'][0]) == float(np.float16(_BIG + 100.0))


class _Half(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.array([_BIG, 1.0], jnp.float16))


def test_nnx_train_step_holds_the_step():
  model = _Half()
  optimizer = nnx.Optimizer(model, og.guard(optax.sgd(1.0)), wrt=nnx.Param)
  step = og.make_nnx_train_step(
      lambda m, b: -jnp.sum(m.w[...].astype(jnp.float32) * b))
  m = step(model, optimizer, _OVERFLOW)
  assert bool(m['skipped']) and bool(m['inner_nonfinite'])
  np.testing.assert_array_equal(model.w[...], _params()['w'])


def test_float32_params_add_nothing_to_the_compiled_check():
  # The check reads only parameters narrower than float32: with float32
  # params the lowered program is the one without params.
  updates = {'w': jnp.ones((4, 3))}
  state = (jnp.ones((4, 3)),)
  params = {'w': jnp.full((4, 3), 3e38, jnp.float32)}
  with_params = jax.jit(
      lambda u, s, p: numerics.outputs_finite(u, s, s, p)).lower(
          updates, state, params).as_text()
  without = jax.jit(
      lambda u, s, p: numerics.outputs_finite(u, s, s)).lower(
          updates, state, params).as_text()
  assert with_params == without


@pytest.mark.parametrize(('dtype', 'narrow'), [
    (jnp.float16, True), (jnp.float8_e4m3fn, True), (jnp.bfloat16, False),
    (jnp.float32, False), (jnp.int32, False)])
def test_which_dtypes_are_checked(dtype, narrow):
  assert numerics.overflows_below_float32(dtype) == narrow
