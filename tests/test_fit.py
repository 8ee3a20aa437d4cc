"""The fit loop: logging, progress, preemption, resume."""

import json
import os
import shutil
import signal
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboardX.proto import event_pb2

import optax_guard as og
from optax_guard import testing as faults
from optax_guard.host.fit import Saved
from optax_guard.host.fit import SkippedStep

TX = og.guard(
    optax.inject_hyperparams(optax.adam)(learning_rate=0.05),
    clip=og.clip_by_global_norm(1.0),
    max_consecutive_skips=3,
)
NAN_LOSS_BATCHES = (4, 11)  # batch indices: drawn at steps 5 and 12


def loss_fn(params, batch):
  return jnp.mean((jnp.tanh(batch['x'] @ params['w']) @ params['v']
                   - batch['y']) ** 2)


@pytest.fixture(scope='module')
def train_step():
  return og.make_train_step(faults.with_faults(loss_fn), TX)


def make_data():
  arrays = faults.regression_data(seed=2, num_examples=256)
  plan = {i: faults.Fault('nan_loss') for i in NAN_LOSS_BATCHES}
  return faults.FaultInjector(og.batches(arrays, 16, seed=2), plan)


def make_init():
  key1, key2 = jax.random.split(jax.random.key(3))
  params = {'w': jax.random.normal(key1, (8, 8)) / 3,
            'v': jax.random.normal(key2, (8, 1)) / 3}
  return og.TrainState(0, params, TX.init(params), jax.random.key(4))


def host(tree):
  return jax.tree.map(
      lambda x: np.asarray(jax.random.key_data(x)) if jax.dtypes.issubdtype(
          getattr(x, 'dtype', None), jax.dtypes.prng_key) else np.asarray(x),
      tree)


@pytest.fixture(scope='module')
def uninterrupted(train_step, tmp_path_factory):
  directory = tmp_path_factory.mktemp('uninterrupted')
  with og.Checkpointer(directory, save_interval_steps=5) as ckpt:
    result = og.fit(train_step, make_init(), make_data(), num_steps=20,
                    checkpointer=ckpt, progress=False)
  return host(result.state)


def _no_constants(name):
  raise ValueError(f'{name} is not JSON')


def read_jsonl(path):
  """Strict JSON lines: NaN or Infinity literals fail the test."""
  with open(path) as f:
    return [json.loads(line, parse_constant=_no_constants) for line in f]


def read_tensorboard_scalars(log_dir):
  """Scalars from the event files (TFRecord framing around Event protos)."""
  scalars = {}
  for name in os.listdir(log_dir):
    if not name.startswith('events.out.tfevents'):
      continue
    with open(os.path.join(log_dir, name), 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField('simple_value'):
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_logs_metrics_events_and_tensorboard(tmp_path, train_step):
  log_dir = tmp_path / 'logs'
  result = og.fit(train_step, make_init(), make_data(), num_steps=15,
                  log_dir=log_dir, progress=False)
  records = read_jsonl(log_dir / 'metrics.jsonl')
  assert [r['step'] for r in records] == list(range(1, 16))
  assert {'loss', 'grad_norm', 'update_norm', 'skipped', 'diverged'} <= set(
      records[0])
  skipped = [r['step'] for r in records if r['skipped']]
  assert skipped == [i + 1 for i in NAN_LOSS_BATCHES]
  events = read_jsonl(log_dir / 'events.jsonl')
  assert [(e['kind'], e['step'], e['reason']) for e in events] == [
      ('skipped_step', 5, 'nonfinite'), ('skipped_step', 12, 'nonfinite')]
  assert result.events.counts == {'skipped_step': 2}
  scalars = read_tensorboard_scalars(log_dir)
  finite_steps = [s for s in range(1, 16) if s - 1 not in NAN_LOSS_BATCHES]
  assert sorted(scalars['train/loss']) == finite_steps
  assert scalars['train/loss'][3] == pytest.approx(records[2]['loss'])
  assert scalars['train/skipped'][5] == 1.0
  # The NaN losses: a string in the JSON lines, a count in TensorBoard.
  assert [records[b]['loss'] for b in NAN_LOSS_BATCHES] == ['nan', 'nan']
  assert scalars['nonfinite/loss'] == {5: 1.0, 12: 1.0}


def test_tensorboard_prints_nothing_for_non_finite_values(
    tmp_path, train_step, capfd):
  og.fit(train_step, make_init(), make_data(), num_steps=6,
         log_dir=tmp_path, progress=False)
  captured = capfd.readouterr()
  assert 'NaN or Inf' not in captured.out + captured.err


@pytest.mark.parametrize('async_save', [False, True])
def test_callback_receives_the_steps_events(tmp_path, train_step, async_save):
  seen, committed = [], []

  def callback(state, metrics, events):
    for event in events:
      seen.append((state.step, event))
      if isinstance(event, Saved):  # Issue 21: announced once on disk.
        committed.append((tmp_path / str(event.step)).is_dir())

  with og.Checkpointer(tmp_path, save_interval_steps=5,
                       async_save=async_save) as ckpt:
    og.fit(train_step, make_init(), make_data(), num_steps=12,
           checkpointer=ckpt, progress=False, callback=callback)
  events = [event for _, event in seen]
  assert [(type(e), e.step) for e in events if not isinstance(e, Saved)] == [
      (SkippedStep, 5), (SkippedStep, 12)]
  saved = [(step, e) for step, e in seen if isinstance(e, Saved)]
  # The initial save (a rollback target) comes with the first step at the
  # earliest; a synchronous save with its own step; an async one when a
  # later step finds it committed (step 10's maybe after the last step).
  assert all(committed) and all(step >= max(e.step, 1) for step, e in saved)
  expected = [(0, True), (5, False), (10, True)]
  if async_save:
    assert 2 <= len(saved)
    expected = expected[:len(saved)]
  else:
    assert [step for step, _ in saved] == [1, 5, 10]
  assert [(e.step, e.healthy) for _, e in saved] == expected
  skip = next(e for e in events if isinstance(e, SkippedStep))
  assert skip.reason == 'nonfinite'


def test_plain_progress_lines_when_stderr_is_not_a_terminal(
    capsys, train_step):
  og.fit(train_step, make_init(), make_data(), num_steps=3, progress=True,
         progress_every=0)
  lines = capsys.readouterr().err.splitlines()
  assert [line.split('  ')[0] for line in lines] == [
      'step 1/3 (33%)', 'step 2/3 (66%)', 'step 3/3 (100%)']
  assert all('\r' not in line and 'skips 0' in line for line in lines)


def test_crash_resume_leaves_each_step_once_in_the_logs(tmp_path, train_step):
  log_dir, ckpt_dir = tmp_path / 'logs', tmp_path / 'ckpt'
  with og.Checkpointer(ckpt_dir, save_interval_steps=5) as ckpt:
    og.fit(train_step, make_init(), make_data(), num_steps=14,
           checkpointer=ckpt, log_dir=log_dir, progress=False)
  # A SIGKILL after step 14 was logged but before its save: the newest
  # checkpoint is step 10, and the logs hold steps 11 to 14 already.
  shutil.rmtree(ckpt_dir / '14')
  with open(log_dir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 15, "lo')  # a line torn by the kill
  with og.Checkpointer(ckpt_dir, save_interval_steps=5) as ckpt:
    og.fit(train_step, make_init(), make_data(), num_steps=15,
           checkpointer=ckpt, log_dir=log_dir, progress=False)
  records = read_jsonl(log_dir / 'metrics.jsonl')
  assert [r['step'] for r in records] == list(range(1, 16))
  events = read_jsonl(log_dir / 'events.jsonl')
  assert [(e['kind'], e['step']) for e in events] == [
      ('skipped_step', 5), ('resumed', 10), ('skipped_step', 12)]


class RaisingAt:
  """Batches of ``data`` until the draw of batch ``index`` raises."""

  def __init__(self, data, index, error):
    self.data, self.index, self.error, self.drawn = data, index, error, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.drawn == self.index:
      raise self.error
    self.drawn += 1
    return next(self.data)

  def get_state(self):
    return self.data.get_state()

  def set_state(self, state):
    self.data.set_state(state)


@pytest.mark.parametrize('error, last, healthy', [
    (RuntimeError('disk gone'), 6, True),  # batch 7 (index 6) raises
    (KeyboardInterrupt(), 5, False),  # step 5 was skipped (a NaN loss)
])
def test_an_exception_saves_the_last_completed_step(
    tmp_path, train_step, uninterrupted, caplog, error, last, healthy):
  with og.Checkpointer(tmp_path, save_interval_steps=4) as ckpt:
    with pytest.raises(type(error)):
      og.fit(train_step, make_init(), RaisingAt(make_data(), last, error),
             num_steps=20, checkpointer=ckpt, progress=False)
    assert ckpt.all_steps() == [0, 4, last]
    assert ckpt.is_healthy(last) == healthy
  assert f'after step {last}; saved step {last} in {tmp_path}' in caplog.text
  with og.Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
    result = og.fit(train_step, make_init(), make_data(), num_steps=20,
                    checkpointer=ckpt, progress=False)
  for got, want in zip(jax.tree.leaves(host(result.state)),
                       jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(got, want)


def test_giving_up_saves_the_diverged_step_not_its_donated_input(
    tmp_path, train_step, caplog):
  # main: TrainingDiverged left fit holding the state from before the step,
  # whose buffers the step had consumed: "Buffer has been deleted or
  # donated", and nothing was saved.
  plan = {i: faults.Fault('nan_loss') for i in (6, 7, 8)}
  arrays = faults.regression_data(seed=2, num_examples=256)
  data = faults.FaultInjector(og.batches(arrays, 16, seed=2), plan)
  with og.Checkpointer(tmp_path, save_interval_steps=4) as ckpt:
    with pytest.raises(og.TrainingDiverged):
      og.fit(train_step, make_init(), data, num_steps=20, checkpointer=ckpt,
             recovery=og.RecoveryPolicy(max_rollbacks=0), progress=False)
    assert ckpt.all_steps() == [4, 8, 9]
    assert not ckpt.is_healthy(9)
  assert 'failed too' not in caplog.text
  assert f'after step 9; saved step 9 in {tmp_path}' in caplog.text


@pytest.fixture
def python_signal_handlers():
  """Python's own SIGINT and SIGTERM handlers for the test, the caller's after.

  A shell starts background jobs with SIGINT ignored, and Python then keeps
  it ignored instead of installing ``default_int_handler``: the test must not
  depend on how pytest was started.
  """
  wanted = {signal.SIGINT: signal.default_int_handler,
            signal.SIGTERM: signal.SIG_DFL}
  previous = {signum: signal.signal(signum, handler)
              for signum, handler in wanted.items()}
  yield wanted
  for signum, handler in previous.items():
    signal.signal(signum, handler)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_exits_zero(
    tmp_path, train_step, uninterrupted, signum, python_signal_handlers):
  def send_signal(state, metrics, events):
    if state.step == 7:  # off the save interval: only preemption saves it
      os.kill(os.getpid(), signum)

  with og.Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
    with pytest.raises(SystemExit) as stopped:
      og.fit(train_step, make_init(), make_data(), num_steps=20,
             checkpointer=ckpt, progress=False, callback=send_signal)
    assert stopped.value.code == 0
    assert ckpt.latest_step() == 7
  # Handlers are restored once fit has stopped.
  for handled, handler in python_signal_handlers.items():
    assert signal.getsignal(handled) is handler
  with og.Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
    result = og.fit(train_step, make_init(), make_data(), num_steps=20,
                    checkpointer=ckpt, progress=False)
  assert result.events.counts['preempted'] == 1
  assert result.state.step == 20
  for got, want in zip(jax.tree.leaves(host(result.state)),
                       jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(got, want)


def test_preemption_can_return_instead_of_exiting(tmp_path, train_step):
  def send_signal(state, metrics, events):
    if state.step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  with og.Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
    result = og.fit(train_step, make_init(), make_data(), num_steps=20,
                    checkpointer=ckpt, progress=False, callback=send_signal,
                    exit_on_preemption=False)
    assert result.preempted and result.state.step == 2
    assert ckpt.all_steps() == [0, 2]


def test_bad_arguments(tmp_path, train_step):
  with pytest.raises(ValueError, match='recovery needs a checkpointer'):
    og.fit(train_step, make_init(), make_data(), num_steps=3,
           recovery=og.RecoveryPolicy())
  with pytest.raises(ValueError, match='num_steps'):
    og.fit(train_step, make_init(), make_data(), num_steps=-1)
  params = {'w': jnp.ones(2)}
  plain = og.TrainState(0, params, og.guard(optax.sgd(0.1)).init(params))
  with og.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match='inject_hyperparams'):
      og.fit(train_step, plain, make_data(), num_steps=3, checkpointer=ckpt,
             recovery=og.RecoveryPolicy(lr_backoff=0.5))


def test_stops_when_the_data_ends(train_step, caplog):
  batches = [next(make_data()) for _ in range(3)]
  result = og.fit(train_step, make_init(), iter(batches), num_steps=10,
                  progress=False)
  assert result.state.step == 3
  assert 'The data ran out at step 3 of 10.' in caplog.text


def test_eval_results_rank_the_saved_steps_for_restore_best(
    tmp_path, train_step):
  held_out = jax.tree.map(jnp.asarray, faults.regression_data(
      seed=9, num_examples=64))

  def eval_fn(state):
    return {'eval_loss': loss_fn(state.params, held_out)}

  evaluated = {}
  with og.Checkpointer(tmp_path, save_interval_steps=4, max_to_keep=2,
                       best_metric='eval_loss') as checkpointer:
    og.fit(train_step, make_init(), make_data(), num_steps=24,
           checkpointer=checkpointer, progress=False, eval_fn=eval_fn,
           eval_every=4, callback=lambda state, metrics, events: (
               evaluated.update({state.step: metrics['eval_loss']})
               if 'eval_loss' in metrics else None))
    assert sorted(evaluated) == list(range(4, 25, 4))
    best = min(evaluated, key=evaluated.get)
    assert checkpointer.best_step() == best
    assert checkpointer.metrics(best)['eval_loss'] == pytest.approx(
        evaluated[best], rel=1e-6)
    restored, _ = checkpointer.restore_best(make_init())
  assert restored.step == best
