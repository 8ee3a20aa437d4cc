"""A run whose checkpoint directory stops taking writes (run as a subprocess).

Usage: python unwritable_worker.py CHECKPOINT_DIR

Runs og.fit to step 10 (saves every 5), makes the directory unwritable
(``chattr +i`` as root, whom ``chmod`` does not stop; ``chmod 555``
otherwise), runs on to step 20 and prints ``raised NAME SECONDS MESSAGE``
(seconds from the start of the second run). The process must then exit: an
Orbax thread left waiting for a step directory kept it alive for 300 s.
"""

import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og


def make_unwritable(directory, unwritable):
  if os.geteuid() == 0:
    subprocess.run(['chattr', '+i' if unwritable else '-i', directory],
                   check=True)
  else:
    os.chmod(directory, 0o555 if unwritable else 0o755)


def run(directory, num_steps):
  x = np.linspace(-1, 1, 64, dtype=np.float32)
  tx = og.guard(optax.sgd(0.1))
  step = og.make_train_step(
      lambda p, b: jnp.mean((p['w'] * b['x'] - b['y']) ** 2), tx)
  params = {'w': jnp.zeros(())}
  with og.Checkpointer(directory, save_interval_steps=5) as ckpt:
    og.fit(step, og.TrainState(0, params, tx.init(params)),
           og.batches({'x': x, 'y': 3 * x}, batch_size=16),
           num_steps=num_steps, checkpointer=ckpt, progress=False,
           handle_preemption=False)


def main(directory):
  run(directory, 10)
  make_unwritable(directory, True)
  start = time.monotonic()
  try:
    run(directory, 20)
  except Exception as e:  # pylint: disable=broad-except
    print(f'raised {type(e).__name__} {time.monotonic() - start:.2f} {e}',
          flush=True)
  finally:
    make_unwritable(directory, False)


if __name__ == '__main__':
  main(sys.argv[1])
