"""Saves until a small disk is full (run as a subprocess, on a small tmpfs).

Usage: python disk_full_worker.py CHECKPOINT_DIR

Saves steps 1, 2, ... of a 256 KiB state asynchronously until a save
raises; prints ``raised NAME STEP SECONDS MESSAGE`` (the step whose save
call raised, the seconds that call and the wait took) and the steps on disk
(``on disk STEP ...``).
"""

import os
import sys
import time

import jax.numpy as jnp
import numpy as np

import optax_guard as og


def main(directory):
  ckpt = og.Checkpointer(directory, save_interval_steps=1, max_to_keep=None)
  rng = np.random.default_rng(0)
  step = 0
  try:
    while step < 100:
      step += 1
      params = {'w': jnp.asarray(rng.normal(size=(256, 256)), jnp.float32)}
      start = time.monotonic()
      ckpt.save(og.TrainState(step, params, ()))
    print('never full', flush=True)
  except Exception as e:  # pylint: disable=broad-except
    print(f'raised {type(e).__name__} {step}'
          f' {time.monotonic() - start:.2f} {e}', flush=True)
  try:
    ckpt.close()
  except Exception as e:  # pylint: disable=broad-except
    print(f'close raised {type(e).__name__} {e}', flush=True)
  committed = sorted(int(name) for name in os.listdir(directory)
                     if name.isdigit())
  print('on disk', *committed, flush=True)


if __name__ == '__main__':
  main(sys.argv[1])
