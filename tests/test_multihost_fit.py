"""og.fit and og.Checkpointer over two processes: preemption, crash, damage.

Runs ``examples/multihost_train.py --checkpoint-dir`` as two JAX processes on
127.0.0.1 (4 CPU devices each, gloo collectives). Both runs, uninterrupted
and interrupted, see NaNs in process 1's rows of batches 5 and 6: the guard
declares divergence at step 7 and the run rolls back, the same way on both.

The interrupted run, in one directory: SIGTERM to process 1 alone after step
3 (both stop after one same step, save it, exit 0); a restart SIGKILLed on
both processes after step 9, while step 8's save may still be writing
(process 1 may abort first, its coordinator in process 0 gone); the
newest step on disk then damaged; a last restart falls back past it on both
processes and finishes with bitwise the params of the uninterrupted run.
"""

import os
import pathlib
import re
import signal
import sys

import numpy as np
import pytest

from tests import processes

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER = REPO / 'examples' / 'multihost_train.py'
STEPS = 12
NAN_STEPS = ('5', '6')  # batch indices: loop steps 6 and 7
TIMEOUT_S = 300  # per launch; a loaded 2-core machine needs ~80 s


def _launch(directory, out_prefix, *args, steps=STEPS, env=None):
  """Runs both processes to the end; ``(return codes, outputs, results)``."""
  coordinator = processes.coordinator_address()
  env = {**os.environ, 'PYTHONPATH': str(REPO), **(env or {})}
  env.pop('XLA_FLAGS', None)  # --local-devices sets the device count
  finished = processes.run_together(
      [[sys.executable, str(WORKER), '--coordinator', coordinator,
        '--num-processes', '2', '--process-id', str(rank),
        '--local-devices', '4', '--checkpoint-dir', str(directory),
        '--steps', str(steps), '--nan-steps', *NAN_STEPS,
        '--out', f'{out_prefix}{rank}.npz', *args]
       for rank in range(2)], env=env, timeout=TIMEOUT_S)
  results = [dict(np.load(f'{out_prefix}{rank}.npz'))
             if os.path.exists(f'{out_prefix}{rank}.npz') else None
             for rank in range(2)]
  return ([code for code, _ in finished],
          [output for _, output in finished], results)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multihost_fit')
  codes, outputs, reference = _launch(tmp / 'whole', tmp / 'whole')
  assert codes == [0, 0], outputs
  interrupted = tmp / 'interrupted'
  stages = {'whole': reference}
  codes, outputs, stages['preempted'] = _launch(
      interrupted, tmp / 'preempted', '--preempt-at', '3', steps=STEPS)
  assert codes == [0, 0], outputs
  stages['after_preemption'] = sorted(os.listdir(interrupted))
  codes, outputs, _ = _launch(interrupted, tmp / 'crashed', '--crash-at', '9')
  # Process 1 may abort first: its coordinator (in process 0) is gone.
  assert codes[0] == -signal.SIGKILL, outputs
  assert codes[1] in (-signal.SIGKILL, -signal.SIGABRT), outputs
  stages['after_crash'] = sorted(os.listdir(interrupted))
  finished = [int(name) for name in stages['after_crash'] if name.isdigit()]
  newest = max(finished)
  _truncate_arrays(interrupted / str(newest))
  codes, outputs, stages['resumed'] = _launch(interrupted, tmp / 'resumed')
  assert codes == [0, 0], outputs
  stages.update(damaged=newest, resumed_outputs=outputs,
                quarantined=sorted(os.listdir(interrupted / 'corrupted')))
  return stages


def _truncate_arrays(step_dir):
  """Halves every array data file of the step (all processes' shards)."""
  for path in (step_dir / 'state').glob('**/d/*'):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def test_sigterm_to_one_process_stops_both_after_the_same_saved_step(runs):
  first, second = runs['preempted']
  assert bool(first['preempted']) and bool(second['preempted'])
  stopped = int(first['step'])
  assert int(second['step']) == stopped
  assert 3 <= stopped < STEPS  # the sync point comes after the signal
  assert str(stopped) in runs['after_preemption']
  np.testing.assert_array_equal(first['checkpoint_steps'],
                                second['checkpoint_steps'])
  for key in first:
    if key.startswith('param_'):
      np.testing.assert_array_equal(first[key], second[key])


def test_rollback_decisions_are_the_same_on_every_process(runs):
  # The newest confirmed checkpoint (confirm_steps=2) is step 2: steps 6 and
  # 7 are the skip streak that diverged, so they confirm nothing, neither
  # step 4 nor a preemption save at step 5 (the interrupted run may have
  # one: where the preemption stops depends on timing).
  for name in ('whole', 'resumed'):
    first, second = runs[name]
    assert first['rollbacks'].tolist() == second['rollbacks'].tolist() == [
        [7, 2]]


def test_damaged_step_falls_back_on_both_and_is_moved_aside_once(runs):
  newest = runs['damaged']
  # Besides the damaged step: the save the SIGKILL interrupted, if any, set
  # aside too (never deleted), with a warning naming it as unfinished.
  unfinished = {step for output in runs['resumed_outputs'] for step in
                re.findall(r'Checkpoint step (\d+) in .*: unfinished save',
                           output)}
  assert str(newest) in runs['quarantined']
  assert set(runs['quarantined']) - {str(newest)} <= unfinished
  for output in runs['resumed_outputs']:
    # Halved data files fail the read of the array metadata or the arrays.
    assert re.search(
        rf'Checkpoint step {newest} in .*: (unreadable metadata|cannot be'
        rf' read).*moved to \S*corrupted/{newest} ', output)


def test_crash_and_damage_resume_to_the_bits_of_the_whole_run(runs):
  for whole, resumed in zip(runs['whole'], runs['resumed']):
    assert int(resumed['step']) == int(whole['step']) == STEPS
    for key in whole:
      if key.startswith('param_'):
        np.testing.assert_array_equal(resumed[key], whole[key])


def test_without_jax_preemption_service_both_stop_at_the_signalled_step(
    tmp_path):
  # The gathered flags decide: the signal comes in the callback of step 3,
  # after that step's check, so the next step's check stops both.
  codes, outputs, results = _launch(
      tmp_path / 'run', tmp_path / 'run', '--preempt-at', '3',
      env={'JAX_ENABLE_PREEMPTION_SERVICE': 'false'})
  assert codes == [0, 0], outputs
  assert [int(r['step']) for r in results] == [4, 4]
  assert all(bool(r['preempted']) for r in results)
  assert [r['checkpoint_steps'].tolist() for r in results] == [[0, 2, 4]] * 2
