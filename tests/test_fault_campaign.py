"""Fault injection (og.testing) and the seeded fault campaign (benchmarks/)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from benchmarks.faults import CAMPAIGN_KINDS, run_fault_campaign
from optax_guard import testing as faults


@pytest.fixture(scope='module')
def campaign():
  return run_fault_campaign(
      seed=0, num_steps=160, num_faults=16, bursts=1, save_interval_steps=20
  )


def test_guarded_campaign_survives_every_fault(campaign):
  print(campaign)
  assert sum(campaign.injected.values()) == 16 + 6  # singles + one burst
  assert all(campaign.injected[kind] > 0 for kind in CAMPAIGN_KINDS)
  assert campaign.params_always_finite
  # Every fault was skipped or clipped, the burst was rolled back, and the
  # model ends as good as the fault-free one on the same data.
  assert campaign.skipped_steps >= 16
  assert campaign.rollbacks == 1 and campaign.skipped_batches > 0
  assert campaign.relative_gap < 0.05


def test_unguarded_campaign_is_wrecked():
  baseline = run_fault_campaign(
      seed=0, num_steps=40, num_faults=3, bursts=0, kinds=['nan_grad'],
      guarded=False,
  )
  assert not baseline.params_always_finite
  assert baseline.skipped_steps == 0 and baseline.rollbacks == 0


def test_plan_is_seeded_and_bursts_are_consecutive():
  plan = faults.plan_faults(100, 10, seed=3, first_step=5, bursts=2,
                            burst_length=4)
  assert plan == faults.plan_faults(100, 10, seed=3, first_step=5, bursts=2,
                                    burst_length=4)
  assert plan != faults.plan_faults(100, 10, seed=4, first_step=5, bursts=2,
                                    burst_length=4)
  assert len(plan) == 10 + 2 * 4 and min(plan) >= 5 and max(plan) < 100
  for fault in plan.values():
    assert fault.kind in faults.KINDS
    if fault.kind in ('grad_spike', 'poisoned_batch'):
      assert 1e3 <= fault.scale <= 1e6
  nan_steps = sorted(s for s, f in plan.items() if f.kind == 'nan_grad')
  runs = np.split(nan_steps, np.where(np.diff(nan_steps) != 1)[0] + 1)
  assert sum(len(r) >= 4 for r in runs) == 2
  with pytest.raises(ValueError, match='kinds'):
    faults.plan_faults(10, 1, kinds=['meteor'])
  with pytest.raises(ValueError, match='cannot place'):
    faults.plan_faults(10, 20)


@pytest.mark.parametrize('kind, scale, expected_grad, loss_is_nan', [
    ('none', 1.0, [2.0, 4.0], False),
    ('grad_spike', 1e4, [2e4, 4e4], False),
    ('nan_grad', 1.0, [np.nan, np.nan], False),
    ('inf_grad', 1.0, [np.inf, np.inf], False),
    ('nan_loss', 1.0, [2.0, 4.0], True),
])
def test_gradient_and_loss_faults(kind, scale, expected_grad, loss_is_nan):
  loss_fn = faults.with_faults(lambda p, b: jnp.sum(p * b['x']))
  batch = next(faults.FaultInjector(
      iter([{'x': np.array([2.0, 4.0], np.float32)}]),
      {} if kind == 'none' else {0: faults.Fault(kind, scale)},
  ))
  loss, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.ones(2), batch)
  np.testing.assert_array_equal(grad, np.float32(expected_grad))
  assert bool(jnp.isnan(loss)) == loss_is_nan
  if not loss_is_nan:
    assert float(loss) == 6.0


def test_poisoned_batch_scales_float_data_only():
  data = iter([{'x': np.ones(3, np.float32), 'label': np.arange(3)}])
  batch = next(faults.FaultInjector(data, {0: faults.Fault('poisoned_batch',
                                                           1e3)}))
  np.testing.assert_array_equal(batch['x'], np.full(3, 1e3, np.float32))
  np.testing.assert_array_equal(batch['label'], np.arange(3))
  assert int(batch['fault_kind']) == 5


def test_injector_state_resumes_batches_and_counts():
  arrays = {'x': np.arange(40, dtype=np.float32)}
  plan = faults.plan_faults(30, 6, seed=1)
  first = faults.FaultInjector(og.batches(arrays, 4, seed=2), plan)
  for _ in range(11):
    next(first)
  state = first.get_state()
  expected = [next(first) for _ in range(10)]
  second = faults.FaultInjector(og.batches(arrays, 4, seed=2), plan)
  second.set_state(state)
  for want in expected:
    got = next(second)
    for name in want:
      np.testing.assert_array_equal(got[name], want[name])
  assert first.injected() == second.injected()
  assert sum(second.injected().values()) == sum(s < 21 for s in plan)


def test_nan_batch_makes_the_float_arrays_nan_and_the_step_skip():
  data = iter([{'x': np.ones((4, 2), np.float32),
                'y': np.zeros((4, 1), np.float32),
                'label': np.arange(4)}])
  batch = next(faults.FaultInjector(data, {0: faults.Fault('nan_batch')}))
  assert batch['x'].dtype == np.float32 and np.isnan(batch['x']).all()
  assert np.isnan(batch['y']).all()
  np.testing.assert_array_equal(batch['label'], np.arange(4))
  assert int(batch['fault_kind']) == faults.KINDS.index('nan_batch') + 1
  tx = og.guard(optax.sgd(0.1))
  step = og.make_train_step(faults.with_faults(
      lambda p, b: jnp.mean((b['x'] @ p['w'] - b['y']) ** 2)), tx)
  params = {'w': jnp.ones((2, 1))}
  params, _, metrics = step(params, tx.init(params), batch)
  assert bool(metrics['skipped']) and bool(metrics['nonfinite'])
  np.testing.assert_array_equal(params['w'], np.ones((2, 1), np.float32))


def test_nan_batch_needs_a_float_array():
  tokens = iter([{'tokens': np.arange(6).reshape(2, 3)}] * 4)
  injector = faults.FaultInjector(tokens, {3: faults.Fault('nan_batch')})
  for _ in range(3):
    next(injector)
  with pytest.raises(ValueError,
                     match=r'batch index 3 found no float array.*nan_loss'):
    next(injector)


@pytest.mark.parametrize('keys, reported', [('step', 150), ('index', 151)])
def test_a_fault_is_reported_at_the_step_it_is_placed_at(keys, reported):
  """og.fit's step s draws batch index s - 1: keyed by step, a fault placed
  at 150 is skipped at step 150; keyed by batch index, at 151."""
  tx = og.guard(optax.sgd(0.05))
  step = og.make_train_step(faults.with_faults(faults.mse), tx)
  params = faults.mlp_init(jax.random.key(0), [8, 8, 1])
  data = faults.FaultInjector(
      og.batches(faults.regression_data(seed=0, num_examples=64), 16, seed=0),
      {150: faults.Fault('nan_batch')}, keys=keys)
  skipped = []
  result = og.fit(
      step, og.TrainState(0, params, tx.init(params)), data, num_steps=160,
      progress=False, callback=lambda state, metrics, events: skipped.extend(
          e.step for e in events if e.kind == 'skipped_step'))
  assert skipped == [reported]
  assert result.events.counts['skipped_step'] == 1
  assert data.injected()['nan_batch'] == 1


def test_plan_keys_are_checked():
  data = iter([])
  with pytest.raises(ValueError, match="keys must be 'index'.*got 'steps'"):
    faults.FaultInjector(data, {}, keys='steps')
  with pytest.raises(ValueError, match=r"plan key 0 is before the first batch:"
                     r" with keys='step' the first is 1 \(step s draws"):
    faults.FaultInjector(data, {0: faults.Fault('nan_grad')}, keys='step')
  with pytest.raises(ValueError, match="plan key -1 .* the first is 0.$"):
    faults.FaultInjector(data, {-1: faults.Fault('nan_grad')})
