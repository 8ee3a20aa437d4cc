"""Kill a training process at random moments; it must resume to the same bits.

The worker (crash_worker.py) trains with og.fit and async Orbax checkpoints.
An uninterrupted run gives the reference; another run is SIGKILLed at least
ten times, half of them right after an async save was handed to Orbax (while
its files are being written), and restarted each time until it completes.
"""

import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), 'crash_worker.py')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 60
NUM_KILLS = 10


class Worker:
  """One worker process, its output read line by line."""

  def __init__(self, directory, result, cache, log):
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (ROOT, env.get('PYTHONPATH')) if p
    )
    self.stderr = open(log, 'w')
    self.process = subprocess.Popen(
        [sys.executable, WORKER, directory, result, str(NUM_STEPS), cache],
        stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
    )

  def lines(self):
    for line in self.process.stdout:
      kind, _, value = line.strip().partition(' ')
      yield kind, int(value) if value.isdigit() else None

  def finish(self):
    code = self.process.wait(timeout=120)
    self.process.stdout.close()
    self.stderr.close()
    return code


def finished_steps(directory):
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def unfinished_saves(directory):
  if not os.path.isdir(directory):
    return []
  return [name for name in os.listdir(directory) if '.orbax-checkpoint-tmp' in
          name]


def load(result):
  with np.load(result) as f:
    return {name: f[name] for name in f.files}


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache):
  root = tmp_path_factory.mktemp('reference')
  worker = Worker(str(root / 'ckpt'), str(root / 'result.npz'), cache,
                  root / 'stderr.txt')
  steps = [value for kind, value in worker.lines() if kind == 'step']
  assert worker.finish() == 0, (root / 'stderr.txt').read_text()
  assert steps == list(range(1, NUM_STEPS + 1))
  result = load(root / 'result.npz')
  assert result['rollbacks'] == 1  # the planned burst forced one rollback
  return result


def assert_same_bits(result, reference):
  assert sorted(result) == sorted(reference)
  for name in reference:
    np.testing.assert_array_equal(result[name], reference[name], err_msg=name)
    assert result[name].dtype == reference[name].dtype


def test_sigkill_at_random_moments_resumes_bitwise(tmp_path, cache, reference):
  rng = random.Random(20260123)
  directory, result = str(tmp_path / 'ckpt'), str(tmp_path / 'result.npz')
  kills, during_save, resumes = 0, 0, []
  for attempt in range(4 * NUM_KILLS):
    expected_first = (finished_steps(directory) or [0])[-1] + 1
    worker = Worker(directory, result, cache, tmp_path / f'stderr{attempt}')
    mode = rng.choice(['save', 'step']) if kills < NUM_KILLS else None
    target = expected_first + rng.randrange(0, 6)
    first, killed = None, False
    for kind, value in worker.lines():
      if kind == 'step' and first is None:
        first = value
      if (mode == 'save' and kind == 'saved' and value >= target) or (
          mode == 'step' and kind == 'step' and value >= target):
        worker.process.send_signal(signal.SIGKILL)
        killed = True
        break
    code = worker.finish()
    if first is not None:
      resumes.append((expected_first, first))
    if not killed:
      assert code == 0, (tmp_path / f'stderr{attempt}').read_text()
      break
    kills += 1
    during_save += bool(unfinished_saves(directory))
  else:
    pytest.fail('the run never completed')
  print(f'{kills} SIGKILLs, {during_save} during an async save,'
        f' {len(resumes)} restarts resumed')
  assert kills >= NUM_KILLS
  assert during_save >= 2
  # Every restart continued right after the newest finished checkpoint.
  assert all(first == expected for expected, first in resumes), resumes
  assert_same_bits(load(result), reference)


@pytest.mark.parametrize('signum', [signal.SIGTERM])
def test_preemption_signal_saves_exits_zero_and_resumes(tmp_path, cache,
                                                        reference, signum):
  directory, result = str(tmp_path / 'ckpt'), str(tmp_path / 'result.npz')
  worker = Worker(directory, result, cache, tmp_path / 'stderr0')
  last = None
  for kind, value in worker.lines():
    if kind == 'step':
      last = value
      if value == 13:  # off the save interval: only preemption saves it
        worker.process.send_signal(signum)
  assert worker.finish() == 0, (tmp_path / 'stderr0').read_text()
  # The step in flight when the signal came was finished and saved.
  assert finished_steps(directory)[-1] == last >= 13
  assert not os.path.exists(result)
  worker = Worker(directory, result, cache, tmp_path / 'stderr1')
  steps = [value for kind, value in worker.lines() if kind == 'step']
  assert worker.finish() == 0, (tmp_path / 'stderr1').read_text()
  assert steps[0] == last + 1 and steps[-1] == NUM_STEPS
  assert_same_bits(load(result), reference)
