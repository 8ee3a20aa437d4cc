"""Item 6: the fault campaign in long form, 1,000 injected faults.

:func:`testing.run_fault_campaign` trains a small model twice on the same
data, clean and with faults, through :func:`og.fit` with the guard,
checkpoints and the recovery policy. Here it runs at the proportions its
docstring suggests for a long campaign (3,000 steps, 300 faults, 10 bursts):
``STEPS_PER_FAULT`` steps per single fault after the fault-free start, and
one burst of consecutive NaN gradients (each forcing a rollback) per
``FAULTS_PER_BURST`` faults. Targets: every fault survived (the run
finishes), and no parameter is ever non-finite.
"""

import time
from typing import Any, Callable

import optax_guard as og
from optax_guard import testing

STEPS_PER_FAULT = 10
FAULTS_PER_BURST = 30
FAULT_FREE_START = 20  # The campaign injects nothing before this step.


def run(*, num_faults: int, seed: int,
        say: Callable[[str], None]) -> dict[str, Any]:
  num_steps = FAULT_FREE_START + STEPS_PER_FAULT * num_faults
  bursts = num_faults // FAULTS_PER_BURST
  say(f'{num_faults} faults and {bursts} bursts over {num_steps} steps (two'
      ' runs: clean, faulty)')
  settings = {'num_faults': num_faults, 'bursts': bursts,
              'num_steps': num_steps, 'seed': seed}
  start = time.perf_counter()
  try:
    result = testing.run_fault_campaign(
        seed=seed, num_steps=num_steps, num_faults=num_faults, bursts=bursts
    )
  except og.TrainingDiverged as error:
    return {**settings, 'survived': False, 'error': str(error),
            'seconds': time.perf_counter() - start}
  return {
      **settings, 'survived': True, 'seconds': time.perf_counter() - start,
      **result._asdict(), 'injected_total': sum(result.injected.values()),
  }
