"""Two processes, one global mesh: the guard decides the same everywhere.

Runs ``examples/multihost_train.py`` as two JAX processes on 127.0.0.1 (4
CPU devices each, gloo collectives), and its ``train`` in this process (8
devices, see conftest.py) as the single-process reference, on the same global
data with a NaN in one row of step 3's batch, held by process 1 only.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests import processes

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER = REPO / 'examples' / 'multihost_train.py'
NAN_STEP = 3
TIMEOUT_S = 120


def _start(out, *args):
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  return subprocess.Popen(
      [sys.executable, str(WORKER), '--nan-step', str(NAN_STEP),
       '--out', str(out), *args],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
  )


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multiprocess')
  coordinator = processes.coordinator_address()
  workers = {}
  try:
    for rank in range(2):
      workers[f'rank{rank}'] = _start(
          tmp / f'rank{rank}.npz', '--coordinator', coordinator,
          '--num-processes', '2', '--process-id', str(rank),
          '--local-devices', '4')
    single = _worker_module().train(nan_step=NAN_STEP)  # while they run
    for name, process in workers.items():
      output, _ = process.communicate(timeout=TIMEOUT_S)
      assert process.returncode == 0, f'{name} failed:\n{output}'
  finally:
    for process in workers.values():
      if process.poll() is None:
        process.kill()
        process.wait()
  results = {name: dict(np.load(tmp / f'{name}.npz')) for name in workers}
  return {**results, 'single': single}


def _worker_module():
  spec = importlib.util.spec_from_file_location('multihost_train', WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_nan_in_one_process_skips_the_step_on_both(runs):
  assert [bool(runs[r]['nan_in_local_data']) for r in ('rank0', 'rank1')] == [
      False, True]
  for name in ('rank0', 'rank1', 'single'):
    skipped = runs[name]['metric_skipped']
    assert skipped.tolist() == [step == NAN_STEP for step in range(len(skipped))]
    np.testing.assert_array_equal(runs[name]['metric_total_skips'][-1], 1)


def test_both_processes_hold_the_same_params(runs):
  assert int(runs['rank0']['process_count']) == 2
  for key in runs['rank0']:
    if key.startswith('param_'):
      np.testing.assert_array_equal(runs['rank0'][key], runs['rank1'][key])


def test_results_equal_the_single_process_run(runs):
  assert int(runs['single']['process_count']) == 1
  for key, value in runs['single'].items():
    if key.startswith(('param_', 'metric_loss', 'metric_grad_norm')):
      np.testing.assert_allclose(runs['rank0'][key], value, rtol=1e-5)
