"""The loss contract of every step builder and path (issue 23, item 2).

A loss must be one real floating-point scalar. On main before the fix the
loss-scale path cast it to float32 first, so an integer loss trained on zero
gradients and a complex one on its real part, while the unscaled path failed
inside ``jax.grad`` with an error that named neither; a ``(loss, aux)``
tuple without ``has_aux`` failed with ``AttributeError``. Now every builder
(``make_train_step``, its ``has_state`` form, ``make_nnx_train_step``), with
and without a loss scale, raises a ``TypeError`` naming dtype and shape, and
so does the guard's own ``value=``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_guard as og

_BATCH = {'x': jnp.array([[1.0, 2.0], [3.0, -1.0]]),
          'y': jnp.array([1.0, 0.5])}


def _mse(prediction, batch):
  return jnp.mean((prediction - batch['y']) ** 2)


class _Model(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.array([0.5, -0.25]))

  def __call__(self, x):
    return x @ self.w[...]


def _plain(loss_of, tx, has_aux):
  """Runs one step of make_train_step; ``loss_of(mse)`` is the returned loss."""
  step = og.make_train_step(
      lambda p, b: loss_of(_mse(b['x'] @ p['w'], b)), tx, has_aux=has_aux)
  params = {'w': jnp.array([0.5, -0.25])}
  return step(params, tx.init(params), _BATCH)[2]


def _stateful(loss_of, tx, has_aux):
  def loss_fn(params, model_state, batch):
    out = loss_of(_mse(batch['x'] @ params['w'], batch))
    return out, {'calls': model_state['calls'] + 1.0}

  step = og.make_train_step(loss_fn, tx, has_aux=has_aux, has_state=True)
  params = {'w': jnp.array([0.5, -0.25])}
  return step(params, tx.init(params), {'calls': jnp.zeros(())}, _BATCH)[3]


def _nnx(loss_of, tx, has_aux):
  model = _Model()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = og.make_nnx_train_step(
      lambda m, b: loss_of(_mse(m(b['x']), b)), has_aux=has_aux)
  return step(model, optimizer, _BATCH)


_BUILDERS = {'make_train_step': _plain, 'has_state': _stateful,
             'make_nnx_train_step': _nnx}
_TXS = {
    'guard': lambda: og.guard(optax.sgd(0.1)),
    'loss_scale': lambda: og.dynamic_loss_scale(og.guard(optax.sgd(0.1)),
                                                initial_scale=8.0),
}
_PATHS = [(b, t) for b in _BUILDERS for t in _TXS]

_BAD = {
    'int32': (lambda loss: loss.astype(jnp.int32), r'dtype int32 and shape \(\)'),
    'complex64': (lambda loss: loss.astype(jnp.complex64),
                  r'dtype complex64 and shape \(\)'),
    'shape_2': (lambda loss: jnp.stack([loss, loss]),
                r'dtype float32 and shape \(2,\)'),
    'tuple': (lambda loss: (loss, {'acc': loss}), 'has_aux=True'),
}


@pytest.mark.parametrize('bad', sorted(_BAD))
@pytest.mark.parametrize(('builder', 'tx'), _PATHS)
def test_a_loss_that_is_not_a_float_scalar_is_a_type_error(builder, tx, bad):
  loss_of, message = _BAD[bad]
  with pytest.raises(TypeError, match=message):
    _BUILDERS[builder](loss_of, _TXS[tx](), has_aux=False)


@pytest.mark.parametrize(('builder', 'tx'), _PATHS)
def test_loss_and_aux_work_on_every_path(builder, tx):
  metrics = _BUILDERS[builder](lambda loss: (loss, {'twice': 2 * loss}),
                               _TXS[tx](), has_aux=True)
  # mse of [1*0.5 + 2*-0.25 - 1, 3*0.5 - 1*-0.25 - 0.5] = mean(1, 1.5625).
  assert float(metrics['loss']) == 1.28125
  assert float(metrics['aux']['twice']) == 2.5625
  assert not bool(metrics['skipped'])


@pytest.mark.parametrize(('builder', 'tx'), _PATHS)
def test_has_aux_needs_a_pair(builder, tx):
  with pytest.raises(TypeError, match=r'must return \(loss, aux\), got a'):
    _BUILDERS[builder](lambda loss: loss, _TXS[tx](), has_aux=True)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(('builder', 'tx'), _PATHS)
def test_half_precision_losses_keep_their_dtype_and_train(builder, tx, dtype):
  # The documented behaviour: the guard reads the loss as float32 (the
  # metrics report it so, unscaled) and the loss scale multiplies it in
  # float32, so that a float16 loss times the scale cannot overflow.
  metrics = _BUILDERS[builder](lambda loss: (100 * loss).astype(dtype),
                               _TXS[tx](), has_aux=False)
  assert metrics['loss'].dtype == jnp.float32
  # 100 * 1.28125 = 128.125: float16 holds it, bfloat16 rounds to 128.
  assert float(metrics['loss']) == float(jnp.asarray(128.125, dtype))
  assert not bool(metrics['skipped'])


def test_float16_loss_times_the_default_scale_does_not_overflow():
  tx = og.dynamic_loss_scale(og.guard(optax.sgd(1e-6)))  # scale 2**15
  metrics = _plain(lambda loss: (100 * loss).astype(jnp.float16), tx, False)
  assert not bool(metrics['skipped'])
  assert float(metrics['loss_scale']) == 2.0**15


@pytest.mark.parametrize('value', [
    jnp.array(2, jnp.int32), jnp.array(2.0 + 1j), jnp.ones(1),
    (jnp.array(1.0), {'acc': jnp.array(0.5)}), True],
    ids=['int32', 'complex', 'shape_1', 'loss_aux_tuple', 'bool'])
def test_the_guards_value_is_a_float_scalar(value):
  tx = og.guard(optax.sgd(0.1))
  params = {'w': jnp.ones(2)}
  with pytest.raises(TypeError, match='value='):
    tx.update({'w': jnp.ones(2)}, tx.init(params), params, value=value)


def test_the_unscaled_gradient_of_a_bfloat16_loss_is_jax_grads():
  params = {'w': jnp.array([0.5, -0.25])}
  loss_fn = lambda p, b: _mse(b['x'] @ p['w'], b).astype(jnp.bfloat16)
  tx = og.guard(optax.sgd(1.0))
  expected = params['w'] - jax.grad(loss_fn)(params, _BATCH)['w']
  new_params, _, _ = og.make_train_step(loss_fn, tx)(
      params, tx.init(params), _BATCH)
  np.testing.assert_array_equal(new_params['w'], expected)


@pytest.mark.parametrize('value', [jnp.array(2, jnp.int32), jnp.ones(2)],
                         ids=['int32', 'shape_2'])
def test_accumulate_checks_value_before_its_float32_sums(value):
  tx = og.accumulate(og.guard(optax.sgd(0.1)), every_k=2)
  params = {'w': jnp.ones(2)}
  with pytest.raises(TypeError, match='value='):
    tx.update({'w': jnp.ones(2)}, tx.init(params), params, value=value)
