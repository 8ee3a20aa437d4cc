"""Attribution by re-run in og.fit (RecoveryPolicy(rerun=True)), issue 25.

A step the guard skips runs again on the same inputs: a clean re-run is a
transient fault (applied, so the run ends as a fault-free one, bit for bit),
a re-run that repeats every metric is a bad batch (recorded, dropped when a
restart draws it again), another failure is nondeterministic. Steps that are
not skipped run once.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard import testing
from optax_guard.host import attribution
from optax_guard.host.fit import (
  BadBatch,
  DroppedBadBatch,
  NondeterministicFault,
  SkippedStep,
  TransientFault,
)

DATA = testing.regression_data(seed=0, num_examples=256)


def _tx():
  return og.guard(optax.adam(1e-2), spikes={'window': 16})


def _init(tx):
  params = testing.mlp_init(jax.random.key(0), [8, 16, 1])
  return og.TrainState(0, params, tx.init(params))


class _Counted:
  """The train step, counting its calls (``og.fit`` passes arrays)."""

  def __init__(self, step):
    self.step = step
    self.calls = 0

  def __call__(self, *args):
    self.calls += 1
    return self.step(*args)


def _fit(tmp_path, name, *, flaky=None, plan=None, num_steps=20, rerun=True,
         save_interval_steps=5, **kwargs):
  tx = _tx()
  loss = testing.with_faults(testing.mse)
  if flaky is not None:
    loss = flaky.wrap(loss)
  step = _Counted(og.make_train_step(loss, tx))
  data = testing.FaultInjector(og.batches(DATA, 32), plan or {}, keys='step')
  events = []
  with og.Checkpointer(tmp_path / name,
                       save_interval_steps=save_interval_steps) as ckpt:
    result = og.fit(
        step, _init(tx), data, num_steps=num_steps, checkpointer=ckpt,
        recovery=og.RecoveryPolicy(rerun=rerun), progress=False,
        callback=lambda s, m, e: events.extend(e), **kwargs)
  return result, events, step.calls


def _of(events, kind):
  return [e for e in events if isinstance(e, kind)]


def _assert_same_bits(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_no_extra_step_when_nothing_is_skipped(tmp_path):
  result, events, calls = _fit(tmp_path, 'clean')
  assert calls == 20 == result.state.step
  assert not [e for e in events if e.kind in (
      'transient_fault', 'bad_batch', 'nondeterministic_fault',
      'skipped_step')]
  assert not (tmp_path / 'clean' / attribution.BAD_BATCHES).exists()


def test_transient_fault_is_rerun_applied_and_leaves_the_clean_bits(tmp_path):
  # The reference compiles the same step: an unarmed device.
  clean, _, _ = _fit(tmp_path, 'clean', flaky=testing.FlakyDevice({}),
                     rerun=False)
  flaky = testing.FlakyDevice({7: testing.Fault('nan_grad')})
  result, events, calls = _fit(tmp_path, 'flaky', flaky=flaky)
  assert calls == 21 and flaky.calls == 21  # one re-run, at step 7
  (transient,) = _of(events, TransientFault)
  assert transient.step == 7 and transient.reason == 'nonfinite'
  assert np.isnan(transient.first['grad_norm'])
  assert np.isfinite(transient.second['grad_norm'])
  assert transient.first['loss'] == transient.second['loss']  # same forward
  assert not _of(events, SkippedStep)  # the batch was not lost
  # The re-run started from the first run's inputs: everything, the guard's
  # counters and statistics included, ends as in the fault-free run.
  _assert_same_bits(result.state.params, clean.state.params)
  _assert_same_bits(result.state.opt_state, clean.state.opt_state)
  assert result.events.counts['transient_fault'] == 1


def test_transient_spike_is_rerun_too(tmp_path):
  clean, _, _ = _fit(tmp_path, 'clean', flaky=testing.FlakyDevice({}),
                     rerun=False, num_steps=30)
  flaky = testing.FlakyDevice({25: testing.Fault('grad_spike', 1e4)})
  result, events, calls = _fit(tmp_path, 'spike', flaky=flaky, num_steps=30)
  (transient,) = _of(events, TransientFault)
  assert (transient.step, transient.reason, calls) == (25, 'spike', 31)
  assert transient.first['grad_norm'] == pytest.approx(
      1e4 * transient.second['grad_norm'], rel=1e-5)
  _assert_same_bits(result.state.params, clean.state.params)


def test_rerun_of_a_skipped_step_sees_the_first_runs_inputs():
  # Step level, donated buffers: snapshot, a skipped first run, the re-run
  # from rerun_inputs; against the same step, clean, on a copy of the state.
  tx = _tx()
  flaky = testing.FlakyDevice({2: testing.Fault('inf_grad')})
  step = og.make_train_step(flaky.wrap(testing.mse), tx)
  batches = [{k: v[i * 32:(i + 1) * 32] for k, v in DATA.items()}
             for i in range(2)]
  state = _init(tx)
  params, opt_state, _ = step(state.params, state.opt_state, batches[0])
  state = state._replace(step=1, params=params, opt_state=opt_state)
  copy = jax.tree.map(jnp.copy, state)
  saved = attribution.snapshot(state)
  params, opt_state, first = step(state.params, state.opt_state, batches[1])
  assert bool(first['skipped'])
  skipped = state._replace(step=2, params=params, opt_state=opt_state)
  inputs = attribution.rerun_inputs(saved, skipped)
  assert inputs.step == 1
  _assert_same_bits(inputs, copy)
  again = step(inputs.params, inputs.opt_state, batches[1])  # call 3: clean
  reference = step(copy.params, copy.opt_state, batches[1])  # call 4: clean
  assert not bool(again[2]['skipped'])
  _assert_same_bits(again, reference)


def test_nan_batch_is_a_bad_batch_recorded_beside_the_checkpoints(tmp_path):
  plan = {7: testing.Fault('nan_batch')}
  result, events, calls = _fit(tmp_path, 'bad', plan=plan, log_dir=tmp_path
                               / 'logs')
  assert calls == 21
  (bad,) = _of(events, BadBatch)
  assert (bad.step, bad.index, bad.reason) == (7, 6, 'nonfinite')
  assert bad.data_state == {'data': {'next_index': 7}, 'index': 7}
  assert len(bad.digest) == 64
  assert [e.step for e in _of(events, SkippedStep)] == [7]
  records = attribution.read(tmp_path / 'bad' / attribution.BAD_BATCHES)
  assert [(r['kind'], r['step'], r['index'], r['digest']) for r in records] \
      == [('bad_batch', 7, 6, bad.digest)]
  # Strict JSON: the NaN loss is the string "nan".
  assert records[0]['loss'] == 'nan'
  lines = (tmp_path / 'logs' / 'events.jsonl').read_text().splitlines()
  kinds = [json.loads(line, parse_constant=pytest.fail)['kind']
           for line in lines]
  assert kinds.count('bad_batch') == 1
  assert result.events.counts['bad_batch'] == 1


def test_restart_drops_a_recorded_bad_batch_without_a_step(tmp_path):
  plan = {7: testing.Fault('nan_batch')}
  whole, _, _ = _fit(tmp_path, 'whole', plan=plan, num_steps=12)
  # The same run killed after step 9: its newest checkpoint is step 5, and
  # the bad batch of step 7 was recorded.
  _fit(tmp_path, 'killed', plan=plan, num_steps=9)
  shutil.rmtree(tmp_path / 'killed' / '9')
  resumed, events, calls = _fit(tmp_path, 'killed', plan=plan, num_steps=12)
  (dropped,) = _of(events, DroppedBadBatch)
  (record,) = attribution.read(tmp_path / 'killed' / attribution.BAD_BATCHES)
  assert (dropped.step, dropped.index, dropped.digest) == (
      7, 6, record['digest'])
  assert calls == 12 - 5 - 1  # steps 6 to 12, none for the dropped batch
  assert not _of(events, BadBatch) and not _of(events, SkippedStep)
  assert resumed.state.step == 12
  # Params and the inner optimizer state are those of the uninterrupted run
  # (its skipped step held them); only the guard's skip count differs.
  _assert_same_bits(resumed.state.params, whole.state.params)
  _assert_same_bits(resumed.state.opt_state.inner_state,
                    whole.state.opt_state.inner_state)
  assert int(og.metrics(whole.state.opt_state)['total_skips']) == 1
  assert int(og.metrics(resumed.state.opt_state)['total_skips']) == 0


def test_a_changed_batch_at_a_recorded_position_is_trained_on(tmp_path,
                                                              caplog):
  _fit(tmp_path, 'run', plan={7: testing.Fault('nan_batch')}, num_steps=9)
  shutil.rmtree(tmp_path / 'run' / '9')
  _, events, calls = _fit(tmp_path, 'run', num_steps=12)  # no fault now
  assert not _of(events, DroppedBadBatch) and calls == 7
  assert 'recorded as bad (step 7) but its content differs' in caplog.text


def test_a_rerun_that_fails_differently_is_nondeterministic(tmp_path):
  flaky = testing.FlakyDevice({7: testing.Fault('nan_grad'),
                               8: testing.Fault('inf_grad')})
  result, events, calls = _fit(tmp_path, 'nondet', flaky=flaky)
  (event,) = _of(events, NondeterministicFault)
  assert (event.step, event.reason, calls) == (7, 'nonfinite', 21)
  assert np.isnan(event.first['grad_norm'])
  assert event.second['grad_norm'] == np.inf
  assert [e.step for e in _of(events, SkippedStep)] == [7]
  assert not _of(events, BadBatch)
  assert int(og.metrics(result.state.opt_state)['total_skips']) == 1


def test_rerun_is_checked_at_construction_and_needs_a_guard(tmp_path):
  with pytest.raises(TypeError, match='rerun must be True or False'):
    og.RecoveryPolicy(rerun='yes')
  tx = optax.adam(1e-2)
  params = testing.mlp_init(jax.random.key(0), [8, 16, 1])
  with og.Checkpointer(tmp_path / 'c') as ckpt, pytest.raises(
      ValueError, match='holds no guard'):
    og.fit(og.make_train_step(testing.mse, tx),
           og.TrainState(0, params, tx.init(params)), og.batches(DATA, 32),
           num_steps=2, checkpointer=ckpt,
           recovery=og.RecoveryPolicy(rerun=True), progress=False)


def test_flaky_device_leaves_no_callback_in_the_step_when_disabled():
  tx = _tx()
  state = _init(tx)
  batch = {k: v[:32] for k, v in DATA.items()}

  def hlo(plan):
    step = og.make_train_step(testing.FlakyDevice(plan).wrap(testing.mse), tx)
    return step.lower(state.params, state.opt_state, batch).as_text()

  assert 'callback' not in hlo(None)
  assert 'callback' in hlo({})
  with pytest.raises(ValueError, match='data faults go through'):
    testing.FlakyDevice({1: testing.Fault('nan_batch')})
  with pytest.raises(ValueError, match='counted from 1'):
    testing.FlakyDevice({0: testing.Fault('nan_grad')})
  with pytest.raises(ValueError, match='disabled'):
    testing.FlakyDevice(None).arm(testing.Fault('nan_grad'), 1)


def test_inspect_shows_the_verdicts_and_the_bad_batches(tmp_path, capsys):
  from optax_guard import cli  # pylint: disable=g-import-not-at-top

  flaky = testing.FlakyDevice({4: testing.Fault('nan_grad')})
  _, events, _ = _fit(tmp_path, 'run', flaky=flaky, num_steps=12,
                      plan={9: testing.Fault('nan_batch')})
  (bad,) = _of(events, BadBatch)
  capsys.readouterr()
  assert cli.main(['inspect', str(tmp_path / 'run')]) == 0
  out = capsys.readouterr().out
  assert ('Re-run verdicts up to step 12: transient 1, bad batch 1,'
          ' nondeterministic 0') in out
  assert f'batch 8 (step 9, nonfinite) sha256 {bad.digest[:16]}' in out


def test_the_campaign_classifies_every_fault_on_the_demo_model():
  from benchmarks import attribution as campaign  # pylint: disable=g-import-not-at-top

  counts = {kind: 2 for kind in campaign.KINDS}
  results = campaign.campaign(steps=50, batch_size=8, seq_len=16, width=32,
                              seed=0, counts=counts, first_step=26,
                              say=lambda line: None)
  assert results['misclassified_steps'] == []
  assert results['verdicts_on_clean_steps'] == {}
  assert results['clean_batches_lost_to_transient_faults'] == 0
  assert results['fault_free_step_calls'] == results['fault_free_steps'] == 50
  # The 4 corrupt batches are inserted among the 50 clean ones.
  assert results['faulty_steps'] == 54
  assert results['faulty_step_calls'] == 54 + 10  # one re-run per fault
  # Every clean batch is trained on but the 2 of nondeterministic faults.
  assert results['fault_free_updates'] == 50
  assert results['faulty_updates'] == 50 - 2
  assert {kind: dict(row) for kind, row in results['table'].items()} == {
      kind: {campaign.EXPECTED[kind]: 2} for kind in campaign.KINDS}


def _key_data(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


def test_an_nnx_models_rerun_draws_the_same_dropout_masks(tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.hidden = nnx.Linear(8, 16, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)
      self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(self.dropout(jnp.tanh(self.hidden(x))))

  def run(name, plan):
    model = Model(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, og.guard(optax.adam(1e-2)),
                              wrt=nnx.Param)
    loss = testing.FlakyDevice(plan).wrap(
        lambda m, b: jnp.mean((m(b['x']) - b['y']) ** 2))
    step, state = og.nnx_fit_step(loss, model, optimizer)
    with og.Checkpointer(tmp_path / name) as ckpt:
      return og.fit(step, state, og.batches(DATA, 32), num_steps=10,
                    checkpointer=ckpt, recovery=og.RecoveryPolicy(rerun=True),
                    progress=False)

  # The same compiled step (an unarmed device) is the reference.
  clean = run('clean', {})
  flaky = run('flaky', {4: testing.Fault('nan_grad')})
  assert dict(flaky.events.counts) == {'transient_fault': 1}
  # The dropout RNG stream lives in the model state: the re-run drew the
  # masks of the first run, and the run ends as the fault-free one.
  _assert_same_bits(jax.tree.map(_key_data, flaky.state[1:]),
                    jax.tree.map(_key_data, clean.state[1:]))
