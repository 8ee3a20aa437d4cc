"""The four ways the host layer lost a run or hung (issue 21, "Why" 1-4),
each reproduced with real Orbax files, real directories and real processes."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard import testing as faults
from optax_guard.host import checkpoint as checkpoint_lib
from optax_guard.host.checkpoint import CorruptCheckpointWarning
from optax_guard.host.recovery import Recovery
from tests import processes

# A damaged checkpoint makes Orbax abandon its other pending reads; og
# keeps them off the console (integrity.quiet_abandoned_reads): nothing
# unraisable may leak.
pytestmark = pytest.mark.filterwarnings(
    'error::pytest.PytestUnraisableExceptionWarning'
)


def make_state(step, offset=0.0):
  params = {'w': jnp.arange(6.0).reshape(2, 3) + offset}
  return og.TrainState(step, params, optax.adam(1e-3).init(params),
                       jax.random.key(step))


def save_steps(directory, steps, **options):
  with og.Checkpointer(directory, save_interval_steps=1, **options) as ckpt:
    for step in steps:
      assert ckpt.save(make_state(step, offset=step),
                       metrics={'eval_loss': 1.0 / step})
    ckpt.wait_until_finished()


def test_missing_array_metadata_sends_the_step_aside(tmp_path):
  # "Why" 1: without it Orbax restores the typed PRNG key as raw uint32 key
  # data; the cast raised ValueError on every restart and nothing moved.
  save_steps(tmp_path, [1, 2])
  os.remove(tmp_path / '2' / 'state' / 'array_metadatas' / 'process_0')
  with (pytest.warns(CorruptCheckpointWarning,
                     match=r'step 2 .*rng.*restored as uint32\[2\]'),
        og.Checkpointer(tmp_path) as ckpt):
    restored, _ = ckpt.restore_or_init(make_state(0))
  assert restored.step == 1
  np.testing.assert_array_equal(restored.params['w'], make_state(1, 1).params['w'])
  assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  assert os.listdir(tmp_path / checkpoint_lib.QUARANTINE_DIR / '2')
  # The next restart gets past it at once.
  with og.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]


def _flip_a_digit(path):
  """Changes one digit of a JSON file: still valid JSON, another value."""
  text = path.read_text()
  index = next(i for i, c in enumerate(text) if c in '123456789')
  path.write_text(text[:index] + str(int(text[index]) % 9 + 1)
                  + text[index + 1:])


def test_a_changed_metrics_file_is_damage(tmp_path):
  # "Why" 1: a flipped byte in the newest step's metrics was accepted.
  save_steps(tmp_path, [1, 2])
  metrics = tmp_path / '2' / 'metrics' / 'metrics'
  before = json.loads(metrics.read_text())
  _flip_a_digit(metrics)
  assert json.loads(metrics.read_text()) != before
  with (pytest.warns(CorruptCheckpointWarning,
                     match=r'step 2 .*metrics differ from the integrity record'),
        og.Checkpointer(tmp_path) as ckpt):
    restored, _ = ckpt.restore_or_init(make_state(0))
  assert restored.step == 1


def _damage_the_arrays(step_dir):
  # Always found: a flipped byte can land where Orbax reads nothing.
  os.remove(step_dir / 'state' / 'manifest.ocdbt')


def _observe(recovery, step, loss):
  return recovery.observe(step, {'loss': loss})


def test_a_damaged_rollback_save_leaves_the_previous_target(tmp_path):
  # "Why" 2: with max_to_keep=2 the save made right after a rollback (step
  # 12, a copy of step 8) became the only target kept; damaged, the next
  # rollback found nothing and gave up.
  state = make_state(0)
  with og.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2,
                       async_save=False) as ckpt:
    recovery = Recovery(og.RecoveryPolicy(confirm_steps=2), ckpt)
    for step in range(1, 12):
      _observe(recovery, step, 1.0)
      if step in (4, 8):
        ckpt.save(make_state(step, offset=step), healthy=recovery.healthy)
    rolled = recovery.rollback(state._replace(step=12), 'first')
    assert rolled.step == 12 and recovery.rollbacks[0]['to_step'] == 8
    ckpt.save(rolled, healthy=True)
    _damage_the_arrays(tmp_path / '12')
    for step in (13, 14):
      _observe(recovery, step, float('nan'))
      ckpt.save(make_state(step, offset=step), healthy=recovery.healthy)
    assert 8 in ckpt.all_steps()
    with pytest.warns(CorruptCheckpointWarning, match='step 12 '):
      again = recovery.rollback(state._replace(step=14), 'second')
  assert [r['to_step'] for r in recovery.rollbacks] == [8, 8]
  np.testing.assert_array_equal(again.params['w'],
                                make_state(8, offset=8).params['w'])


def _faulty_run(directory, plan, policy, num_steps=40):
  arrays = faults.regression_data(seed=1, num_examples=256)
  data = faults.FaultInjector(og.batches(arrays, 16, seed=1), plan)
  params = {'w': jnp.full((8, 8), 0.1), 'v': jnp.full((8, 1), 0.1)}
  init = og.TrainState(0, params, FAULTY_TX.init(params))
  with og.Checkpointer(directory / 'ckpt', save_interval_steps=10) as ckpt:
    return og.fit(
        FAULTY_STEP, init, data, num_steps=num_steps, checkpointer=ckpt,
        recovery=policy, progress=False, handle_preemption=False,
        log_dir=directory / 'logs', tensorboard=False,
    )


FAULTY_TX = og.guard(optax.adam(0.05), max_consecutive_skips=3)
FAULTY_STEP = og.make_train_step(
    faults.with_faults(
        lambda p, b: jnp.mean((jnp.tanh(b['x'] @ p['w']) @ p['v'] - b['y'])
                              ** 2)),
    FAULTY_TX,
)


def test_giving_up_is_an_event_and_the_restart_raises_again(tmp_path):
  # "Why" 2: recovery gave up without an event, and the next restart
  # resumed the diverged step silently, as if it were healthy.
  plan = {i: faults.Fault('nan_grad') for i in range(25, 29)}
  policy = og.RecoveryPolicy(max_rollbacks=0)
  with pytest.raises(og.TrainingDiverged, match='step 28'):
    _faulty_run(tmp_path, plan, policy)
  with open(tmp_path / 'logs' / 'events.jsonl') as f:
    logged = [json.loads(line) for line in f]
  assert [(e['kind'], e['step']) for e in logged][-1] == ('gave_up', 28)
  assert 'after 0 rollbacks, the maximum' in logged[-1]['reason']
  # The checkpoint's events item is strict JSON too: the worst leaves'
  # gradient norms are NaN here, saved as "nan" (issue 26).
  items = list((tmp_path / 'ckpt').glob('*/events/metadata'))
  assert items
  for item in items:
    json.loads(item.read_text(), parse_constant=_refuse_non_strict)
  with pytest.raises(og.TrainingDiverged,
                     match=r'(?s)step 28.*gave up at step 28 before this'
                     ' restart.*: nan'):
    _faulty_run(tmp_path, {}, policy)


def _refuse_non_strict(constant):
  raise ValueError(f'not strict JSON: {constant}')


def test_an_unwritable_directory_raises_naming_the_step_and_exits(tmp_path):
  # "Why" 3: PermissionError came after 0.4 s, then the process waited
  # 300 s for an Orbax thread. The timeout only catches that hang.
  worker = os.path.join(os.path.dirname(__file__), 'unwritable_worker.py')
  if os.geteuid() == 0 and subprocess.run(
      ['chattr', '-i', str(tmp_path)], capture_output=True,
      check=False).returncode:
    pytest.skip('root, and this file system has no chattr +i')
  result = subprocess.run(
      [sys.executable, worker, str(tmp_path / 'ckpt')], capture_output=True,
      text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  (line,) = [x for x in result.stdout.splitlines() if x.startswith('raised')]
  name, seconds, message = line.split(' ', 3)[1:]
  print(f'unwritable directory: raised after {seconds} s')
  assert name == 'CheckpointSaveError'
  assert message.startswith(f'Saving step 15 to {tmp_path / "ckpt"} failed')
  with og.Checkpointer(tmp_path / 'ckpt') as ckpt:
    assert ckpt.all_steps() == [0, 5, 10]


LOCK_WORKER = os.path.join(os.path.dirname(__file__), 'lock_worker.py')


def test_a_deleted_lock_file_lets_no_second_writer_in(tmp_path):
  # "Why" 4: with .writer.lock removed, a second writer took the directory
  # and deleted the first one's save in flight.
  worker = subprocess.Popen([sys.executable, LOCK_WORKER, 'hold',
                             str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert worker.stdout.readline() == f'holding {worker.pid}\n'
    os.remove(tmp_path / checkpoint_lib.LOCK_FILE)
    unfinished = tmp_path / '7.orbax-checkpoint-tmp-123'
    unfinished.mkdir()  # As the holder's save in flight.
    with pytest.raises(checkpoint_lib.CheckpointLockedError,
                       match=rf'pid {worker.pid}.*lock file was deleted'):
      og.Checkpointer(tmp_path)
    assert unfinished.exists()
  finally:
    worker.kill()
    worker.wait()
  # Killed, it blocks nobody.
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    assert ckpt.save(make_state(1))


def test_the_holder_takes_a_deleted_lock_file_again_before_saving(tmp_path):
  with og.Checkpointer(tmp_path, save_interval_steps=1) as first:
    assert first.save(make_state(1))
    first.wait_until_finished()
    os.remove(tmp_path / checkpoint_lib.LOCK_FILE)
    with pytest.raises(checkpoint_lib.CheckpointLockedError,
                       match='lock file was deleted'):
      og.Checkpointer(tmp_path)
    assert first.save(make_state(2))
    assert (tmp_path / checkpoint_lib.LOCK_FILE).exists()
    # Taken again: a second writer is refused by the file lock itself.
    with pytest.raises(checkpoint_lib.CheckpointLockedError,
                       match=rf'pid {os.getpid()}'):
      og.Checkpointer(tmp_path)
  with og.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1, 2]


def test_a_replaced_lock_file_held_by_another_writer_stops_the_saves(
    tmp_path):
  with og.Checkpointer(tmp_path, save_interval_steps=1) as first:
    assert first.save(make_state(1))
    first.wait_until_finished()
    os.remove(tmp_path / checkpoint_lib.LOCK_FILE)
    holder = json.loads((tmp_path / checkpoint_lib.HOLDER_FILE).read_text())
    (tmp_path / checkpoint_lib.HOLDER_FILE).write_text(json.dumps(
        {**holder, 'released': True}))
    # A writer that got in (the first one's record looked released).
    worker = subprocess.Popen([sys.executable, LOCK_WORKER, 'hold',
                               str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
      assert worker.stdout.readline() == f'holding {worker.pid}\n'
      with pytest.raises(checkpoint_lib.CheckpointLockedError,
                         match=rf'pid {worker.pid}'):
        first.save(make_state(2))
    finally:
      worker.kill()
      worker.wait()
    assert first.all_steps() == [1]


def _read_only_mount(directory):
  """Shell: ``directory`` read-only in this mount namespace (a bind mount)."""
  return (f'mount --bind {directory} {directory}'
          f' && mount -o remount,ro,bind {directory}')


def _read_only_mount_works(directory):
  """Whether this process may make a read-only bind mount (root, Linux)."""
  return subprocess.run(
      ['unshare', '-m', 'sh', '-c', _read_only_mount(directory)],
      capture_output=True, check=False).returncode == 0


def test_a_save_failing_on_one_of_two_processes_raises_on_both(tmp_path):
  # Item 4 of issue 21: a failing host makes every host raise, none is left
  # in an Orbax barrier. Process 1 sees the directory read-only (a bind
  # mount in its own mount namespace); process 0 can write it.
  directory = tmp_path / 'ckpt'
  directory.mkdir()
  if not _read_only_mount_works(directory):
    pytest.skip('needs root and mount namespaces (unshare -m)')
  coordinator = processes.coordinator_address()
  worker = os.path.join(os.path.dirname(__file__),
                        'multihost_save_worker.py')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  commands = [
      [sys.executable, worker, coordinator, '0', str(directory)],
      ['unshare', '-m', 'sh', '-c',
       (f'{_read_only_mount(directory)} && exec {sys.executable} {worker}'
        f' {coordinator} 1 {directory}')],
  ]
  finished = processes.run_together(commands, env=env, timeout=240)
  for rank, (code, output) in enumerate(finished):
    assert code == 0, output[-2000:]
    (line,) = [x for x in output.splitlines() if x.startswith('raised')]
    name, seconds, message = line.split(' ', 3)[1:]
    print(f'process {rank}: raised after {seconds} s')
    assert name == 'CheckpointSaveError'
    assert message.startswith(f'Saving step 1 to {directory} failed')
    assert output.splitlines()[-1] == 'exited'


README = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md')
PROMISE = ('a truncated, missing, garbled or unfinished one is skipped with a'
           ' warning naming the step and the reason, and moved to'
           ' `dir/corrupted/`, never deleted')


def test_the_readme_promise_about_damaged_and_unfinished_steps_holds(
    tmp_path):
  # Issue 21: the README promised this while an unfinished save was
  # "ignored and removed" (by Orbax, as a writer opened the directory).
  with open(README) as f:
    assert PROMISE in ' '.join(f.read().split())
  save_steps(tmp_path, [1, 2, 3, 4], max_to_keep=None)
  os.rename(tmp_path / '4', tmp_path / '4.orbax-checkpoint-tmp-1234')  # kill
  with open(tmp_path / '3' / 'metrics' / 'metrics', 'w') as f:
    f.write('{"healthy": tr')  # garbled
  os.remove(tmp_path / '2' / 'state' / 'manifest.ocdbt')  # missing
  before = _files(tmp_path)
  with (pytest.warns(CorruptCheckpointWarning) as caught,
        og.Checkpointer(tmp_path) as ckpt):
    restored, _ = ckpt.restore_or_init(make_state(0))
  assert restored.step == 1
  messages = [str(w.message) for w in caught]
  for step in (4, 3, 2):
    (message,) = [m for m in messages if f'step {step} ' in m]
    assert f'moved to {tmp_path / "corrupted"}' in message
  assert 'unfinished save (4.orbax-checkpoint-tmp-1234)' in ' '.join(messages)
  # Nothing deleted: the three steps moved aside whole, step 1 untouched.
  assert sorted(os.listdir(tmp_path / 'corrupted')) == ['2', '3', '4']
  after = _files(tmp_path)
  for old, new in [('2', '2'), ('3', '3'), ('4.orbax-checkpoint-tmp-1234', '4'),
                   ('1', '1')]:
    inside = {p.split('/', 1)[1] for p in before if p.split('/')[0] == old}
    where = new if old == '1' else f'corrupted/{new}'
    assert {f'{where}/{p}' for p in inside} <= after, old


def _files(directory):
  return {os.path.relpath(os.path.join(root, name), directory)
          for root, _, names in os.walk(directory) for name in names}


def test_a_full_disk_raises_naming_the_step_that_failed(tmp_path):
  # Issue 21: the error of an async save that ran out of space named the
  # step of a later save call (37 or 36 where 32 failed). A 1.2 MB tmpfs,
  # mounted in the worker's own mount namespace, fills at the fourth save.
  directory = tmp_path / 'disk'
  directory.mkdir()
  if not _read_only_mount_works(directory):
    pytest.skip('needs root and mount namespaces (unshare -m)')
  worker = os.path.join(os.path.dirname(__file__), 'disk_full_worker.py')
  result = subprocess.run(
      ['unshare', '-m', 'sh', '-c',
       (f'mount -t tmpfs -o size=1200k tmpfs {directory} && exec'
        f' {sys.executable} {worker} {directory / "ckpt"}')],
      capture_output=True, text=True, timeout=240, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  (raised,) = [x for x in lines if x.startswith('raised')]
  name, call_step, seconds, message = raised.split(' ', 4)[1:]
  print(f'full disk: raised after {seconds} s')
  (on_disk,) = [x for x in lines if x.startswith('on disk')]
  failed = max(int(step) for step in on_disk.split()[2:]) + 1
  assert name == 'CheckpointSaveError'
  # Which write meets the full disk first varies from run to run: an array
  # file (TensorStore's RESOURCE_EXHAUSTED) or a JSON item (OSError 28).
  assert message.startswith(f'Saving step {failed} to {directory / "ckpt"}'
                            ' failed: ')
  assert 'No space left on device' in message
  assert 'the steps saved before are intact' in message
  assert int(call_step) in (failed, failed + 1)
