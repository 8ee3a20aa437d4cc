"""Item 6: the fault campaign in long form, 1,000 injected faults.

:func:`og.faults.run_fault_campaign` trains a small model twice on the same
data, clean and with faults, through :func:`og.fit` with the guard,
checkpoints and the recovery policy. Here it runs with ``STEPS_PER_FAULT``
steps per fault (the ratio of its defaults). Targets: every fault survived
(the run finishes), and no parameter is ever non-finite.
"""

import time
from typing import Any, Callable

import optax_guard as og

STEPS_PER_FAULT = 10


def run(*, num_faults: int, seed: int,
        say: Callable[[str], None]) -> dict[str, Any]:
  num_steps = STEPS_PER_FAULT * num_faults
  say(f'{num_faults} faults over {num_steps} steps (two runs: clean, faulty)')
  start = time.perf_counter()
  try:
    result = og.faults.run_fault_campaign(
        seed=seed, num_steps=num_steps, num_faults=num_faults
    )
  except og.TrainingDiverged as error:
    return {
        'num_faults': num_faults, 'num_steps': num_steps, 'seed': seed,
        'survived': False, 'error': str(error),
        'seconds': time.perf_counter() - start,
    }
  return {
      'num_faults': num_faults, 'num_steps': num_steps, 'seed': seed,
      'survived': True,
      'seconds': time.perf_counter() - start,
      **result._asdict(),
      'injected_total': sum(result.injected.values()),
  }
