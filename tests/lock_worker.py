"""A process for the one-writer tests (run as a subprocess).

Usage: python lock_worker.py MODE CHECKPOINT_DIR

hold: opens a writing og.Checkpointer, prints ``holding PID`` and sleeps
  until killed.
exit: opens a writer, tries a second one on the same directory (prints
  ``refused after SECONDS``), tries a save that fails (prints ``save
  refused``), hands over an async save and exits without closing anything
  (prints ``exiting``).
"""

import sys
import time

import jax.numpy as jnp
import optax

import optax_guard as og
from optax_guard.host.checkpoint import CheckpointLockedError


def main(mode, directory):
  writer = og.Checkpointer(directory, save_interval_steps=1)
  if mode == 'hold':
    print(f'holding {__import__("os").getpid()}', flush=True)
    time.sleep(600)
    return
  start = time.monotonic()
  try:
    og.Checkpointer(directory)
  except CheckpointLockedError:
    print(f'refused after {time.monotonic() - start:.4f}', flush=True)
  params = {'w': jnp.ones((64, 64))}
  state = og.TrainState(1, params, optax.adam(1e-3).init(params))
  try:
    writer.save(state, events={'not json': object()})
  except TypeError:
    print('save refused', flush=True)
  writer.save(state._replace(step=2))
  print('exiting', flush=True)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
