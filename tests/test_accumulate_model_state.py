"""Accumulation with model state: only applied micro-batches move statistics.

Each test runs a BatchNorm model through a train step with
``og.accumulate(..., every_k=2, model_state=...)`` over micro-batches with
NaN ones, a macro step the spike rule skips and one whose micro-batches were
all dropped, then replays exactly the applied micro-batches through the
model's forward pass (with the params each macro step saw) and compares the
statistics. The replay is another compiled program, whose reductions XLA
may order differently: the statistics agree within a few ulps (a micro-batch
wrongly kept or undone moves them by orders of magnitude more, a NaN one
makes them NaN).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_guard as og
from optax_guard.train_step import hold_if_skipped
from tests.test_seams import _LinenBN

EVERY_K = 2
# Macro steps of two micro-batches: 'nan' is a NaN batch, 'big' one whose
# inputs are 1e3 times larger (a gradient-norm spike once three macro steps
# are in the window).
SCHEDULE = ['ok', 'ok', 'ok', 'nan', 'ok', 'ok', 'big', 'ok', 'nan', 'nan',
            'ok', 'ok']
# Which micro-batches reach the model state: not dropped, and in a macro
# step the guard applied (the 4th is a spike, the 5th all NaN).
APPLIED = [True, True, True, False, True, True, False, False, False, False,
           True, True]
SPIKES = {'window': 8, 'min_history': 3, 'sigma': 3.0}


def _batch(index, kind):
  rng = np.random.default_rng(index)
  x = rng.normal(size=(16, 3)).astype(np.float32)
  if kind == 'nan':
    x[2, 1] = np.nan
  if kind == 'big':
    x *= 1e3
  y = np.nan_to_num(x.sum(axis=1, keepdims=True))
  return {'x': jnp.asarray(x), 'y': jnp.asarray(y)}


BATCHES = [_batch(i, kind) for i, kind in enumerate(SCHEDULE)]


def _assert_same_statistics(actual, expected):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-6),
               actual, expected)


def _tx(model_state):
  return og.accumulate(og.guard(optax.adam(1e-2), spikes=SPIKES), EVERY_K,
                       model_state=model_state)


def _linen_setup():
  module = _LinenBN()
  variables = module.init(jax.random.PRNGKey(0), jnp.ones((4, 3)), train=False)
  params = variables['params']
  model_state = {'batch_stats': variables['batch_stats']}

  def loss_fn(params, model_state, batch):
    out, new_state = module.apply(
        {'params': params, **model_state}, batch['x'], train=True,
        mutable=['batch_stats'])
    return jnp.mean((out - batch['y']) ** 2), new_state

  def forward(params, model_state, batch):
    return module.apply({'params': params, **model_state}, batch['x'],
                        train=True, mutable=['batch_stats'])[1]

  return params, model_state, loss_fn, jax.jit(forward)


def test_linen_statistics_come_from_exactly_the_applied_micro_batches():
  params, model_state, loss_fn, forward = _linen_setup()
  reference = model_state
  tx = _tx(model_state)
  step = og.make_train_step(loss_fn, tx, has_state=True, donate=False)
  opt_state = tx.init(params)
  skipped = []
  for batch, applied in zip(BATCHES, APPLIED):
    if applied:  # Params change only at the end of a macro step.
      reference = forward(params, reference, batch)
    params, opt_state, model_state, m = step(params, opt_state, model_state,
                                             batch)
    skipped.append(bool(m['skipped']))
  # The guard skipped macro steps 4 (spike) and 5 (every micro-batch NaN).
  assert skipped[7] and skipped[9] and not skipped[11]
  assert int(og.metrics(opt_state)['total_dropped']) == 3
  _assert_same_statistics(model_state, reference)


def _nnx_model():
  return nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)),
                        nnx.BatchNorm(8, rngs=nnx.Rngs(1)), nnx.relu,
                        nnx.Linear(8, 1, rngs=nnx.Rngs(2)))


def _nnx_loss(model, batch):
  return jnp.mean((model(batch['x']) - batch['y']) ** 2)


def test_nnx_statistics_come_from_exactly_the_applied_micro_batches():
  model = _nnx_model()
  reference = _nnx_model()

  @nnx.jit
  def forward(model, batch):
    model(batch['x'])

  optimizer = nnx.Optimizer(model, _tx(nnx.state(model, nnx.BatchStat)),
                            wrt=nnx.Param)
  step = og.make_nnx_train_step(_nnx_loss, donate=False)
  skipped = []
  for batch, applied in zip(BATCHES, APPLIED):
    if applied:
      nnx.update(reference, nnx.state(model, nnx.Param))
      forward(reference, batch)
    skipped.append(bool(step(model, optimizer, batch)['skipped']))
  assert skipped[7] and skipped[9] and not skipped[11]
  _assert_same_statistics(
      nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
      nnx.to_pure_dict(nnx.state(reference, nnx.BatchStat)))


def test_without_model_state_the_step_says_how_to_pass_it():
  params, model_state, loss_fn, _ = _linen_setup()
  tx = _tx(None)
  step = og.make_train_step(loss_fn, tx, has_state=True, donate=False)
  with pytest.raises(ValueError, match=r'model_state=.*batch_stats'):
    step(params, tx.init(params), model_state, BATCHES[0])


def test_a_model_without_state_needs_no_copy():
  tx = og.accumulate(og.guard(optax.sgd(1.0)), EVERY_K)
  loss_fn = lambda p, s, b: (jnp.mean((b['x'] * p['w'] - b['y']) ** 2), s)
  step = og.make_train_step(loss_fn, tx, has_state=True, donate=False)
  params = {'w': jnp.ones(3)}
  out = step(params, tx.init(params), {'count': jnp.zeros((), jnp.int32)},
             BATCHES[0])
  assert int(out[2]['count']) == 0


def test_the_copy_is_checkpointed_with_the_optimizer_state(tmp_path):
  params, model_state, loss_fn, _ = _linen_setup()
  tx = _tx(model_state)
  step = og.make_train_step(loss_fn, tx, has_state=True, donate=False)
  opt_state = tx.init(params)
  # Mid-macro-step: the copy holds the statistics from before micro-batch 0.
  params, opt_state, model_state, _ = step(params, opt_state, model_state,
                                           BATCHES[0])
  assert int(opt_state.inner_state.micro_step) == 1
  with og.Checkpointer(tmp_path / 'ckpt') as ckpt:
    assert ckpt.save(og.TrainState(1, params, opt_state), force=True)
    ckpt.wait_until_finished()
    restored, _ = ckpt.restore(1, og.TrainState(0, params, tx.init(params)))
  assert int(restored.opt_state.inner_state.micro_step) == 1
  jax.tree.map(np.testing.assert_array_equal, restored.opt_state.model_state,
               opt_state.model_state)


def test_hold_if_skipped_refuses_a_module_and_names_the_fix():
  model = _nnx_model()
  with pytest.raises(TypeError, match=r'nnx\.state\(model, nnx\.BatchStat\)'):
    hold_if_skipped(jnp.array(True), model, model)
  with pytest.raises(ValueError, match='same structure'):
    hold_if_skipped(jnp.array(True), {'a': jnp.ones(2)}, {'b': jnp.ones(2)})
