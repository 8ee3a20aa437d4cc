"""A training process for the kill/resume tests (run as a subprocess).

Usage: python crash_worker.py CHECKPOINT_DIR RESULT_FILE NUM_STEPS [CACHE_DIR]

Trains a small MLP with og.fit (async checkpoints every 4 steps, recovery
with learning-rate back-off, a planned burst of NaN gradients that forces one
rollback). Prints ``step N`` after every step and ``saved N`` as soon as an
async save has been handed to Orbax (its files are still being written). On
completion writes the final state and event counts to RESULT_FILE (.npz).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og
from optax_guard import testing


class AnnouncingCheckpointer(og.Checkpointer):
  """Says when a save was handed over, so a test can kill during the write."""

  def save(self, state, **kwargs):
    saved = super().save(state, **kwargs)
    if saved:
      print(f'saved {state.step}', flush=True)
    return saved


def main(directory, result_file, num_steps):
  data_arrays = testing.regression_data(seed=0, num_examples=512)
  plan = testing.plan_faults(
      num_steps, 3, seed=5, kinds=['grad_spike', 'nan_loss'], first_step=8,
      bursts=1, burst_length=4,
  )
  data = testing.FaultInjector(
      og.batches(data_arrays, batch_size=16, seed=0), plan
  )
  tx = og.guard(
      optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
      clip=og.zclip(warmup_steps=5),
      max_consecutive_skips=3,
  )
  loss_fn = testing.with_faults(
      lambda p, b: jnp.mean((jnp.tanh(b['x'] @ p['w1']) @ p['w2'] - b['y'])
                            ** 2)
  )
  key1, key2 = jax.random.split(jax.random.key(42))
  params = {
      'w1': jax.random.normal(key1, (8, 16)) / 3,
      'w2': jax.random.normal(key2, (16, 1)) / 4,
  }
  init = og.TrainState(0, params, tx.init(params), jax.random.key(7))
  with AnnouncingCheckpointer(
      directory, save_interval_steps=4, max_to_keep=2
  ) as ckpt:
    result = og.fit(
        og.make_train_step(loss_fn, tx), init, data, num_steps=num_steps,
        checkpointer=ckpt,
        recovery=og.RecoveryPolicy(max_rollbacks=2, lr_backoff=0.5),
        progress=False,
        callback=lambda state, m, e: print(f'step {state.step}', flush=True),
    )
  leaves = jax.tree_util.tree_flatten_with_path(
      (result.state.params, result.state.opt_state)
  )[0]
  arrays = {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}
  np.savez(
      result_file,
      step=result.state.step,
      rollbacks=len(result.recovery.rollbacks),
      skipped_steps=result.events.counts['skipped_step'],
      **arrays,
  )
  print('done', flush=True)


if __name__ == '__main__':
  # A shared compilation cache makes restarts cheaper. Set here, not at
  # import: pytest's doctest collection imports this file, and pytest's own
  # arguments would turn the cache on in the test process.
  if len(sys.argv) > 4:
    jax.config.update('jax_compilation_cache_dir', sys.argv[4])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
