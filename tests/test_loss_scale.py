"""Dynamic loss scaling: the scale rule, exact skips, and fp16 training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_guard as og
from optax_guard.transforms.guard import GuardState

PARAMS = {'w': jnp.ones(3, jnp.float32)}
FINITE = {'w': jnp.array([1.0, -2.0, 0.5], jnp.float32)}
OVERFLOW = {'w': jnp.array([1.0, jnp.inf, 0.5], jnp.float32)}


def _torch_grad_scaler(scale, finite_steps, growth_interval, factor,
                       min_scale, events):
  """GradScaler.update() per step, with one factor and a floor (the spec)."""
  scales = []
  for finite in events:
    if finite:
      finite_steps += 1
      if finite_steps == growth_interval and np.isfinite(scale * factor):
        scale, finite_steps = scale * factor, 0
    else:
      scale, finite_steps = max(scale / factor, min_scale), 0
    scales.append(scale)
  return scales


def test_scale_shrinks_on_overflow_and_grows_after_the_interval():
  tx = og.dynamic_loss_scale(optax.sgd(0.1), initial_scale=8.0,
                             growth_interval=3, factor=2.0, min_scale=2.0)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  events = [True, True, True, False, True, False, False, False, True, True,
            True, True, True, True, False]
  scales = []
  for finite in events:
    _, state = update(FINITE if finite else OVERFLOW, state, PARAMS)
    scales.append(float(og.loss_scale(state)))
    assert bool(og.metrics(state)['skipped']) == (not finite)
  assert scales == _torch_grad_scaler(8.0, 0, 3, 2.0, 2.0, events)
  assert og.metrics(state)['loss_scale'] == scales[-1]


def test_scale_never_grows_past_its_ceiling():
  # 2**126: the largest scale whose inverse is a normal float32.
  tx = og.dynamic_loss_scale(optax.sgd(0.1), initial_scale=2.0**125,
                             growth_interval=1)
  state = tx.init(PARAMS)
  for _ in range(3):
    _, state = tx.update(FINITE, state, PARAMS)
  assert float(og.loss_scale(state)) == 2.0**126


def test_gradients_are_unscaled_and_overflow_rolls_back_exactly():
  tx = og.dynamic_loss_scale(optax.adam(0.1), initial_scale=1024.0)
  update = jax.jit(tx.update)
  plain = optax.adam(0.1)
  state, plain_state = tx.init(PARAMS), plain.init(PARAMS)
  scaled = jax.tree.map(lambda g: g * 1024.0, FINITE)
  updates, state = update(scaled, state, PARAMS)
  want, plain_state = plain.update(FINITE, plain_state, PARAMS)
  chex.assert_trees_all_close(updates, want, rtol=1e-6)
  held = state
  updates, state = update(OVERFLOW, state, PARAMS, value=jnp.array(1.0))
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
  chex.assert_trees_all_equal(state.inner_state.inner_state,
                              held.inner_state.inner_state)
  assert float(og.loss_scale(state)) == 512.0


def test_a_guard_inside_is_used_as_is():
  guarded = og.dynamic_loss_scale(og.guard(optax.adam(0.1), clip=og.zclip()))
  state = guarded.init(PARAMS)
  assert isinstance(state.inner_state, GuardState)
  assert not isinstance(state.inner_state.inner_state, GuardState)
  assert {'zclip_mean', 'loss_scale', 'grad_norm'} <= set(og.metrics(state))
  wrapped = og.dynamic_loss_scale(optax.adam(0.1)).init(PARAMS)
  assert isinstance(wrapped.inner_state, GuardState)


def test_loss_scale_reads_any_state():
  tx = og.dynamic_loss_scale(optax.adam(0.1), initial_scale=64.0)
  chained = optax.chain(optax.scale(1.0), tx)
  assert float(og.loss_scale(chained.init(PARAMS))) == 64.0
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  assert float(og.loss_scale(optimizer)) == 64.0
  with pytest.raises(ValueError, match='no loss scale'):
    og.loss_scale(optax.adam(0.1).init(PARAMS))


@pytest.mark.parametrize('kwargs,match', [
    (dict(initial_scale=0.0), 'initial_scale'),
    (dict(initial_scale=float('inf')), 'initial_scale'),
    (dict(growth_interval=0), 'growth_interval'),
    (dict(factor=1.0), 'factor'),
    (dict(min_scale=0.0), 'min_scale'),
    (dict(initial_scale=4.0, min_scale=8.0), 'min_scale'),
])
def test_bad_hyperparameters_raise_naming_them(kwargs, match):
  # Wrong types (growth_interval=2.5) are TypeErrors: tests/test_arguments.py.
  with pytest.raises(ValueError, match=match):
    og.dynamic_loss_scale(optax.sgd(0.1), **kwargs)


# An fp16 model whose output is scaled by 1e-4: the gradient reaching its
# weights is about 3e-10 per element, far below fp16's smallest subnormal
# (6e-8), so without loss scaling every weight gradient is exactly zero.
def _fp16_loss(params, batch):
  x, w = batch['x'].astype(jnp.float16), params['w'].astype(jnp.float16)
  prediction = (x @ w) * jnp.float16(1e-4)
  return jnp.mean((prediction.astype(jnp.float32) - batch['y']) ** 2)


def _fp16_batch():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype(np.float32)
  w_true = rng.normal(size=(8, 1)).astype(np.float32)
  return {'x': jnp.asarray(x), 'y': jnp.asarray(1e-4 * x @ w_true)}


def _train_fp16(tx, steps):
  step = og.make_train_step(_fp16_loss, tx)
  params = {'w': jnp.zeros((8, 1), jnp.float32)}  # fp32 master weights
  opt_state = tx.init(params)
  history = []
  for _ in range(steps):
    params, opt_state, metrics = step(params, opt_state, _fp16_batch())
    history.append(jax.device_get(metrics))
  return params, history


def test_fp16_gradients_underflow_without_scaling():
  grads = jax.grad(_fp16_loss)({'w': jnp.zeros((8, 1))}, _fp16_batch())
  assert not np.any(grads['w'])
  params, history = _train_fp16(og.guard(optax.adam(0.1)), steps=3)
  assert not np.any(params['w'])  # nothing to learn from
  assert history[-1]['loss'] == history[0]['loss']


def test_fp16_model_trains_with_dynamic_loss_scale():
  # The scale starts far too high: fp16 overflows, steps are skipped and the
  # scale halves until the gradients fit; then it trains, growing the scale
  # every 5 finite steps and backing off when that overflows again.
  tx = og.dynamic_loss_scale(og.guard(optax.adam(0.1)),
                             initial_scale=2.0**40, growth_interval=5)
  _, history = _train_fp16(tx, steps=40)
  skipped = [bool(m['skipped']) for m in history]
  scales = [float(m['loss_scale']) for m in history]
  first_good = skipped.index(False)
  assert first_good > 3 and not any(skipped[first_good:first_good + 5])
  assert scales[:first_good] == [2.0**(39 - i) for i in range(first_good)]
  assert scales[first_good + 4] == 2 * scales[first_good]  # grew after 5
  assert all(m['nonfinite'] == m['skipped'] for m in history)
  assert history[-1]['loss'] < history[0]['loss'] / 10


def test_train_step_equals_the_manual_recipe():
  """make_train_step scales the loss by og.loss_scale(state), as a user would."""
  tx = og.dynamic_loss_scale(og.guard(optax.adam(0.1)), initial_scale=2.0**12,
                             growth_interval=2)

  @jax.jit
  def manual(params, opt_state, batch):
    scale = og.loss_scale(opt_state)
    loss, grads = jax.value_and_grad(
        lambda p: _fp16_loss(p, batch) * scale)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss / scale)
    return optax.apply_updates(params, updates), opt_state, og.metrics(opt_state)

  step = og.make_train_step(_fp16_loss, tx)
  params = {'w': jnp.zeros((8, 1), jnp.float32)}
  opt_state = tx.init(params)
  for _ in range(4):
    want = manual(params, opt_state, _fp16_batch())
    got = step(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state),
               _fp16_batch())
    chex.assert_trees_all_equal(got[1], want[1])
    chex.assert_trees_all_equal({k: got[2][k] for k in want[2]}, want[2])
    chex.assert_trees_all_close(got[0], want[0], rtol=1e-6)
    params, opt_state = want[0], want[1]
  assert float(og.loss_scale(opt_state)) == 2.0**14
