"""Slow trouble recovered by ``og.fit`` with the default ``RecoveryPolicy``.

A linear regression (8 inputs) trained with SGD through the recommended
guard, 300 steps per run, against the same run without faults:

(a) the learning rate too high from step 100 on (every gradient times 10,
    ``grad_spike`` faults: SGD steps scale with it), so the loss creeps up
    and would overflow; the loss rule (``loss_factor``, on by default) rolls
    back and ``lr_backoff`` halves the rate;
(b) rows of each batch replaced by noise, ramping from 0% to 100% over 100
    steps and back;
(c) a permanent level shift: noise of 3 standard deviations of the targets
    added from step 100 on (the loss level rises about 3000x);
(d) a burst of 30 NaN gradients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard import testing as faults

STEPS = 300
LR = 0.1
DIM = 8


def loss_fn(params, batch):
  prediction = batch['x'] @ params['w'] + params['b']
  return jnp.mean((prediction - batch['y']) ** 2)


def dataset(seed, num_examples):
  rng = np.random.default_rng(seed)
  teacher = np.random.default_rng(0).standard_normal((DIM, 1))
  x = rng.standard_normal((num_examples, DIM)).astype(np.float32)
  y = x @ teacher + 0.1 * rng.standard_normal((num_examples, 1))
  return {'x': x, 'y': y.astype(np.float32)}


HELDOUT = dataset(seed=99, num_examples=1024)
TX = og.guard(optax.inject_hyperparams(optax.sgd)(learning_rate=LR),
              spikes={'window': 32}, max_consecutive_skips=16)


@functools.cache
def train_step():
  return og.make_train_step(faults.with_faults(loss_fn), TX)


def heldout_loss(params):
  return float(loss_fn(params, HELDOUT))


def fit(tmp_path, plan, **policy):
  params = {'w': jnp.zeros((DIM, 1)), 'b': jnp.zeros(())}
  data = faults.FaultInjector(og.batches(dataset(1, 4096), 32, seed=1), plan)
  with og.Checkpointer(tmp_path, save_interval_steps=10,
                       async_save=False) as ckpt:
    return og.fit(train_step(), og.TrainState(0, params, TX.init(params)),
                  data, num_steps=STEPS, checkpointer=ckpt,
                  recovery=og.RecoveryPolicy(**policy), progress=False,
                  handle_preemption=False)


@pytest.fixture(scope='module')
def clean_loss(tmp_path_factory):
  return heldout_loss(fit(tmp_path_factory.mktemp('clean'), {}).state.params)


def finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def test_a_learning_rate_too_high_is_backed_off(tmp_path, clean_loss):
  plan = faults.level_shift(100, STEPS, 10.0, kind='grad_spike')
  result = fit(tmp_path, plan, lr_backoff=0.5)
  assert finite(result.state.params)
  # The spike rule alone lets the growing loss in as a series of level
  # shifts (one step in shift_after + 1); the loss rule sees it stay above
  # 3x its average for loss_patience steps (measured: rollback at step 239).
  (rollback,) = result.recovery.rollbacks
  assert rollback['reason'].startswith('loss ')
  assert rollback['reason'].endswith(' for 64 steps')
  assert float(result.state.opt_state.inner_state.hyperparams[
      'learning_rate']) == pytest.approx(LR * 0.5)
  assert heldout_loss(result.state.params) <= 1.1 * clean_loss


def test_a_ramp_of_poisoned_rows_is_outlived(tmp_path, clean_loss):
  result = fit(tmp_path, faults.ramp(50, 100))
  assert finite(result.state.params)
  assert heldout_loss(result.state.params) <= 1.1 * clean_loss


def test_a_level_shift_is_learned_without_rollback(tmp_path, clean_loss):
  result = fit(tmp_path, faults.level_shift(100, STEPS, 3.0))
  assert result.recovery.rollbacks == []
  assert finite(result.state.params)
  # The spike rule's shift_after (8 at window 32) skips, no more; the model
  # still fits the clean held-out data (noisier targets, same teacher), at
  # the noise floor of SGD on them (measured 0.63; untrained 3.35).
  assert result.events.counts['skipped_step'] == 8
  untrained = heldout_loss({'w': jnp.zeros((DIM, 1)), 'b': jnp.zeros(())})
  assert heldout_loss(result.state.params) <= 0.25 * untrained


def test_a_burst_of_30_nan_steps_is_rolled_back(tmp_path, clean_loss):
  plan = {i: faults.Fault('nan_grad') for i in range(150, 180)}
  result = fit(tmp_path, plan)
  assert finite(result.state.params)
  assert len(result.recovery.rollbacks) == 1
  assert heldout_loss(result.state.params) <= 1.1 * clean_loss


def test_poisoned_rows_draw_token_ids_from_their_own_range():
  rng = np.random.default_rng(0)
  batch = {'tokens': np.arange(3, 43, dtype=np.int32).reshape(8, 5),
           'weights': np.ones((8, 4), np.float32),
           'x': rng.standard_normal((8, 3)).astype(np.float32)}
  plan = {0: faults.Fault('poisoned_rows', 0.5),
          1: faults.Fault('poisoned_rows', 0.5)}

  def poisoned():
    return list(faults.FaultInjector(iter([batch, batch]), plan))

  first, second = poisoned()
  for out in (first, second):
    tokens = out['tokens']
    assert tokens.dtype == np.int32
    # round(0.5 * 8) = 4 rows of uniform ids in the array's range [3, 42].
    assert (tokens[:4] != batch['tokens'][:4]).mean() > 0.8
    assert tokens.min() >= 3 and tokens.max() <= 42
    np.testing.assert_array_equal(tokens[4:], batch['tokens'][4:])
    # Unit loss weights have no spread: left as they are, not zeroed.
    np.testing.assert_array_equal(out['weights'], batch['weights'])
    assert (out['x'][:4] != batch['x'][:4]).all()
    np.testing.assert_array_equal(out['x'][4:], batch['x'][4:])
  # Seeded by the batch index: the same batch index, the same rows.
  assert (first['tokens'][:4] != second['tokens'][:4]).any()
  np.testing.assert_array_equal(poisoned()[1]['tokens'], second['tokens'])
