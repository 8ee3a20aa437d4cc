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
import sys

from tests import processes

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER = REPO / 'tests' / 'attribution_worker.py'
TIMEOUT_S = 300


def test_two_processes_take_the_same_attribution_decisions(tmp_path):
  coordinator = processes.coordinator_address()
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  env.pop('XLA_FLAGS', None)
  finished = processes.run_together(
      [[sys.executable, str(WORKER), coordinator, str(rank),
        str(tmp_path / 'ckpt'), str(tmp_path / f'{rank}.json')]
       for rank in range(2)], env=env, timeout=TIMEOUT_S)
  assert [code for code, _ in finished] == [0, 0], finished
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
