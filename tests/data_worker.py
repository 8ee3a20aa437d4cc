"""A run of og.fit on og.batches that records every batch it trains on.

Usage: python data_worker.py CHECKPOINT_DIR RECORD_DIR NUM_STEPS [KILL_AT]

Trains a linear model for NUM_STEPS steps with async checkpoints every
``SAVE_INTERVAL`` steps, writing the batch of step ``s`` to
``RECORD_DIR/s.npz``. With KILL_AT, the process sends itself SIGKILL right
after recording that step: no cleanup, no final save, an async save possibly
still in flight. Run again on the same CHECKPOINT_DIR, it resumes.
"""

import os
import signal
import sys
from typing import Optional

import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og

NUM_EXAMPLES = 18  # Not a multiple of the batch size: epochs drop a remainder.
BATCH_SIZE = 4
SAVE_INTERVAL = 4


def arrays() -> dict[str, np.ndarray]:
  """Rows that name themselves: ``i`` is the example's index."""
  x = np.linspace(-1.0, 1.0, 2 * NUM_EXAMPLES, dtype=np.float32)
  x = x.reshape(NUM_EXAMPLES, 2)
  return {'x': x, 'y': x @ np.float32([2.0, -1.0]),
          'i': np.arange(NUM_EXAMPLES)}


def train(directory: str, record_dir: str, num_steps: int,
          kill_at: Optional[int] = None) -> int:
  """Runs (or resumes) the training; returns the final step."""
  os.makedirs(record_dir, exist_ok=True)
  tx = og.guard(optax.sgd(0.1))
  step_fn = og.make_train_step(
      lambda p, b: jnp.mean((b['x'] @ p['w'] - b['y']) ** 2), tx
  )
  params = {'w': jnp.zeros(2)}
  drawn = {}

  def train_step(params, opt_state, batch):
    drawn['batch'] = batch
    return step_fn(params, opt_state, batch)

  def record(state, metrics, events):
    del metrics, events
    np.savez(os.path.join(record_dir, f'{state.step}.npz'), **drawn['batch'])
    if state.step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)

  with og.Checkpointer(directory, save_interval_steps=SAVE_INTERVAL) as ckpt:
    result = og.fit(
        train_step, og.TrainState(0, params, tx.init(params)),
        og.batches(arrays(), BATCH_SIZE, seed=7), num_steps=num_steps,
        checkpointer=ckpt, progress=False, handle_preemption=False,
        callback=record,
    )
  return result.state.step


if __name__ == '__main__':
  train(sys.argv[1], sys.argv[2], int(sys.argv[3]),
        int(sys.argv[4]) if len(sys.argv) > 4 else None)
