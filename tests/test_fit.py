"""The fit loop: logging, progress, preemption, resume."""

import json
import os
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


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


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
  assert sorted(scalars['train/loss']) == list(range(1, 16))
  assert scalars['train/loss'][3] == pytest.approx(records[2]['loss'])
  assert scalars['train/skipped'][5] == 1.0


def test_progress_bar(capsys, train_step):
  og.fit(train_step, make_init(), make_data(), num_steps=3, progress=True)
  err = capsys.readouterr().err
  assert '3/3' in err and 'loss=' in err and 'skips=0' in err


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_exits_zero(
    tmp_path, train_step, uninterrupted, signum):
  def send_signal(state, metrics):
    if state.step == 7:  # off the save interval: only preemption saves it
      os.kill(os.getpid(), signum)

  with og.Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
    with pytest.raises(SystemExit) as stopped:
      og.fit(train_step, make_init(), make_data(), num_steps=20,
             checkpointer=ckpt, progress=False, callback=send_signal)
    assert stopped.value.code == 0
    assert ckpt.latest_step() == 7
  # Handlers are restored once fit has stopped.
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  with og.Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
    result = og.fit(train_step, make_init(), make_data(), num_steps=20,
                    checkpointer=ckpt, progress=False)
  assert result.events.counts['preempted'] == 1
  assert result.state.step == 20
  for got, want in zip(jax.tree.leaves(host(result.state)),
                       jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(got, want)


def test_preemption_can_return_instead_of_exiting(tmp_path, train_step):
  def send_signal(state, metrics):
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
