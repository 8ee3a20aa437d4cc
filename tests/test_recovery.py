"""Recovery: divergence detection, rollback to the last good checkpoint."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard.host.recovery import Recovery
from optax_guard import testing as faults

LR = 0.05
TX = og.guard(
    optax.inject_hyperparams(optax.adam)(learning_rate=LR),
    max_consecutive_skips=3,
)


def loss_fn(params, batch):
  prediction = jnp.tanh(batch['x'] @ params['w']) @ params['v']
  return jnp.mean((prediction - batch['y']) ** 2)


@pytest.fixture(scope='module')
def train_step():
  return og.make_train_step(faults.with_faults(loss_fn), TX)


def make_data(plan=None):
  arrays = faults.regression_data(seed=1, num_examples=256)
  return faults.FaultInjector(og.batches(arrays, 16, seed=1),
                              plan or {})


def make_init():
  key1, key2 = jax.random.split(jax.random.key(0))
  params = {'w': jax.random.normal(key1, (8, 8)) / 3,
            'v': jax.random.normal(key2, (8, 1)) / 3}
  return og.TrainState(0, params, TX.init(params))


def train(step_fn, state, data, steps):
  for _ in range(steps):
    params, opt_state, _ = step_fn(state.params, state.opt_state, next(data))
    state = state._replace(step=state.step + 1, params=params,
                           opt_state=opt_state)
  return state


def host(tree):
  return jax.tree.map(np.asarray, tree)


def learning_rate(opt_state):
  return float(opt_state.inner_state.hyperparams['learning_rate'])


@pytest.mark.parametrize('field, value', [
    ('max_rollbacks', -1), ('loss_factor', 1.0), ('loss_patience', 0),
    ('loss_ema_decay', 1.0), ('loss_warmup_steps', -2), ('lr_backoff', 0.0),
    ('lr_backoff', 1.5), ('skip_extra_batches', -1), ('confirm_steps', -1),
    ('healthy_loss_sigma', 0.0),
])
def test_policy_rejects_bad_values(field, value):
  with pytest.raises(ValueError, match=field):
    og.RecoveryPolicy(**{field: value})


def observe(recovery, step, loss, skipped=False, consecutive=0,
            diverged=False):
  return recovery.observe(step, {
      'loss': loss, 'skipped': skipped, 'consecutive_skips': consecutive,
      'diverged': diverged,
  })


def test_guard_divergence_is_a_reason():
  recovery = Recovery()
  assert observe(recovery, 4, 1.0, skipped=True, consecutive=2) is None
  assert not recovery.healthy
  reason = observe(recovery, 5, 1.0, skipped=True, consecutive=3,
                   diverged=True)
  assert reason == 'guard diverged at step 5 after 3 consecutive skipped steps'
  assert observe(recovery, 6, 1.0) is None and recovery.healthy


def test_loss_above_its_moving_average_is_a_reason():
  recovery = Recovery(og.RecoveryPolicy(
      loss_factor=3.0, loss_patience=3, loss_warmup_steps=4,
      loss_ema_decay=0.5,
  ))
  for step in range(1, 5):  # warm-up: not armed, only non-finite is high
    assert observe(recovery, step, 10.0 if step == 2 else 1.0) is None
  assert recovery.loss_ema == 2.125  # 1, then 5.5, 3.25, 2.125
  recovery = Recovery(og.RecoveryPolicy(
      loss_factor=3.0, loss_patience=3, loss_warmup_steps=4,
      loss_ema_decay=0.5,
  ))
  for step in range(1, 5):
    observe(recovery, step, 1.0)
  assert recovery.loss_ema == 1.0 and recovery.healthy
  # An accepted high loss enters the average too; a non-finite or skipped
  # one does not; a normal one resets the streak.
  assert observe(recovery, 5, 4.0) is None  # 4 > 3 x 1: high
  assert recovery.loss_ema == 2.5
  assert observe(recovery, 6, float('nan')) is None
  assert not recovery.healthy and recovery.loss_ema == 2.5
  assert observe(recovery, 7, 2.0, skipped=True) is None  # not high, skipped
  assert recovery.healthy and recovery.loss_ema == 2.5
  # A loss that doubles every step outruns its average: three high in a row.
  assert observe(recovery, 8, 8.0) is None  # 8 > 7.5; the average 5.25
  assert observe(recovery, 9, 16.0) is None  # 16 > 15.75; 10.625
  assert observe(recovery, 10, 32.0) == (
      'loss 32 stayed above 3x its moving average 10.62 for 3 steps'
  )


def test_a_level_shift_is_absorbed_by_the_average():
  # A permanent jump stays above loss_factor x the average for at most
  # ln(1 - 1 / loss_factor) / ln(loss_ema_decay) steps: here 0.58, one step.
  recovery = Recovery(og.RecoveryPolicy(
      loss_factor=3.0, loss_patience=2, loss_warmup_steps=4,
      loss_ema_decay=0.5,
  ))
  for step in range(1, 5):
    observe(recovery, step, 1.0)
  reasons = [observe(recovery, step, 100.0) for step in range(5, 30)]
  assert reasons == [None] * 25
  assert recovery.loss_ema == pytest.approx(100.0)


def test_a_checkpoint_is_confirmed_by_healthy_steps_after_it():
  recovery = Recovery(og.RecoveryPolicy(
      confirm_steps=3, loss_warmup_steps=4, loss_ema_decay=0.5))
  # Once armed (step 5), the band is EMA + max(3 std, 1% of the EMA).
  losses = {5: 1.005, 9: 9.0}
  for step in range(1, 16):
    observe(recovery, step, losses.get(step, 1.0), skipped=step == 12)
  confirmed = [s for s in range(16) if recovery.is_confirmed(s)]
  # Runs of healthy steps: 1..8, 10..15 (a skipped step continues a run).
  # Step s needs s..s+3 healthy.
  assert confirmed == [0, 1, 2, 3, 4, 5, 10, 11, 12]
  restored = Recovery(recovery.policy)
  restored.load_state_dict(json.loads(json.dumps(recovery.state_dict())))
  assert [s for s in range(16) if restored.is_confirmed(s)] == confirmed


def test_the_skips_of_a_divergence_confirm_nothing():
  recovery = Recovery(og.RecoveryPolicy(confirm_steps=3))
  for step in range(1, 8):
    observe(recovery, step, 1.0)
  # Skips at 8 and 9 continue the run: step 6 is confirmed (6..9) ...
  observe(recovery, 8, 1.0, skipped=True, consecutive=1)
  observe(recovery, 9, 1.0, skipped=True, consecutive=2)
  assert recovery.is_confirmed(6)
  # ... until the streak diverges at step 10: the run ends at step 7 again.
  reason = observe(recovery, 10, float('nan'), skipped=True, consecutive=3,
                   diverged=True)
  assert reason.startswith('guard diverged at step 10')
  assert [s for s in range(11) if recovery.is_confirmed(s)] == [0, 1, 2, 3, 4]


def test_rollback_passes_over_an_unconfirmed_save(tmp_path, train_step):
  data = make_data()
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    recovery = Recovery(og.RecoveryPolicy(confirm_steps=5), ckpt)
    state = make_init()
    for _ in range(22):
      params, opt_state, metrics = train_step(state.params, state.opt_state,
                                              next(data))
      state = state._replace(step=state.step + 1, params=params,
                             opt_state=opt_state)
      assert recovery.observe(state.step, metrics) is None
      if state.step in (10, 20):  # 20 is followed by 2 healthy steps only
        ckpt.save(state, healthy=recovery.healthy,
                  events={'recovery': recovery.state_dict()})
        saved_ema = recovery.loss_ema if state.step == 10 else saved_ema
        good = host(state) if state.step == 10 else good
    ckpt.wait_until_finished()
    assert ckpt.is_healthy(20) and not recovery.is_confirmed(20)
    rolled = recovery.rollback(state, 'diverged')
  assert rolled.step == 22 and recovery.rollbacks[0]['to_step'] == 10
  np.testing.assert_array_equal(rolled.params['w'], good.params['w'])
  # The loss statistics are those of step 10; the restored state counts as
  # confirmed (fit saves it at once).
  assert recovery.loss_ema == saved_ema and recovery.is_confirmed(22)


def test_retention_keeps_the_newest_confirmed_checkpoint(tmp_path):
  # max_to_keep=1 and no "last good" policy: only the targets Recovery names
  # (Checkpointer.keep_steps) keep step 4 (confirmed by steps 4..7) once the
  # loss leaves the healthy band from step 8 on and steps 8..12 are saved.
  state = make_init()
  with og.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1,
                       keep_last_good=False, async_save=False) as ckpt:
    recovery = Recovery(og.RecoveryPolicy(
        confirm_steps=3, loss_warmup_steps=4, loss_ema_decay=0.5), ckpt)
    for step in range(1, 13):
      observe(recovery, step, 9.0 if step >= 8 else 1.0)
      if step % 4 == 0 or step >= 8:
        ckpt.save(state._replace(step=step), healthy=recovery.healthy)
    assert recovery.is_confirmed(4) and not recovery.is_confirmed(8)
    assert ckpt.all_steps() == [4, 12]
    assert recovery.rollback(state._replace(step=12), 'diverged').step == 12
  assert recovery.rollbacks[0]['to_step'] == 4


def test_rollback_restores_last_good_and_skips_the_window(tmp_path,
                                                         train_step):
  data = make_data()
  policy = og.RecoveryPolicy(lr_backoff=0.5, skip_extra_batches=2)
  with og.Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
    state = train(train_step, make_init(), data, 10)
    ckpt.save(state, data_iter=data, healthy=True)
    good = host(state)
    state = train(train_step, state, data, 10)
    ckpt.save(state, data_iter=data, healthy=False)
    state = train(train_step, state, data, 3)
    position = data.get_state()
    recovery = Recovery(policy, ckpt)
    rolled = recovery.rollback(state, 'loss blew up', data_iter=data)
  assert rolled.step == 23 + 2
  assert jax.tree.structure(rolled.opt_state) == jax.tree.structure(
      state.opt_state)
  np.testing.assert_array_equal(rolled.params['w'], good.params['w'])
  np.testing.assert_array_equal(
      rolled.opt_state.inner_state.inner_state[0].mu['v'],
      good.opt_state.inner_state.inner_state[0].mu['v'])
  assert learning_rate(rolled.opt_state) == np.float32(LR) * np.float32(0.5)
  # The iterator was not rewound: the window 10..22 is skipped, plus two.
  assert data.get_state()['index'] == position['index'] + 2
  (record,) = recovery.rollbacks
  assert {k: record[k] for k in ('step', 'to_step', 'reason',
                                 'skipped_batches')} == {
      'step': 23, 'to_step': 10, 'reason': 'loss blew up',
      'skipped_batches': 15}


def test_gives_up_after_max_rollbacks_with_a_report(tmp_path):
  init = make_init()
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(init._replace(step=1))
    recovery = Recovery(og.RecoveryPolicy(max_rollbacks=1), ckpt)
    recovery.rollback(init._replace(step=5), 'first')
    # A step whose gradient is NaN in 'v' only.
    grads = {'w': jnp.full((8, 8), 0.5), 'v': jnp.full((8, 1), jnp.nan)}
    _, opt_state = TX.update(grads, init.opt_state, init.params)
    with pytest.raises(og.TrainingDiverged) as caught:
      recovery.rollback(init._replace(step=9, opt_state=opt_state), 'again',
                        metrics={'loss': jnp.float32(7.0)})
  report = caught.value.report
  assert report.step == 9
  assert report.reason == 'again (after 1 rollbacks, the maximum)'
  assert [r['reason'] for r in report.rollbacks] == ['first']
  assert report.worst_leaves[0][0] == "['v']"
  assert np.isnan(report.worst_leaves[0][1])
  assert report.worst_leaves[1] == ("['w']", pytest.approx(4.0))
  assert report.metrics == {'loss': 7.0}
  text = str(caught.value)
  assert 'Training diverged at step 9' in text
  assert 'rollback at step 5 to step 1 (first)' in text
  assert "['v']: nan" in text


def test_no_healthy_checkpoint_means_giving_up(tmp_path):
  init = make_init()
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(init._replace(step=1), healthy=False)
    with pytest.raises(og.TrainingDiverged, match='no healthy checkpoint'):
      Recovery(og.RecoveryPolicy(), ckpt).rollback(init, 'why')


def test_scale_hyperparam_finds_the_learning_rate_anywhere():
  params = {'w': jnp.ones(2)}
  tx = optax.chain(
      og.guard(optax.inject_hyperparams(optax.sgd)(learning_rate=0.3)),
      optax.inject_hyperparams(optax.scale)(step_size=2.0),
  )
  state = og.scale_hyperparam(tx.init(params), 0.5)
  assert float(state[0].inner_state.hyperparams['learning_rate']) == (
      np.float32(0.3) * np.float32(0.5))
  state = og.scale_hyperparam(state, 0.25, 'step_size')
  assert float(state[1].hyperparams['step_size']) == 0.5
  with pytest.raises(ValueError, match='No hyperparameter .momentum.'):
    og.scale_hyperparam(state, 0.5, 'momentum')
  scheduled = optax.inject_hyperparams(optax.sgd)(
      learning_rate=optax.linear_schedule(1.0, 0.0, 10))
  with pytest.raises(ValueError, match='schedule'):
    og.scale_hyperparam(scheduled.init(params), 0.5)


def test_fit_rolls_back_a_nan_burst(tmp_path, train_step):
  # Four NaN gradients in a row after step 25: the guard raises diverged at
  # the third; fit rolls back to the newest confirmed checkpoint: step 10
  # (step 20 was followed by 5 healthy steps only, fewer than confirm_steps).
  plan = {i: faults.Fault('nan_grad') for i in range(25, 29)}
  data = make_data(plan)
  with og.Checkpointer(tmp_path / 'ckpt', save_interval_steps=10) as ckpt:
    result = og.fit(
        train_step, make_init(), data, num_steps=40, checkpointer=ckpt,
        recovery=og.RecoveryPolicy(lr_backoff=0.5), progress=False,
        handle_preemption=False, log_dir=tmp_path / 'logs', tensorboard=False,
    )
    (record,) = result.recovery.rollbacks
    assert (record['step'], record['to_step'], record['skipped_batches']) == (
        28, 10, 18)
    # The rolled-back state was saved at once, as a healthy checkpoint.
    assert 28 in ckpt.all_steps() and ckpt.is_healthy(28)
  assert result.events.counts['rollback'] == 1
  assert result.events.counts['skipped_step'] == 4  # 26, 27, 28 and 29
  with open(tmp_path / 'logs' / 'events.jsonl') as f:
    logged = [json.loads(line) for line in f]
  assert [(e['kind'], e['step']) for e in logged] == [
      ('skipped_step', 26), ('skipped_step', 27), ('skipped_step', 28),
      ('rollback', 28), ('skipped_step', 29)]
  assert logged[3]['to_step'] == 10 and logged[3]['skipped_batches'] == 18
  assert logged[3]['worst_leaves'][0][0] in ("['v']", "['w']")
  assert learning_rate(result.state.opt_state) == np.float32(LR) * 0.5
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(
      result.state.params))


@pytest.mark.parametrize('loss_factor, rollbacks', [(None, 0), (3.0, 1)])
def test_fit_rolls_back_a_loss_blow_up(tmp_path, train_step, loss_factor,
                                       rollbacks):
  # Batches 30..35 (steps 31..36) carry data scaled by 10: the loss jumps
  # from about 0.1 to 18..48 but stays finite, and this guard has no spike
  # check, so only the loss rule sees it: at step 34, the fourth loss in a
  # row above 3x the average (which these losses raise, from 0.97 to 2.08;
  # at scale 5 the third, 3.26, fell below 3x 1.11).
  plan = {i: faults.Fault('poisoned_batch', 10.0) for i in range(30, 36)}
  with og.Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
    result = og.fit(
        train_step, make_init(), make_data(plan), num_steps=45,
        checkpointer=ckpt, progress=False, handle_preemption=False,
        recovery=og.RecoveryPolicy(loss_factor=loss_factor, loss_patience=4),
    )
  assert len(result.recovery.rollbacks) == rollbacks
  if rollbacks:
    (record,) = result.recovery.rollbacks
    # Step 30 was saved one step before the blow-up: never confirmed.
    assert record['step'] == 34 and record['to_step'] == 20
    assert record['reason'].startswith('loss ')


def test_the_report_names_parameters_an_update_made_nonfinite(tmp_path):
  init = make_init()
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    recovery = Recovery(og.RecoveryPolicy(max_rollbacks=1), ckpt)
    params = {**init.params, 'w': init.params['w'].at[0, 0].set(jnp.inf)}
    with pytest.raises(og.TrainingDiverged) as caught:
      recovery.rollback(init._replace(step=3, params=params), 'diverged')
  assert caught.value.report.nonfinite_params == ["['w']"]
  assert ("non-finite parameters (an update, not a gradient, made them so:"
          " og.guard skips such steps unless check_updates=False): ['w']"
          in str(caught.value))
