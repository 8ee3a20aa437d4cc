"""SIGKILL a Flax model's og.fit run mid-run and mid-save; it resumes bitwise.

For each model form (Linen with batch_stats, NNX with BatchNorm and Dropout,
a Flax TrainState subclass), an uninterrupted run of tests/flax_crash_worker.py
gives the reference; another run is killed right after an async save was
handed to Orbax (its files still being written), restarted, killed again
between saves, and restarted to the end. Params and model state must equal
the reference bit for bit (the NaN batch at step 7 held the statistics).
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.test_fit_model_state import FORMS

WORKER = os.path.join(os.path.dirname(__file__), 'flax_crash_worker.py')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 24


def _run(form, directory, result, cache, log, kill_after=None):
  """Runs the worker; SIGKILLs it at the first line ``kill_after`` matches
  (``('saved', 8)``: right after the save of step 8 was handed over).
  Returns whether it was killed."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH'))
                                      if p)
  with open(log, 'w') as stderr:
    process = subprocess.Popen(
        [sys.executable, WORKER, form, directory, result, str(NUM_STEPS),
         cache], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    killed = False
    for line in process.stdout:
      kind, _, value = line.strip().partition(' ')
      if kill_after and kind == kill_after[0] and int(value) >= kill_after[1]:
        process.send_signal(signal.SIGKILL)
        killed = True
        break
    code = process.wait(timeout=300)
    process.stdout.close()
  assert killed or code == 0, open(log).read()
  return killed


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


@pytest.mark.parametrize('form', sorted(FORMS))
def test_sigkill_mid_save_and_mid_run_resumes_bitwise(form, tmp_path, cache):
  reference = str(tmp_path / 'reference.npz')
  _run(form, str(tmp_path / 'reference'), reference, cache,
       tmp_path / 'reference.log')
  directory, result = str(tmp_path / 'ckpt'), str(tmp_path / 'result.npz')
  assert _run(form, directory, result, cache, tmp_path / 'kill1.log',
              kill_after=('saved', 8))
  assert _run(form, directory, result, cache, tmp_path / 'kill2.log',
              kill_after=('step', 14))
  assert not _run(form, directory, result, cache, tmp_path / 'last.log')
  with np.load(reference) as want, np.load(result) as got:
    assert sorted(got.files) == sorted(want.files)
    for name in want.files:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
