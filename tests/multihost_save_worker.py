"""One of two JAX processes saving a checkpoint (run as a subprocess).

Usage: python multihost_save_worker.py COORDINATOR PROCESS_ID CHECKPOINT_DIR

Each process saves step 1 of a small replicated state and prints ``saved``
or ``raised NAME SECONDS MESSAGE``, then ``exited``. The test runs process
1 in a mount namespace where the directory is read-only: its save fails,
and both processes must raise (none left waiting in a collective).
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_guard as og


def main(coordinator, process_id, directory):
  # Here, not at import: pytest's doctest collection imports this module.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', 1)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=2,
                             process_id=process_id, initialization_timeout=60)
  try:
    mesh = Mesh(np.array(jax.devices()), ('x',))
    value = np.arange(8.0, dtype=np.float32)
    w = jax.make_array_from_callback(
        value.shape, NamedSharding(mesh, P()), lambda index: value[index])
    state = og.TrainState(1, {'w': w}, {'count': jnp.zeros((), jnp.int32)})
    ckpt = og.Checkpointer(directory, save_interval_steps=1)
    start = time.monotonic()
    try:
      ckpt.save(state)
      ckpt.wait_until_finished()
      print('saved', flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f'raised {type(e).__name__} {time.monotonic() - start:.2f} {e}',
            flush=True)
    ckpt.close()
  finally:
    jax.distributed.shutdown()
  print('exited', flush=True)


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
