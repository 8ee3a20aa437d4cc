"""Attribution by re-run on two JAX processes: the same decisions on both.

Runs ``tests/attribution_worker.py`` as two processes on 127.0.0.1 (2 CPU
devices each, gloo collectives): a NaN in process 1's rows of one batch and
a one-off corrupted gradient. Every process must classify both the same way
(the guard's verdict is global, the batch hash agreed), record the same bad
batch and end with the same params.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER = REPO / 'tests' / 'attribution_worker.py'
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def test_two_processes_take_the_same_attribution_decisions(tmp_path):
  coordinator = f'127.0.0.1:{_free_port()}'
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  env.pop('XLA_FLAGS', None)
  processes = [
      subprocess.Popen(
          [sys.executable, str(WORKER), coordinator, str(rank),
           str(tmp_path / 'ckpt'), str(tmp_path / f'{rank}.json')],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          text=True)
      for rank in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in processes]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  assert [p.returncode for p in processes] == [0, 0], outputs
  first, second = (json.loads((tmp_path / f'{rank}.json').read_text())
                   for rank in range(2))
  assert (first['nan_here'], second['nan_here']) == (False, True)

  def decisions(result):
    return [(e['kind'], e['step'], e.get('index'), e.get('digest'))
            for e in result['events'] if e['kind'] != 'skipped_step']

  assert decisions(first) == decisions(second)
  kinds = [(kind, step) for kind, step, _, _ in decisions(first)]
  assert kinds == [('bad_batch', 5), ('transient_fault', 8)]
  bad = [line for line in
         (tmp_path / 'ckpt' / 'bad_batches.jsonl').read_text().splitlines()]
  assert len(bad) == 1  # written once, by process 0
  assert json.loads(bad[0])['digest'] == decisions(first)[0][3]
  assert first['params'] == second['params']
  assert first['step'] == second['step'] == 10
